#!/usr/bin/env bash
# Install megatron-drlora with Megatron-LM's training loop into a venv:
#   bash scripts/install.sh [VENV_DIR] [PIP_TARGET]      (defaults: .venv and ".[plot]")
# - torch is pinned to the CPU build 2.13.0 so pip never pulls a CUDA wheel on a CPU box
#   (GPU containers bring their own torch: install with `pip install -e .` there instead);
# - megatron-core 0.19.2 ships megatron/training (Megatron-LM's loop). Its wheel declares
#   Python >= 3.12; on Python 3.11 it installs with --ignore-requires-python and runs once
#   megatron_drlora's import shim is applied (typing.override). On 3.12+ it is a plain install.
set -euo pipefail
venv=${1:-.venv}
target=${2:-.[plot]}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q "torch==2.13.0" "numpy<2.5" "packaging>=24.2" psutil
if python -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
  pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
else
  pip install -q --no-deps "megatron-core==0.19.2"
fi
pip install -q "torch==2.13.0" -e "$target"
