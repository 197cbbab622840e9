"""Runs of examples/pretrain_gpt.py shared by the entry-point and multi-node tests.

Start-up (imports, process groups) is most of a launch's cost on a 2-core box, so the base and
the DR-LoRA runs are made once per test session (`megatron_work`, `megatron_base` fixtures in
conftest.py) and reused by every test that compares against them.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import torch

from tests import prefork
from tests.conftest import free_port
from tests.dist_harness import REPO
from tests.train_flags import DRLORA, TINY

ENTRY = str(REPO / "examples" / "pretrain_gpt.py")


def torchrun(nproc, args, timeout=400, expect_ok=True, entry=ENTRY, env=None,
             launcher="prefork"):
    """ENTRY args in `nproc` ranks. `launcher="prefork"` (tests/prefork.py) forks ranks from
    a server that has imported torch and Megatron once; `launcher="torchrun"` runs the real
    torchrun, for what only its agent does. Either way the output goes to files and whatever
    the run leaves behind (a rank killed mid-save orphans its checkpoint writer's Manager
    process) is killed with the launch's session, so a crashed run can neither hang the test
    nor outlive it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    if launcher == "prefork":
        result = prefork.launch(entry, args, nproc, timeout, env=env)
    else:
        result = _real_torchrun(nproc, args, timeout, entry, env)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def _real_torchrun(nproc, args, timeout, entry, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", entry] + list(args)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True,
                                cwd=str(REPO), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


_READ = {}  # (checkpoint directory, its metadata's mtime) -> what read_checkpoint returned


def read_checkpoint(iter_dir, tmp):
    """Every tensor and the DR-LoRA state of a checkpoint, read by a separate process that
    uses none of the model code (tests/workers/read_checkpoint.py, forked by tests/prefork.py
    like a rank). Each checkpoint is read once per test process: callers must not modify the
    result."""
    meta = os.path.join(str(iter_dir), "metadata.json")
    key = (os.path.realpath(str(iter_dir)), os.stat(meta).st_mtime_ns if os.path.exists(meta)
           else None)
    if key not in _READ:
        _READ[key] = _read_checkpoint(iter_dir, tmp)
    return _READ[key]


def _read_checkpoint(iter_dir, tmp):
    out = tmp / f"read_{os.path.basename(str(iter_dir))}_{free_port()}.pt"
    torchrun(1, [iter_dir, out, free_port()], timeout=120,
             entry=str(REPO / "tests" / "workers" / "read_checkpoint.py"))
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


def assert_same_run(reference, run, tmp):
    """`run` took the reference's growth decisions at the same iterations (rank maps exact,
    saliency to fp32 layout noise) and ended with the same trained tensors (relative to each
    tensor's scale)."""
    ref_events, run_events = events(reference), events(run)
    assert [e["iteration"] for e in run_events] == [e["iteration"] for e in ref_events]
    for ref, got in zip(ref_events, run_events):
        assert got["rank_map"] == ref["rank_map"], got["iteration"]
        ref_s, got_s = torch.tensor(ref["saliency"]), torch.tensor(got["saliency"])
        assert torch.allclose(got_s, ref_s, rtol=1e-5, atol=1e-6 * ref_s.abs().max())
    last = f"iter_{ref_events[-1]['iteration'] + 2:07d}"
    ref_ckpt, got_ckpt = read_checkpoint(reference / last, tmp), read_checkpoint(run / last, tmp)
    for key, ref_t in ref_ckpt["tensors"].items():
        if key.startswith("optimizer.") or ".pool_table_" in key:
            continue  # a rank pool's slot numbers are per layout (each EP rank numbers its own)
        scale = ref_t.abs().max().item()
        assert torch.allclose(got_ckpt["tensors"][key].float(), ref_t.float(), rtol=0,
                              atol=1e-4 * scale), key
