"""Turn "the job is about to be stopped" signals into a flag the training loop polls.

SLURM warns a job before it ends: ``--signal=B:USR1@300`` (time limit ahead, forwarded to the
training processes by ``examples/slurm/drlora_finetune.sbatch``) and SIGTERM (``scancel``,
preemption, the time limit itself; SIGKILL follows after the cluster's KillWait/GraceTime).
`PreemptionHandler` catches those signals and only records that one arrived.

Why only a flag: a Python signal handler runs between two bytecodes of the main thread,
wherever it happens to be - inside ``print`` (re-entering a buffered writer raises
RuntimeError), holding a logging lock, or halfway through an NCCL collective that the other
ranks are still in. Saving a checkpoint there would run collectives on one rank at an
arbitrary point and hang or corrupt the job. So the handler sets an integer, and the decision
is taken at a step boundary where every rank is in a known state.

Contract with the training loop (the cross-rank part lives in ``megatron_drlora/comm.py``)::

    handler = PreemptionHandler().install()      # early in main(), in the main thread
    print(requeue_hint())                        # "SLURM job 123: restart 1 (requeued ...)"
    ...
    for iteration in ...:
        train_step(...)                          # optimizer step done on every rank
        flag = torch.tensor([handler.local_flag()], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=ReduceOp.MAX)   # WORLD group, every rank
        if flag.item():                          # some rank was signalled -> all stop here
            save_checkpoint(iteration)           # --save; the tracker file is written last
            sys.exit(0)                          # 0: torchrun/srun succeed, the batch shell
                                                 #    requeues, --load resumes from here

* Every rank must take part in the reduction at the same iterations (each step, or every k
  steps with the same k everywhere): it is a collective, and a rank that skips it because it
  saw no signal deadlocks the others. Signals reach ranks at different moments (and some
  ranks maybe not at all), which is why a MAX over all ranks, not the local flag, decides.
* `local_flag()` is a plain ``int`` (0 or 1) so it can be appended to a reduction the step
  already does (loss, DR-LoRA statistics) instead of costing an extra all-reduce.
* Exit with status 0 after the save: the sbatch script requeues only when the job step
  succeeded after the warning signal, and a non-zero status would make torchrun tear the other
  workers down.
* Keep the handler installed until exit. Install it before the model is built: a signal that
  arrives during start-up is kept and honoured at the first step boundary. Under torchrun a
  worker starts with SIGUSR1 ignored (the sbatch script arranges that, so a stray USR1 cannot
  kill torchrun), so a signal that arrives before `install()` is dropped, not fatal.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Iterable, Mapping, Optional, Union

SignalLike = Union[int, str, signal.Signals]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _to_signal(sig: SignalLike) -> signal.Signals:
    """Accept ``signal.SIGUSR1``, ``10``, ``"SIGUSR1"``, ``"USR1"`` or ``"usr1"``."""
    try:
        if isinstance(sig, str):
            name = sig.strip().upper()
            result = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        elif isinstance(sig, bool):
            raise TypeError
        else:
            result = signal.Signals(sig)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown signal {sig!r}; use a name such as SIGUSR1 or SIGTERM") from None
    if result in _UNCATCHABLE:
        raise ValueError(f"{result.name} cannot be caught; the kernel kills without a handler")
    return result


class PreemptionHandler:
    """Catch SIGTERM and SIGUSR1 (configurable) and remember that a stop was requested.

    The handler itself only writes two integers, so it is safe wherever the main thread is
    interrupted. `uninstall()` (or leaving the ``with`` block) restores the previous handlers.
    """

    def __init__(self, signals: Iterable[SignalLike] = DEFAULT_SIGNALS):
        resolved = []
        for s in signals:
            sig = _to_signal(s)
            if sig not in resolved:
                resolved.append(sig)
        if not resolved:
            raise ValueError("PreemptionHandler needs at least one signal to catch")
        self.signals = tuple(resolved)
        self._flag = 0
        self._first: Optional[int] = None
        self._count = 0
        self._previous: Dict[signal.Signals, object] = {}

    # --- installation -------------------------------------------------------------------
    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only, as CPython requires); idempotent."""
        if self._previous:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread: "
                               "CPython delivers signals to handlers of the main thread only")
        previous = {}
        try:
            for sig in self.signals:
                previous[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            for sig, old in previous.items():
                signal.signal(sig, _restorable(old))
            raise
        self._previous = previous
        return self

    def uninstall(self) -> None:
        """Put back the handlers found at `install()`; a no-op when not installed."""
        previous, self._previous = self._previous, {}
        for sig, old in previous.items():
            signal.signal(sig, _restorable(old))

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        # Async-signal context: assignments only. No logging, printing, locks or I/O.
        if self._first is None:
            self._first = signum
        self._count += 1
        self._flag = 1

    # --- queries ------------------------------------------------------------------------
    def requested(self) -> bool:
        """True once any caught signal arrived in this process (local view, not agreed)."""
        return self._flag != 0

    def local_flag(self) -> int:
        """0 or 1, ready for ``torch.tensor([flag])`` and an all-reduce MAX across ranks."""
        return self._flag

    @property
    def signal_received(self) -> Optional[signal.Signals]:
        """The first caught signal, or None."""
        return None if self._first is None else signal.Signals(self._first)

    @property
    def signal_name(self) -> Optional[str]:
        sig = self.signal_received
        return None if sig is None else sig.name

    @property
    def count(self) -> int:
        """How many caught signals arrived (a second SIGTERM is still only a flag)."""
        return self._count

    def clear(self) -> None:
        """Forget received signals (tests, or a loop that decided to keep going)."""
        self._flag, self._first, self._count = 0, None, 0

    def __repr__(self) -> str:
        names = ",".join(s.name for s in self.signals)
        return (f"PreemptionHandler(signals={names}, installed={self.installed}, "
                f"requested={self.requested()}, first={self.signal_name})")


def _restorable(old):
    # signal.signal() returns None for a handler installed from C; SIG_DFL is the closest
    # thing Python can put back.
    return signal.SIG_DFL if old is None else old


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
