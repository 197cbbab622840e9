"""SLURM requeue information printed by the batch scripts."""

from megatron_drlora.launch.requeue import is_requeued, requeue_hint


def test_requeue_hint():
    assert "not running under SLURM" in requeue_hint({})
    assert "first run" in requeue_hint({"SLURM_JOB_ID": "42"})
    text = requeue_hint({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert "restart 2" in text and "requeued" in text
    assert "not a number" in requeue_hint({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "x"})
    assert is_requeued({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert not is_requeued({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"})
    assert not is_requeued({"SLURM_RESTART_COUNT": "3"})
