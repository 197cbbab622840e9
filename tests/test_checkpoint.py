"""Adapter checkpoints: resharding across layouts and crash safety of saves."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_drlora.checkpoint import latest_iteration
from tests.conftest import free_port
from tests.dist_harness import REPO, load, run_torchrun
from tests.test_training_entry import run_torchrun_entry
from tests.train_flags import DRLORA, TINY_MODEL

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("saved, loaded", [
    (["--expert-model-parallel-size", "2"], []),
    (["--tensor-model-parallel-size", "2"], []),
    ([], ["--expert-model-parallel-size", "2"]),
], ids=["ep2_to_ep1", "tp2_to_tp1", "ep1_to_ep2"])
def test_adapter_checkpoint_loads_under_another_layout(tmp_path, saved, loaded):
    ckpt = tmp_path / "ckpt"
    nproc_saved = 2 if saved else 1
    run_torchrun_entry(nproc_saved, TINY_MODEL + DRLORA + ["--train-iters", "9", "--save",
                                                           str(ckpt)] + saved)
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    run_torchrun("checkpoint_worker.py", nproc_saved, ["logits", same, "--load", ckpt] + saved)
    run_torchrun("checkpoint_worker.py", 2 if loaded else 1,
                 ["logits", other, "--load", ckpt] + loaded)
    a, b = load(same), load(other)
    assert torch.equal(a["rank_map"], b["rank_map"])
    assert len(set(a["rank_map"].flatten().tolist())) > 1  # grown, heterogeneous ranks
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["inside", "before-rename"])
def test_process_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path, where):
    root = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    cmd = [sys.executable, str(REPO / "tests" / "workers" / "checkpoint_worker.py"), "crash",
           str(root), where]
    # Own session: dist_checkpointing's writer processes, orphaned by the kill, are reaped
    # with the whole process group afterwards.
    log = tmp_path / "crash.log"
    with open(log, "w") as fh:  # a file, not a pipe: orphans must not keep us waiting
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=fh, stderr=fh,
                                start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert latest_iteration(str(root)) == 1
    assert not (root / "iter_0000002").exists()
    out = tmp_path / "logits.pt"
    run_torchrun("checkpoint_worker.py", 1, ["logits", out, "--load", root])
    assert load(out)["logits"].isfinite().all()
