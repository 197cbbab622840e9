#!/usr/bin/env bash
# Install test dependencies into .venv (CPU torch pinned) and run the whole test suite, then
# run the oldest-supported subset (apply_drlora + controller, which users can drive from their
# own loop) against megatron-core 0.16.1 in a second venv. Set DRLORA_SKIP_COMPAT=1 to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1

bash scripts/install.sh .venv ".[dev,hf]"
. .venv/bin/activate
# transformers 4 (per-expert modules) beside the venv's transformers 5 (fused experts), only
# for the test that loads the per-expert PEFT export.
if [ ! -d .hf4 ]; then
  pip install -q --target .hf4 "transformers==4.57.6" "tokenizers==0.22.*" "huggingface-hub<1" \
      requests
fi
export DRLORA_TRANSFORMERS4_PATH="$PWD/.hf4"
# one pytest process: most tests are multi-process runs that already use both cores (their
# ranks are forked from a pre-imported server, tests/prefork.py)
python -m pytest -q "$@"
deactivate

if [ "${DRLORA_SKIP_COMPAT:-0}" != "1" ]; then
  echo "== megatron-core 0.16.1 (oldest supported: apply_drlora and the controller in a user's own loop)"
  python3 -m venv .venv-mcore016
  . .venv-mcore016/bin/activate
  pip install -q "torch==2.13.0" "megatron-core==0.16.1" "numpy<2.5" psutil sentencepiece \
      pyyaml pytest pytest-timeout
  pip install -q --no-deps -e .
  # adapters, controller and every layout-parity test (TP x EP x ETP, the distributed
  # optimizer, PP, VPP, the gradient reference), as run above on 0.19
  python -m pytest -q tests/test_adapters.py tests/test_controller.py \
      tests/test_parallel_parity.py
fi
