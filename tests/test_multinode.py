"""Multi-node launch and preemption of examples/pretrain_gpt.py, simulated on one machine.

* Two "nodes": two `torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 1` agents on
  127.0.0.1 (static rendezvous, started concurrently) must train exactly like one
  `torchrun --nproc-per-node 2`: bitwise equal per-step gradient norms (drlora_steps.jsonl)
  and the same rank maps and saliency at every growth event, with EP2 (the experts split
  across the "nodes") and with DP2.
* Preemption: SIGTERM / SIGUSR1 delivered to the training processes (torchrun's children, as
  `examples/slurm/drlora_finetune.sbatch --node` forwards them; torchrun runs with SIGUSR1
  ignored as there) makes Megatron-LM (`--exit-signal-handler --exit-signal ...`) save at a
  step boundary and exit 0 on every node; `--load` resumes, and both runs together equal an
  uninterrupted run bitwise.

Every launch has a free port, a hard timeout, its output in files (printed on failure) and
kills its whole process tree when anything goes wrong.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil
import pytest

from tests.conftest import free_port
from tests.dist_harness import REPO
from tests.megatron_runs import drlora_run
from tests.train_flags import DRLORA, EVENTS, LAYOUTS, TINY

pytestmark = pytest.mark.slow
ENTRY = str(REPO / "examples" / "pretrain_gpt.py")
TIMEOUT = 240          # seconds for one launch (all its nodes); start-up is most of it
EP2 = LAYOUTS["ep2"]
ITERS = 8


# --- launching ---------------------------------------------------------------------------------
def _ignore_usr1():
    # What `drlora_finetune.sbatch --node` does with `trap '' USR1` before starting torchrun: a
    # stray SIGUSR1 must not kill the launcher. The workers inherit SIG_IGN until Megatron-LM's
    # --exit-signal-handler installs its handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _tree(proc: subprocess.Popen) -> List[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the launched torchrun agents and every process below them, by pid."""
    victims = [p for proc in procs for p in _tree(proc)]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Job:
    """One training job: `nnodes` torchrun agents with `nproc` workers each, run concurrently."""

    def __init__(self, tmp: Path, name: str, nnodes: int, nproc: int, args: Sequence[str],
                 base: Path):
        self.name, self.nnodes, self.nproc = name, nnodes, nproc
        self.log_dir = tmp / name
        self.out_dir = tmp / "launch-logs"
        self.out_dir.mkdir(exist_ok=True)
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.args = TINY + DRLORA + ["--pretrained-checkpoint", str(base),
                                     "--drlora-log-dir", str(self.log_dir)] + list(args)
        self.procs: List[subprocess.Popen] = []
        self.outputs: List[Path] = []
        self.commands: List[List[str]] = []
        try:
            for node in range(nnodes):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                       "--node-rank", str(node), "--nproc-per-node", str(nproc),
                       "--master-addr", "127.0.0.1", "--master-port", str(port),
                       ENTRY] + self.args
                out = self.out_dir / f"{name}-{time.monotonic_ns()}-node{node}.log"
                with open(out, "w") as fh:
                    self.procs.append(subprocess.Popen(
                        cmd, env=env, cwd=str(REPO), stdout=fh, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, preexec_fn=_ignore_usr1))
                self.outputs.append(out)
                self.commands.append(cmd)
        except BaseException:
            _kill(self.procs)
            raise
        self.started = time.monotonic()
        self.deadline = self.started + TIMEOUT
        self.seconds: Optional[float] = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        _kill(self.procs)      # a no-op for agents that exited; never leaves a job behind

    def output(self, node: int = 0) -> str:
        return self.outputs[node].read_text(errors="replace")

    def fail(self, why: str) -> None:
        _kill(self.procs)
        parts = [f"{self.name}: {why}"]
        for node, cmd in enumerate(self.commands):
            rc = self.procs[node].poll()
            parts.append(f"--- node {node} (exit {rc}): {' '.join(cmd)}\n"
                         f"{self.output(node)[-6000:]}")
        pytest.fail("\n".join(parts), pytrace=False)

    def workers(self, node: int = 0) -> List[psutil.Process]:
        """The training processes of one node: torchrun's direct children running ENTRY."""
        try:
            children = psutil.Process(self.procs[node].pid).children()
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if ENTRY in child.cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    def wait(self) -> "Job":
        """Wait for every node; any non-zero exit or the timeout kills the job and fails."""
        while True:
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                self.fail(f"a node exited with {codes}")
            if all(c == 0 for c in codes):
                self.seconds = time.monotonic() - self.started
                return self
            if time.monotonic() > self.deadline:
                self.fail(f"timed out after {TIMEOUT}s")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if time.monotonic() > self.deadline:
            self.fail(f"timed out after {TIMEOUT}s")
        if any(p.poll() is not None for p in self.procs):
            self.fail("a node ended early")

    # --- results -----------------------------------------------------------------------------
    def steps(self) -> List[Dict]:
        return [json.loads(l) for l in open(self.log_dir / "drlora_steps.jsonl")]

    def ranks(self) -> List[Dict]:
        return [json.loads(l) for l in open(self.log_dir / "drlora_ranks.jsonl")]


def _run(tmp: Path, name: str, nnodes: int, nproc: int, args: Sequence[str], base) -> Job:
    with Job(tmp, name, nnodes, nproc, args, base) as job:
        return job.wait()


