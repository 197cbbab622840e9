"""PreemptionHandler: real signals sent to this process with os.kill; handlers restored after."""

import os
import signal
import threading
import time

import pytest

from megatron_drlora.launch.preemption import PreemptionHandler, is_requeued, requeue_hint


@pytest.fixture(autouse=True)
def _guard_handlers():
    """Keep a test failure from leaving this process with a handler that swallows SIGTERM."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, h in before.items():
        signal.signal(s, h)


def _wait_for(handler):
    deadline = time.monotonic() + 2.0
    while not handler.requested() and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_restores_handlers(sig):
    sentinel = lambda s, f: None  # noqa: E731 - a recognisable previous handler
    signal.signal(sig, sentinel)
    handler = PreemptionHandler().install()
    try:
        assert handler.installed and not handler.requested() and handler.local_flag() == 0
        os.kill(os.getpid(), sig)
        _wait_for(handler)
        assert handler.requested() and handler.local_flag() == 1
        assert handler.signal_received == sig and handler.signal_name == sig.name
        assert handler.count == 1
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) is sentinel
    assert not handler.installed


def test_first_signal_is_remembered_and_repeats_counted():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for(handler)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while handler.count < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert handler.signal_name == "SIGUSR1" and handler.count == 2
        assert isinstance(handler.local_flag(), int)  # cheap to turn into a tensor
        handler.clear()
        assert not handler.requested() and handler.signal_received is None
    assert signal.getsignal(signal.SIGTERM) is before


def test_configurable_signals_leave_others_alone():
    caught = []
    signal.signal(signal.SIGUSR1, lambda s, f: caught.append(s))
    with PreemptionHandler(signals=["USR2"]) as handler:
        assert handler.signals == (signal.SIGUSR2,)
        assert signal.getsignal(signal.SIGTERM) != handler._on_signal
        os.kill(os.getpid(), signal.SIGUSR1)  # not ours: the previous handler gets it
        deadline = time.monotonic() + 2.0
        while not caught and time.monotonic() < deadline:
            time.sleep(0.001)
        assert caught == [signal.SIGUSR1] and not handler.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        _wait_for(handler)
        assert handler.signal_name == "SIGUSR2"


def test_signal_spellings_and_refusals():
    h = PreemptionHandler(signals=[signal.SIGTERM, "SIGUSR1", "usr1", int(signal.SIGUSR2)])
    assert h.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        PreemptionHandler(signals=["KILL"])
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        PreemptionHandler(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="at least one"):
        PreemptionHandler(signals=[])


def test_install_is_idempotent_and_uninstall_safe():
    before = signal.getsignal(signal.SIGUSR1)
    h = PreemptionHandler()
    h.install()
    h.install()  # a second install must not record our own handler as "previous"
    h.uninstall()
    h.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_install_outside_main_thread_is_a_clear_error():
    errors = []

    def worker():
        try:
            PreemptionHandler().install()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_requeue_hint():
    assert "not running under SLURM" in requeue_hint({})
    assert "first run" in requeue_hint({"SLURM_JOB_ID": "42"})
    text = requeue_hint({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert "restart 2" in text and "requeued" in text
    assert "not a number" in requeue_hint({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "x"})
    assert is_requeued({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert not is_requeued({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"})
    assert not is_requeued({"SLURM_RESTART_COUNT": "3"})
