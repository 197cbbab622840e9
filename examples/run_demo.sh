#!/usr/bin/env bash
# The bundled default: install into .venv (CPU torch pinned, Megatron-LM's training loop from
# megatron-core 0.19.2), then fine-tune a tiny MoE with DR-LoRA on CPU with 2 processes (expert
# parallel). Extra arguments go to examples/demo.py (e.g. --quick, --out DIR, --nproc 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv ".[plot]"
. .venv/bin/activate
export OMP_NUM_THREADS=1
python examples/demo.py "$@"
