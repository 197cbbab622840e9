"""SLURM requeue information for the batch scripts.

Stopping at a step boundary on SIGTERM / SIGUSR1 and saving is Megatron-LM's
(`--exit-signal-handler --exit-signal SIGUSR1`); what is left here is telling, in the first
lines of a job's log, whether this run is a requeued one, so a silent restart from scratch
(a wrong --load directory) is visible.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional


# --- requeue information ---------------------------------------------------------------------
def _restart_count(env: Mapping[str, str]) -> int:
    raw = (env.get("SLURM_RESTART_COUNT") or "0").strip()
    return int(raw) if raw.isdigit() else 0


def is_requeued(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when this SLURM job is a requeued run (SLURM_RESTART_COUNT > 0)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) and _restart_count(env) > 0


def requeue_hint(env: Optional[Mapping[str, str]] = None) -> str:
    """One log line saying whether this is a fresh or a requeued SLURM run.

    A requeued job keeps its SLURM_JOB_ID and gets SLURM_RESTART_COUNT incremented; printing
    this next to the iteration ``--load`` resumed from makes a silent restart-from-scratch
    (wrong ``--load`` directory) visible in the first lines of the log.
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        return "not running under SLURM (SLURM_JOB_ID unset): no requeue"
    raw = env.get("SLURM_RESTART_COUNT")
    if raw is not None and not raw.strip().isdigit():
        return f"SLURM job {job}: SLURM_RESTART_COUNT={raw!r} is not a number"
    count = _restart_count(env)
    if count > 0:
        return (f"SLURM job {job}: restart {count} (requeued run; training resumes from the "
                f"latest checkpoint in --load)")
    return f"SLURM job {job}: first run (SLURM_RESTART_COUNT={raw or 0})"
