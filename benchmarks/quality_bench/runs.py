"""Training runs of the quality benchmark: `examples/pretrain_gpt.py @examples/cpu.args ...`
(Megatron-LM's loop plus the DR-LoRA plugin) under torchrun with one process. RUN/command.txt
holds the command, RUN/train.log its output, RUN/iter_*/ the checkpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(REPO, "examples", "pretrain_gpt.py")

# name: label. The controls first, then DR-LoRA and the paper's ablations.
VARIANTS = {
    "uniform_r_target": "LoRA, uniform r_target",
    "uniform_flops": "LoRA, uniform at DR-LoRA's FLOPs (rank r_flops)",
    "static_frequency": "static map ∝ routing frequency (no growth)",
    "uniform_r_max": "LoRA, uniform r_max (2x budget)",
    "drlora": "DR-LoRA (full saliency)",
    "frequency": "DR-LoRA, frequency only",
    "importance": "DR-LoRA, importance only",
    "global": "DR-LoRA, global allocation",
}
DRLORA_FAMILY = ("drlora", "frequency", "importance", "global")


def say(msg: str) -> None:
    print(msg, flush=True)


def run_tool(cmd: List[str], log_path: str, echo: bool = True) -> None:
    """A command (a tool, or torchrun) in a subprocess outside this process's single-process
    world, its output into log_path."""
    if echo:
        say(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"step failed (exit {proc.returncode}); log: {log_path}")


# --------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------
def _loop_flags(iters: int, save_dir: str) -> List[str]:
    # No evaluation inside the loop, one after training; one checkpoint, at the end.
    return ["--train-iters", str(iters), "--log-interval", str(max(1, min(50, iters // 4))),
            "--eval-interval", str(iters + 1), "--eval-iters", "2",
            "--save", save_dir, "--save-interval", str(iters)]


def model_flags(args, paths) -> List[str]:
    # Megatron-LM defaults overridden: dropout, linear biases, weight decay, loader workers.
    return ["@" + os.path.join(REPO, "examples", "cpu.args"),
            "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--ffn-hidden-size", str(2 * args.hidden_size), "--num-attention-heads", "4",
            "--num-experts", str(args.num_experts), "--moe-router-topk", str(args.topk),
            "--moe-ffn-hidden-size", str(args.moe_ffn_hidden_size), "--swiglu",
            "--normalization", "RMSNorm", "--position-embedding-type", "rope",
            "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--weight-decay", "0", "--num-workers", "0",
            "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", str(args.batch_size),
            "--global-batch-size", str(args.batch_size),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths["tokenizer"],
            "--split", "90,10,0", "--ckpt-format", "torch_dist"]


def base_flags(args, paths, base_dir: str) -> List[str]:
    return model_flags(args, paths) + [
        "--data-path", paths["mixed"], "--seed", "1234", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, args.base_iters // 25)),
        "--moe-aux-loss-coeff", "0.01"] + _loop_flags(args.base_iters, base_dir)


def schedule(args) -> Dict[str, int]:
    """Warm-up, growth interval and buffer: growth stops after `budget_at` of the run, so the
    budget is reached well before the end (about `events` events)."""
    iters = args.finetune_iters
    warmup = max(1, iters // 20)
    buffer = iters - int(round(iters * args.budget_at))
    interval = args.grow_interval or max(1, (iters - buffer - warmup) // args.events)
    return {"warmup": warmup, "interval": interval, "buffer": buffer}


def drlora_flags(args) -> List[str]:
    sch = schedule(args)
    return ["--drlora-budget", str(args.r_target), "--drlora-rank-init", str(args.r_init),
            "--drlora-rank-max", str(args.r_max), "--drlora-p-grow", str(args.p_grow),
            "--drlora-grow-interval", str(sch["interval"]),
            "--drlora-grow-buffer", str(sch["buffer"])]


def finetune_flags(args, paths, base_dir: str, run_dir: str, variant: str, seed: int,
                   flops_rank: Optional[int] = None, static_map: Optional[str] = None
                   ) -> List[str]:
    flags = model_flags(args, paths) + [
        "--data-path", paths["target"], "--pretrained-checkpoint", base_dir,
        "--seed", str(1234 + seed), "--lr", str(args.lr), "--lr-decay-style", "linear",
        "--lr-warmup-iters", str(schedule(args)["warmup"]), "--drlora-log-dir", run_dir,
        "--drlora-seed", str(1234 + seed)] + _loop_flags(args.finetune_iters, run_dir)
    uniform = {"uniform_r_target": args.r_target, "uniform_r_max": args.r_max,
               "uniform_flops": flops_rank}
    if variant in uniform:
        if uniform[variant] is None:
            raise ValueError("uniform_flops needs the FLOPs-matched rank (from DR-LoRA's runs)")
        return flags + ["--drlora-method", "uniform", "--drlora-budget", str(uniform[variant])]
    flags += drlora_flags(args)
    if variant == "static_frequency":
        if static_map is None:
            raise ValueError("static_frequency needs the rank map file")
        return flags + ["--drlora-rank-map", static_map]
    if variant in ("frequency", "importance"):
        flags += ["--drlora-saliency", variant]
    elif variant == "global":
        flags += ["--drlora-allocation", "global"]
    elif variant != "drlora":
        raise ValueError(f"unknown variant {variant!r}")
    return flags


def plan(args) -> Dict:
    """tools/plan_drlora_schedule.py on the DR-LoRA runs' flags (its JSON)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "plan_drlora_schedule.py"),
           "--num-layers", str(args.num_layers), "--num-experts", str(args.num_experts),
           "--train-iters", str(args.finetune_iters),
           "--lr-warmup-iters", str(schedule(args)["warmup"])] + drlora_flags(args)
    text = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    result = json.loads(text)
    result["command"] = " ".join(shlex.quote(c) for c in
                                 ["python", "tools/plan_drlora_schedule.py"] + cmd[2:])
    return result