def _rank_events(records: List[Dict]) -> List[Dict]:
    """What must match between runs: when, what kind, the rank map, the saliency (no time)."""
    return [{k: r.get(k) for k in ("iteration", "kind", "rank_map", "saliency")} for r in records]


def _assert_same_training(got: Job, want: Job) -> None:
    a, b = got.steps(), want.steps()
    assert [m["iteration"] for m in a] == [m["iteration"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]   # bitwise (JSON float)
    assert [m["average_rank"] for m in a] == [m["average_rank"] for m in b]
    assert _rank_events(got.ranks()) == _rank_events(want.ranks())


class Reference:
    """A finished single-node run of tests/megatron_runs.py (its log files in its --save)."""

    def __init__(self, path: Path):
        self.log_dir = path

    steps = Job.steps
    ranks = Job.ranks


def one_node(work, base, layout_name: str) -> Reference:
    """`torchrun --nproc-per-node 2` of the same flags, shared with test_megatron_lm_entry.py
    (DP2 is stopped and resumed there; resume is bitwise, so its log is an uninterrupted one)."""
    stop_at = None if layout_name == "ep2" else 3
    extra = LAYOUTS[layout_name] + (["--async-save"] if layout_name == "dp2" else [])
    return Reference(drlora_run(work, base, layout_name, 2, extra, stop_at=stop_at))


# --- two nodes == one node ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", [EP2, []], ids=["ep2", "dp2"])
def test_two_nodes_train_exactly_like_one_node(tmp_path, work, base, layout):
    one = one_node(work, base, "ep2" if layout else "dp2")
    two = _run(tmp_path, "two-nodes", 2, 1, layout, base)
    assert "using world size: 2" in two.output(0)
    events = [r["iteration"] for r in two.ranks() if r["kind"] == "event"]
    assert events == EVENTS
    _assert_same_training(two, one)
    norms = [m["grad_norm"] for m in two.steps()]
    print(f"\n{'EP2' if layout else 'DP2'}: two nodes ({two.seconds:.1f}s) == one node, "
          f"grad norms: {norms}")


# --- preemption ---------------------------------------------------------------------------------


def _worker_rank(p: psutil.Process) -> Optional[int]:
    try:
        return int(p.environ().get("RANK"))
    except (psutil.Error, TypeError, ValueError):
        return None


def _interrupt(job: Job, sig: signal.Signals, only_rank: Optional[int], after: int = 3) -> None:
    """Once rank 0 logged `after` iterations, deliver `sig` to the training processes (all of
    them, or only global rank `only_rank`).

    The workers are frozen with SIGSTOP while the signal is sent and thawed with SIGCONT: the
    signal is then pending in a stopped process and handled the moment it runs again, so the
    job stops a step or two after `after` however slow this machine is, instead of racing the
    end of training."""
    steps = job.log_dir / "drlora_steps.jsonl"
    while True:
        job.check_alive()
        if steps.exists() and len(steps.read_text().splitlines()) >= after:
            break
        time.sleep(0.005)
    workers = [w for node in range(job.nnodes) for w in job.workers(node)]
    if len(workers) != job.nnodes * job.nproc:
        job.fail(f"expected {job.nnodes * job.nproc} training processes, found {workers}")
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    try:
        targets = [w for w in workers if only_rank is None or _worker_rank(w) == only_rank]
        if not targets:
            job.fail(f"no training process with RANK={only_rank}")
        for w in targets:
            w.send_signal(sig)
    finally:
        for w in workers:
            w.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("sig, nnodes, only_rank", [
    (signal.SIGTERM, 2, None),   # scancel / preemption: every node forwards it to its workers
    (signal.SIGUSR1, 1, 1),      # time-limit warning seen by one rank only: MAX agrees to stop
], ids=["sigterm-two-nodes-all-ranks", "sigusr1-one-node-rank1-only"])
def test_signal_saves_exits_zero_and_resumes_bitwise(tmp_path, work, base, sig, nnodes,
                                                     only_rank):
    uninterrupted = one_node(work, base, "ep2")
    ckpt = tmp_path / "ckpt"
    args = ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "100",
            "--exit-signal-handler", "--exit-signal", sig.name] + EP2
    nproc = 2 // nnodes
    with Job(tmp_path, "run", nnodes, nproc, args, base) as job:
        _interrupt(job, sig, only_rank)
        job.wait()                               # every torchrun exited 0 (else it fails)
    assert [p.returncode for p in job.procs] == [0] * nnodes
    stop = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    first = job.steps()
    assert 3 <= stop < ITERS, stop
    assert [m["iteration"] for m in first] == list(range(1, stop + 1))
    assert (ckpt / f"iter_{stop:07d}").is_dir()
    assert "exiting program after receiving SIGTERM" in job.output(0)  # Megatron's wording
    assert f"iteration {ITERS:8d}/" not in job.output(0)

    resumed = _run(tmp_path, "run", nnodes, nproc, args, base)
    assert "DR-LoRA state restored" in resumed.output(0)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    combined = resumed.steps()                   # the same log dir: run 1 + resumed steps
    assert [m["iteration"] for m in combined] == list(range(1, ITERS + 1))
    assert combined[:stop] == first
    _assert_same_training(resumed, uninterrupted)
    print(f"\n{sig.name}: stopped at iteration {stop} ({job.seconds:.1f}s), resumed to {ITERS} "
          f"({resumed.seconds:.1f}s); grad norms of both runs == uninterrupted: "
          f"{[m['grad_norm'] for m in combined]}")
