"""Runs of examples/pretrain_gpt.py shared by the entry-point and multi-node tests.

Start-up (imports, process groups) is most of a launch's cost on a 2-core box, so the base and
the DR-LoRA runs are made once per test session (`megatron_work`, `megatron_base` fixtures in
conftest.py) and reused by every test that compares against them.
"""

import json
import os
import subprocess
import sys

import torch

from tests.conftest import free_port
from tests.dist_harness import REPO
from tests.train_flags import DRLORA, TINY

ENTRY = str(REPO / "examples" / "pretrain_gpt.py")


def torchrun(nproc, args, timeout=400, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", ENTRY] + list(args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_checkpoint(iter_dir, tmp):
    """Every tensor and the DR-LoRA state of a checkpoint, read by a separate process that
    knows nothing of the model code (tests/workers/read_checkpoint.py)."""
    out = tmp / f"read_{os.path.basename(str(iter_dir))}_{free_port()}.pt"
    subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "read_checkpoint.py"),
                    str(iter_dir), str(out), str(free_port())], check=True, cwd=str(REPO),
                   env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=120)
    return torch.load(out, weights_only=False)


def events(run_dir):
    return [json.loads(line) for line in open(run_dir / "drlora_ranks.jsonl")
            if json.loads(line)["kind"] == "event"]


def steps(run_dir):
    return [json.loads(line) for line in open(run_dir / "drlora_steps.jsonl")]


def make_base(path):
    """A base trained by the entry itself without DR-LoRA (layout-independent init)."""
    torchrun(1, TINY + ["--train-iters", "2", "--init-from-identity", "--save", str(path),
                        "--save-interval", "2"])
    return path


def drlora_run(work, base, name, nproc, extra, stop_at=None):
    """A DR-LoRA run of TINY + DRLORA into work/name (made once); with `stop_at`, stopped
    there by --exit-interval and resumed by the same command, as a preempted job would be."""
    path = work / name
    if not path.exists():
        args = TINY + DRLORA + ["--pretrained-checkpoint", str(base), "--save", str(path),
                                "--load", str(path)] + extra
        if stop_at is not None:
            first = torchrun(nproc, args + ["--exit-interval", str(stop_at)])
            assert f"exiting program at iteration {stop_at}" in first.stdout + first.stderr
        last = torchrun(nproc, args)
        if stop_at is not None:
            assert "DR-LoRA state restored" in last.stdout + last.stderr
    return path
