#!/usr/bin/env bash
# Install test dependencies into .venv (CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch is pinned to the CPU build 2.13.0 so pip never pulls a CUDA wheel on a CPU box.
pip install -q "torch==2.13.0" -e ".[dev]"
export OMP_NUM_THREADS=1
python -m pytest -q "$@"