# --------------------------------------------------------------------------------------------
# running and reading
# --------------------------------------------------------------------------------------------
def launch(flags: List[str], run_dir: str, port: int) -> float:
    """One run of examples/pretrain_gpt.py under torchrun, 1 process. Returns its wall-clock
    seconds."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", ENTRY] + flags
    with open(os.path.join(run_dir, "command.txt"), "w") as fh:
        fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    start = time.perf_counter()
    run_tool(cmd, os.path.join(run_dir, "train.log"), echo=False)
    return time.perf_counter() - start


_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): "
                        r"([0-9.]+).*?\| lm loss: ([0-9.eE+-]+)")
_VALID = re.compile(r"validation loss at iteration \d+ on validation set \| lm loss value: "
                    r"([0-9.eE+-]+)")


def read_log(log_path: str) -> Dict:
    """Megatron-LM's log of a run: mean seconds per iteration (weighted by the iterations each
    line covers), the last logged training loss and the validation loss."""
    seconds, iterations, train_loss, valid, last = 0.0, 0, None, None, 0
    for line in open(log_path, errors="replace"):
        m = _ITERATION.search(line)
        if m:
            it = int(m.group(1))
            seconds += float(m.group(2)) / 1000.0 * (it - last)
            iterations += it - last
            last, train_loss = it, float(m.group(3))
        m = _VALID.search(line)
        valid = float(m.group(1)) if m else valid
    return {"seconds_per_iteration": seconds / iterations if iterations else None,
            "final_train_loss": train_loss, "valid_loss": valid}


def _jsonl(path: str) -> List[Dict]:
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def train(flags: List[str], run_dir: str, port: int) -> Dict:
    """A training run and what its files say: Megatron-LM's log, and for DR-LoRA runs
    drlora_steps.jsonl (seconds per step) and drlora_ranks.jsonl (growth events)."""
    seconds = launch(flags, run_dir, port)
    out = dict(read_log(os.path.join(run_dir, "train.log")), seconds=seconds)
    steps = _jsonl(os.path.join(run_dir, "drlora_steps.jsonl"))
    out["drlora_seconds_per_iteration"] = (sum(s["drlora_seconds"] for s in steps)
                                           / len(steps) if steps else 0.0)
    ranks = _jsonl(os.path.join(run_dir, "drlora_ranks.jsonl"))
    out["events"] = [r["iteration"] for r in ranks if r["kind"] == "event"]
    out["logged_rank_map"] = ranks[-1]["rank_map"] if ranks else None
    return out
