"""Launch real multi-process (gloo) workers with torchrun and collect their results.

Each launch gets a free port, OMP_NUM_THREADS=1, and a hard timeout; a worker that hangs in a
collective fails the test with its output instead of blocking CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def run_torchrun(script: str, nproc: int, args, timeout: int = 240, env_extra=None) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / script)] + [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script} with {nproc} processes timed out after {timeout}s:\n"
                             f"{(e.stdout or '')[-4000:]}\n{(e.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed "
                             f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def load(path) -> dict:
    return torch.load(path, weights_only=False)
