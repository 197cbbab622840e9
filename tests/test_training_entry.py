"""examples/pretrain_gpt.py end to end on CPU: training, growth, checkpoints, resume, errors."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import free_port
from tests.dist_harness import REPO
from tests.train_flags import DRLORA, TINY_MODEL

pytestmark = pytest.mark.slow
ENTRY = str(REPO / "examples" / "pretrain_gpt.py")


def _train(tmp, nproc, extra, name="run", timeout=300):
    out = tmp / name
    args = TINY_MODEL + DRLORA + ["--drlora-log-dir", str(out)] + extra
    log = run_torchrun_entry(nproc, args, timeout)
    metrics = [json.loads(l) for l in open(out / "train_metrics.jsonl")]
    return out, log, metrics


def run_torchrun_entry(nproc, args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", ENTRY] + list(args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc.stdout


def _ranks(out):
    return [json.loads(l) for l in open(out / "drlora_ranks.jsonl")]


def test_two_process_run_grows_at_planned_steps_saves_and_learns(tmp_path):
    out, log, metrics = _train(tmp_path, 2, ["--train-iters", "16",
                                             "--expert-model-parallel-size", "2",
                                             "--save", str(tmp_path / "ckpt"),
                                             "--save-interval", "8"])
    events = [r["iteration"] for r in _ranks(out) if r["kind"] == "event"]
    assert events == [2, 5, 8, 11, 14]  # warm-up 2, every 3 steps, up to t_end = 16 - 2
    assert "growth event at step" in log and "lm loss" in log
    assert os.path.isdir(tmp_path / "ckpt" / "iter_0000008")
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "16"
    first = sum(m["loss"] for m in metrics[:3]) / 3
    last = sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first - 0.05, (first, last)
    final = torch.tensor(_ranks(out)[-1]["rank_map"])
    assert (final.sum(dim=(1, 2)) == 4 * 2 * 8).all()  # every layer at its budget


@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"], []],
                         ids=["ep2", "dp2"])
def test_resume_is_bitwise_identical(tmp_path, layout):
    common = ["--train-iters", "12"] + layout
    full_out, _, full = _train(tmp_path, 2, common, name="full")
    ckpt = str(tmp_path / "ckpt")
    part_out, _, part = _train(tmp_path, 2, common + ["--save", ckpt, "--exit-interval", "7"],
                               name="part")
    assert [m["iteration"] for m in part] == list(range(1, 8))
    _, _, resumed = _train(tmp_path, 2, common + ["--save", ckpt, "--load", ckpt], name="part")
    assert [m["iteration"] for m in resumed] == list(range(1, 13))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full]
    assert _ranks(part_out)[-1]["rank_map"] == _ranks(full_out)[-1]["rank_map"]


def test_bad_drlora_value_is_rejected_before_any_process_group(tmp_path):
    start = time.time()
    proc = subprocess.run([sys.executable, ENTRY] + TINY_MODEL + ["--train-iters", "5",
                          "--lr", "1e-3", "--drlora-budget", "8", "--drlora-saliency", "magic"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert proc.returncode == 2
    assert "--drlora-saliency" in proc.stderr and "invalid choice" in proc.stderr
    proc = subprocess.run([sys.executable, ENTRY] + TINY_MODEL + ["--train-iters", "5",
                          "--lr", "1e-3", "--drlora-budget", "8", "--drlora-rank-init", "12"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert proc.returncode == 2 and "--drlora-rank-init" in proc.stderr
    assert "exceeds the budget" in proc.stderr
    assert "world size" not in proc.stdout  # refused before distributed start-up
    assert time.time() - start < 60


@pytest.mark.parametrize("extra, needle", [
    (["--tokenizer-model", "/nope/tok.model", "--data-path", "x"], "--tokenizer-model"),
    (["--expert-model-parallel-size", "3"], "--num-experts 4 is not divisible"),
    (["--pretrained-checkpoint", "/nope/base"], "--pretrained-checkpoint /nope/base"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "not both"),
])
def test_bad_flags_get_clear_errors(extra, needle):
    args = [a for a in TINY_MODEL if a not in ("--mock-data",)] if "--data-path" in extra \
        else TINY_MODEL
    proc = subprocess.run([sys.executable, ENTRY] + args + ["--train-iters", "5", "--lr", "1e-3"]
                          + extra, capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
