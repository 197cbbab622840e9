#!/usr/bin/env bash
# The bundled default: install into .venv (CPU torch pinned), then fine-tune a tiny MoE with
# DR-LoRA on CPU with 2 processes (expert parallel). Extra arguments go to examples/demo.py
# (e.g. --quick, --out DIR, --nproc 4).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q "torch==2.13.0" -e ".[plot]"
export OMP_NUM_THREADS=1
python examples/demo.py "$@"
