#!/usr/bin/env bash
# Install test dependencies into .venv (CPU torch pinned) and run the whole test suite, then
# run the megatron-core compatibility subset against the newest megatron.core API (0.19.x,
# forced onto Python 3.11 in a second venv; test-only). Set DRLORA_SKIP_COMPAT=1 to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1

python3 -m venv .venv
. .venv/bin/activate
# torch is pinned to the CPU build 2.13.0 so pip never pulls a CUDA wheel on a CPU box.
pip install -q "torch==2.13.0" -e ".[dev,hf]"
# transformers 4 (per-expert modules) beside the venv's transformers 5 (fused experts), only
# for the test that loads the per-expert PEFT export.
if [ ! -d .hf4 ]; then
  pip install -q --target .hf4 "transformers==4.57.6" "tokenizers==0.22.*" "huggingface-hub<1" \
      requests
fi
export DRLORA_TRANSFORMERS4_PATH="$PWD/.hf4"
python -m pytest -q "$@"
deactivate

if [ "${DRLORA_SKIP_COMPAT:-0}" != "1" ]; then
  echo "== megatron-core 0.19 compatibility subset"
  python3 -m venv .venv-mcore019
  . .venv-mcore019/bin/activate
  pip install -q "torch==2.13.0" "numpy<2.5" psutil sentencepiece pyyaml pytest pytest-timeout
  # 0.17+ declare Python >= 3.12; megatron.core itself runs on 3.11 (megatron.training does not).
  pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
  pip install -q --no-deps -e .
  python -m pytest -q tests/test_adapters.py tests/test_controller.py \
      tests/test_parallel_parity.py tests/test_training_entry.py
fi
