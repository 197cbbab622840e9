"""Launch real multi-process (gloo) workers with torchrun and collect their results.

Each launch gets a free port, OMP_NUM_THREADS=1, and a hard timeout; a worker that hangs in a
collective fails the test with its output instead of blocking CI. Ranks are forked from a
server that has imported torch and Megatron once (tests/prefork.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent


def run_torchrun(script: str, nproc: int, args, timeout: int = 240, env_extra=None) -> str:
    """tests/workers/SCRIPT in `nproc` gloo ranks, launched like torchrun by tests/prefork.py;
    returns stdout + stderr, raises AssertionError with the output when a rank fails."""
    from tests import prefork

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    proc = prefork.launch(REPO / "tests" / "workers" / script, args, nproc, timeout, env=env)
    if proc.returncode == -9:
        raise AssertionError(f"{script} with {nproc} processes timed out after {timeout}s:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed "
                             f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def load(path) -> dict:
    return torch.load(path, weights_only=False)
