#!/usr/bin/env python
"""Quality of DR-LoRA against uniform LoRA on the bundled synthetic multi-domain task.

    python benchmarks/quality.py [--out bench_out/quality] [--seeds 3] [--finetune-iters 300]
        [--variants uniform_r_target,uniform_r_max,drlora,frequency,importance,global]

A small-scale version of the paper's comparison (arXiv 2601.04823, Tables 1, 12, 13):

1. data: the synthetic corpus (tools/generate_corpus.py, all domains), a SentencePiece tokenizer
   (tools/train_tokenizer.py) and Megatron indexed datasets with a response-only loss mask
   (tools/preprocess_data.py), the demo's steps; the target domain is split by prompt: one
   prompt in ten (crc32) is held out and appears in no training data (base or fine-tune), so
   fine-tuning records and held-out prompts share the distribution but no prompt;
2. one tiny MoE base trained on all domains (full model), shared by every variant and seed;
3. for every seed and variant, a fine-tune on the target domain under the same parameter
   budget r_target (except uniform_r_max, which is LoRA at r_max: twice the budget);
4. evaluation in this process: the model at TP1/EP1 with the base checkpoint, apply_drlora and
   the adapter checkpoint (adapters, router, rank map): held-out loss on response tokens and
   task accuracy by greedy generation + exact match (synthetic.is_correct);
5. where the DR-LoRA ranks went: routing frequency per expert (forward hooks on the routers) on
   target-domain text vs the other domains, against each run's final rank map.

Every training run (the base, each fine-tune) is `examples/pretrain_gpt.py @examples/cpu.args
...` (Megatron-LM's loop plus the DR-LoRA plugin) under torchrun with one process; RUN/command.txt
holds the command, RUN/train.log its output, RUN/iter_*/ the checkpoint. Per-run figures come from
the run's files: seconds per iteration and the validation loss from Megatron-LM's log, DR-LoRA
seconds per step from drlora_steps.jsonl, growth events from drlora_ranks.jsonl. The validation
loss before fine-tuning is one `--skip-train` run per seed (runs/before_sN/) with the fine-tune
flags: LoRA's B starts at zero, so it is the base model on that seed's validation split for
every variant. The evaluator builds its model from the run's flags (parse_megatron_args +
MoEModelArgs.from_megatron_args) and the DR-LoRA config from the checkpoint's DR-LoRA state.

Output: OUT/quality.md (tables, mean +- std over seeds) and OUT/quality.json (every run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_drlora.launch.ports import free_port  # noqa: E402

VARIANTS = {
    # name: label (the flags of each variant are in finetune_flags)
    "uniform_r_target": "LoRA, uniform r_target",
    "uniform_r_max": "LoRA, uniform r_max (2x budget)",
    "drlora": "DR-LoRA (full saliency)",
    "frequency": "DR-LoRA, frequency only",
    "importance": "DR-LoRA, importance only",
    "global": "DR-LoRA, global allocation",
}
DRLORA_FAMILY = ("drlora", "frequency", "importance", "global")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def _run_tool(cmd: List[str], log_path: str, echo: bool = True) -> None:
    """A command (a tool, or torchrun) in a subprocess outside this process's single-process
    world, its output into log_path."""
    if echo:
        _say(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}); log: {log_path}")


def _by_len(items, length) -> List[List]:
    """`items` grouped by length(item), so each group batches without padding."""
    groups: Dict[int, List] = {}
    for item in items:
        groups.setdefault(length(item), []).append(item)
    return list(groups.values())


def _mean_std(values: Sequence[float]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return sum(values) / len(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# 1. data
# --------------------------------------------------------------------------------------------
HELD_OUT_BUCKETS = 10  # one prompt in ten (by crc32) is held out


def _held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0


def _draw(domain: str, n: int, seed: int, keep) -> List[Dict]:
    """n records of `domain` (seeded, reproducible) whose prompt passes `keep`."""
    from megatron_drlora.data.synthetic import generate

    pool = generate(domain, max(1000, 20 * n), seed)
    records = [r for r in pool if keep(r["prompt"])][:n]
    if len(records) < n:
        raise SystemExit(f"could draw only {len(records)} of {n} {domain} records for this "
                         f"split; ask for fewer (--finetune-records / --eval-prompts)")
    return records


def prepare_data(args, out: str) -> Dict:
    from megatron_drlora.data.synthetic import DOMAINS, generate, iter_jsonl, write_jsonl

    data = os.path.join(out, "data")
    corpus = os.path.join(data, "corpus")
    stamp = {"num_per_domain": args.num_per_domain, "corpus_seed": args.corpus_seed,
             "vocab_size": args.vocab_size, "target": args.target_domain,
             "eval_prompts": args.eval_prompts, "finetune_records": args.finetune_records,
             "base_includes_target": args.base_includes_target, "split": "crc32 buckets"}
    stamp_path = os.path.join(data, "settings.json")
    paths = {"tokenizer": os.path.join(data, "tokenizer.model"),
             "mixed": os.path.join(data, "mixed_text_document"),
             "target": os.path.join(data, "target_text_document"),
             "heldout": os.path.join(data, "heldout.jsonl"),
             "routing": os.path.join(data, "routing_probe.jsonl")}
    if os.path.isfile(stamp_path) and json.load(open(stamp_path)) == stamp and \
            all(os.path.exists(p) for p in (paths["tokenizer"], paths["heldout"],
                                            paths["routing"], paths["target"] + ".idx")):
        _say(f"> data: reusing {data}")
        return paths
    if os.path.isdir(data):
        shutil.rmtree(data)
    os.makedirs(data)
    py = sys.executable
    base_domains = [d for d in DOMAINS if args.base_includes_target or d != args.target_domain]
    # Base corpus: the demo's command (all domains but the target unless asked otherwise).
    _run_tool([py, "tools/generate_corpus.py", "--domains", ",".join(base_domains),
               "--num-per-domain", str(args.num_per_domain), "--seed", str(args.corpus_seed),
               "--format", "instruction", "--out", corpus], os.path.join(data, "corpus.log"))
    # Target domain: a prompt is held out when its crc32 falls in the held-out bucket, so the
    # fine-tuning records and the held-out prompts come from the same distribution and never
    # share a prompt (excluding already-drawn prompts instead would leave only the rarest
    # prompt kinds in the held-out set). Base-corpus records of the target domain (only with
    # --base-includes-target) with a held-out prompt are dropped from the base corpus.
    mixed_path = os.path.join(corpus, "mixed.jsonl")
    mixed = [rec for _, rec in iter_jsonl(mixed_path)
             if not (rec["domain"] == args.target_domain and _held_out(rec["prompt"]))]
    write_jsonl(mixed_path, mixed)
    seen = {rec["prompt"] for rec in mixed}
    train_records = _draw(args.target_domain, args.finetune_records, args.corpus_seed + 1,
                          lambda p: not _held_out(p))
    heldout = _draw(args.target_domain, args.eval_prompts, args.corpus_seed + 99_991,
                    lambda p: _held_out(p) and p not in seen)
    target_file = os.path.join(data, "target.jsonl")
    write_jsonl(target_file, train_records)
    write_jsonl(paths["heldout"], heldout)
    _run_tool([py, "tools/train_tokenizer.py", "--input", os.path.join(corpus, "mixed.jsonl"),
               target_file, "--vocab-size", str(args.vocab_size), "--model-prefix",
               os.path.join(data, "tokenizer")], os.path.join(data, "tokenizer.log"))
    for name, source in (("mixed", os.path.join(corpus, "mixed.jsonl")),
                         ("target", target_file)):
        _run_tool([py, "tools/preprocess_data.py", "--input", source,
                   "--tokenizer-model", paths["tokenizer"], "--output-prefix",
                   os.path.join(data, name), "--append-eod"],
                  os.path.join(data, f"preprocess_{name}.log"))
    # Routing probe: target held-out text and the same amount of every other domain.
    probe = list(heldout)
    for domain in DOMAINS:
        if domain != args.target_domain:
            probe += generate(domain, args.eval_prompts, seed=args.corpus_seed + 99_991)
    write_jsonl(paths["routing"], probe)
    with open(stamp_path, "w") as fh:
        json.dump(stamp, fh)
    return paths


# --------------------------------------------------------------------------------------------
# 2./3. training: examples/pretrain_gpt.py (Megatron-LM's loop + DR-LoRA) under torchrun
# --------------------------------------------------------------------------------------------
ENTRY = os.path.join(REPO, "examples", "pretrain_gpt.py")


def _loop_flags(iters: int, save_dir: str) -> List[str]:
    # No evaluation inside the loop, one after training: Megatron-LM then builds the validation
    # set and reads its batches exactly as a `--skip-train` run of the same flags does, so the
    # losses before and after fine-tuning are over the same tokens. One checkpoint, at the end.
    return ["--train-iters", str(iters), "--log-interval", str(max(1, min(50, iters // 4))),
            "--eval-interval", str(iters + 1), "--eval-iters", "4",
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
    warmup = max(1, args.finetune_iters // 15)
    interval = args.grow_interval or max(1, args.finetune_iters // 15)
    return {"warmup": warmup, "interval": interval, "buffer": warmup}


def finetune_flags(args, paths, base_dir: str, run_dir: str, variant: str, seed: int) -> List[str]:
    sch = schedule(args)
    flags = model_flags(args, paths) + [
        "--data-path", paths["target"], "--pretrained-checkpoint", base_dir,
        "--seed", str(1234 + seed), "--lr", str(args.lr), "--lr-decay-style", "linear",
        "--lr-warmup-iters", str(sch["warmup"]), "--drlora-log-dir", run_dir,
        "--drlora-seed", str(1234 + seed)] + _loop_flags(args.finetune_iters, run_dir)
    if variant == "uniform_r_target":
        return flags + ["--drlora-method", "uniform", "--drlora-budget", str(args.r_target)]
    if variant == "uniform_r_max":
        return flags + ["--drlora-method", "uniform", "--drlora-budget", str(args.r_max)]
    flags += ["--drlora-budget", str(args.r_target), "--drlora-rank-init", str(args.r_init),
              "--drlora-rank-max", str(args.r_max), "--drlora-p-grow", str(args.p_grow),
              "--drlora-grow-interval", str(sch["interval"]),
              "--drlora-grow-buffer", str(sch["buffer"])]
    if variant in ("frequency", "importance"):
        flags += ["--drlora-saliency", variant]
    elif variant == "global":
        flags += ["--drlora-allocation", "global"]
    elif variant != "drlora":
        raise ValueError(f"unknown variant {variant!r}")
    return flags


def launch(flags: List[str], run_dir: str) -> float:
    """One run of examples/pretrain_gpt.py under torchrun, 1 process: the command goes to
    RUN/command.txt, stdout and stderr to RUN/train.log. Returns its wall-clock seconds."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", ENTRY] + flags
    with open(os.path.join(run_dir, "command.txt"), "w") as fh:
        fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    start = time.perf_counter()
    _run_tool(cmd, os.path.join(run_dir, "train.log"), echo=False)
    return time.perf_counter() - start


_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): "
                        r"([0-9.]+).*?\| lm loss: ([0-9.eE+-]+)")
_VALID = re.compile(r"validation loss at iteration \d+ on validation set \| lm loss value: "
                    r"([0-9.eE+-]+)")


def read_log(log_path: str) -> Dict:
    """Megatron-LM's log of a run: mean seconds per iteration (its `elapsed time per
    iteration`, weighted by the iterations each line covers), the last logged training loss
    (averaged over the last log interval) and the validation loss."""
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


def train(flags: List[str], run_dir: str) -> Dict:
    """A training run and what its files say: Megatron-LM's log, and for DR-LoRA runs
    drlora_steps.jsonl (seconds per step) and drlora_ranks.jsonl (growth events)."""
    seconds = launch(flags, run_dir)
    out = dict(read_log(os.path.join(run_dir, "train.log")), seconds=seconds)
    steps = _jsonl(os.path.join(run_dir, "drlora_steps.jsonl"))
    out["drlora_seconds_per_iteration"] = (sum(s["drlora_seconds"] for s in steps)
                                           / len(steps) if steps else 0.0)
    ranks = _jsonl(os.path.join(run_dir, "drlora_ranks.jsonl"))
    out["events"] = [r["iteration"] for r in ranks if r["kind"] == "event"]
    out["logged_rank_map"] = ranks[-1]["rank_map"] if ranks else None
    return out


# --------------------------------------------------------------------------------------------
# 4. evaluation: single-process model, greedy decoding, held-out loss
# --------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, paths: Dict, max_new_tokens: int = 12):
        from megatron_drlora.data.synthetic import iter_jsonl
        from megatron_drlora.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(paths["tokenizer"])
        self.heldout = [rec for _, rec in iter_jsonl(paths["heldout"])]
        self.probe = [rec for _, rec in iter_jsonl(paths["routing"])]
        self.max_new = max_new_tokens

    def load(self, flags: List[str], run_dir: Optional[str]):
        """The model of a run at TP1/EP1, built from the run's flags: the base checkpoint,
        then (run_dir) DR-LoRA with the checkpoint's config, its adapters, router, rank map."""
        import torch
        from megatron.core import dist_checkpointing

        from megatron_drlora.checkpoint import drlora_state, load_adapters, load_base_checkpoint
        from megatron_drlora.checkpoint import resolve
        from megatron_drlora.config import DRLoRAConfig
        from megatron_drlora.inject import apply_drlora
        from megatron_drlora.megatron_lm.arguments import parse_megatron_args
        from megatron_drlora.modeling import MoEModelArgs, build_gpt_moe, padded_vocab_size
        from megatron_drlora.modeling import transformer_config
        from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

        args = parse_megatron_args(flags + ["--tensor-model-parallel-size", "1",
                                            "--expert-model-parallel-size", "1"])
        initialize_megatron_parallel(ParallelSizes(), seed=args.seed)
        vocab = padded_vocab_size(self.tokenizer.vocab_size, 1,
                                  args.make_vocab_size_divisible_by)
        model_args = MoEModelArgs.from_megatron_args(args, vocab)
        config = transformer_config(model_args)
        config.perform_initialization = False
        chunks = build_gpt_moe(model_args, config)
        load_base_checkpoint(args.pretrained_checkpoint or args.save, chunks)
        handle, rank_map = None, None
        if run_dir is not None:
            path = resolve(run_dir, "--load")
            state = drlora_state(dist_checkpointing.load_common_state_dict(path))
            handle = apply_drlora(chunks, DRLoRAConfig.from_dict(state["config"]),
                                  log=lambda _: None)
            loaded = load_adapters(path, chunks, handle)
            rank_map = torch.as_tensor(loaded["rank_map"], dtype=torch.int64)
        model = chunks[0]
        model.eval()
        return model, handle, rank_map

    def _encode(self, rec) -> tuple:
        eod = self.tokenizer.eod
        # Training packs documents, so a prompt always follows the previous document's eod.
        prompt = [eod] + self.tokenizer.tokenize(rec["prompt"])
        return prompt, self.tokenizer.tokenize(rec["response"]) + [eod]

    def _forward(self, model, rows: List[List[int]], labels=None):
        import torch

        tokens = torch.tensor(rows, dtype=torch.long)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        return model(tokens, pos, None, labels=lab)

    def score(self, model, batch: int = 64) -> Dict:
        """Held-out loss (response tokens + eod) and greedy exact-match accuracy."""
        import torch

        from megatron_drlora.data.synthetic import is_correct

        domain = self.heldout[0]["domain"]
        encoded = [self._encode(r) for r in self.heldout]
        loss_sum, loss_count = 0.0, 0
        with torch.no_grad():
            for idx in _by_len(range(len(encoded)), lambda i: len(sum(encoded[i], []))):
                for s in range(0, len(idx), batch):
                    chunk = idx[s:s + batch]
                    full = [encoded[i][0] + encoded[i][1] for i in chunk]
                    losses = self._forward(model, [f[:-1] for f in full],
                                           [f[1:] for f in full]).float()
                    for row, i in enumerate(chunk):
                        start = len(encoded[i][0]) - 1  # predicts the first response token
                        loss_sum += float(losses[row, start:].sum())
                        loss_count += losses.shape[1] - start
            # greedy decoding, prompts of equal length batched together
            correct, samples = 0, []
            vocab = self.tokenizer.vocab_size
            for idx in _by_len(range(len(encoded)), lambda i: len(encoded[i][0])):
                for s in range(0, len(idx), batch):
                    chunk = idx[s:s + batch]
                    rows = [list(encoded[i][0]) for i in chunk]
                    outs: List[List[int]] = [[] for _ in chunk]
                    done = [False] * len(chunk)
                    for _ in range(self.max_new):
                        logits = self._forward(model, rows)
                        nxt = logits[:, -1, :vocab].argmax(dim=-1).tolist()
                        for j, t in enumerate(nxt):
                            if not done[j] and t != self.tokenizer.eod:
                                outs[j].append(t)
                            done[j] = done[j] or t == self.tokenizer.eod
                            rows[j].append(t)
                        if all(done):
                            break
                    for j, i in enumerate(chunk):
                        rec = self.heldout[i]
                        answer = self.tokenizer.detokenize(outs[j])
                        ok = is_correct(domain, rec["prompt"], answer)
                        correct += ok
                        if len(samples) < 8:
                            samples.append({"prompt": rec["prompt"], "answer": answer,
                                            "expected": rec["response"], "correct": ok})
        return {"heldout_loss": loss_sum / max(1, loss_count),
                "accuracy": correct / len(self.heldout), "samples": samples}

    def routing(self, model, batch: int = 64) -> Dict[str, List[List[float]]]:
        """Fraction of routed (token, expert) assignments per [MoE layer, expert], per domain,
        over the full texts (prompt + response) of the routing probe."""
        import torch

        from megatron_drlora.compat import megatron as mcompat

        routers = [layer.mlp.router for layer in model.decoder.layers
                   if mcompat.is_moe_layer(getattr(layer, "mlp", None))]
        current = {"counts": None}

        def hook(index):
            def fn(module, args, output):
                routing_map = output[1]
                current["counts"][index] += routing_map.sum(0).to(torch.float64).cpu()
            return fn

        handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
        by_domain: Dict[str, List] = {}
        for rec in self.probe:
            by_domain.setdefault(rec["domain"], []).append(rec)
        result = {}
        try:
            with torch.no_grad():
                for domain, recs in by_domain.items():
                    E = routers[0].weight.shape[0]
                    current["counts"] = torch.zeros(len(routers), E, dtype=torch.float64)
                    for rows in _by_len([sum(self._encode(r), []) for r in recs], len):
                        for s in range(0, len(rows), batch):
                            self._forward(model, rows[s:s + batch])
                    counts = current["counts"]
                    result[domain] = (counts / counts.sum(dim=1, keepdim=True)).tolist()
        finally:
            for h in handles:
                h.remove()
        return result


# --------------------------------------------------------------------------------------------
# 5. where did the ranks go
# --------------------------------------------------------------------------------------------
def _spearman(x: List[float], y: List[float]) -> Optional[float]:
    def ranks(v):  # ties share the mean of their positions
        first, last = {}, {}
        for i, value in enumerate(sorted(v)):
            first.setdefault(value, i)
            last[value] = i
        return [(first[value] + last[value]) / 2.0 for value in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def allocation_analysis(rank_map, routing: Dict, target: str, r_init: int, topk: int,
                        hidden: int, ffn: int, r_target: int) -> Dict:
    """Did the grown ranks go to the experts the target domain routes to?"""
    import torch

    ranks = torch.as_tensor(rank_map, dtype=torch.float64)  # [L, E, M]
    expert_rank = ranks.mean(dim=2)
    f_target = torch.tensor(routing[target], dtype=torch.float64)
    others = [torch.tensor(v, dtype=torch.float64) for d, v in routing.items() if d != target]
    f_other = torch.stack(others).mean(dim=0)
    L, E = expert_rank.shape
    quarter = max(1, E // 4)
    rho_t, rho_s, share_top, share_bottom = [], [], [], []
    for l in range(L):
        rho_t.append(_spearman(expert_rank[l].tolist(), f_target[l].tolist()))
        specificity = (f_target[l] / f_other[l].clamp_min(1e-12)).log()
        rho_s.append(_spearman(expert_rank[l].tolist(), specificity.tolist()))
        grown = (ranks[l] - r_init).clamp_min(0).sum(dim=1)  # per expert
        total = float(grown.sum())
        order = torch.argsort(f_target[l], descending=True)
        if total > 0:
            share_top.append(float(grown[order[:quarter]].sum()) / total)
            share_bottom.append(float(grown[order[-quarter:]].sum()) / total)
    # LoRA FLOPs per target token: each routed (token, expert) pays 2 r (k + d) per module
    # (k + d = hidden + ffn for up and down); uniform r_target as the reference.
    per_token = float((f_target * topk * (ranks * 2 * (hidden + ffn)).sum(dim=2)).sum())
    uniform = L * topk * ranks.shape[2] * 2 * r_target * (hidden + ffn)

    def avg(v):
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else None

    return {"spearman_rank_vs_target_frequency": avg(rho_t),
            "spearman_rank_vs_target_specificity": avg(rho_s),
            "spearman_per_layer": rho_t,
            "grown_share_top_quarter_target_experts": avg(share_top),
            "grown_share_bottom_quarter_target_experts": avg(share_bottom),
            "lora_flops_per_target_token_ratio_to_uniform": per_token / uniform}


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _fmt(mean, std, scale=1.0, digits=3) -> str:
    return "-" if mean is None else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summarize(results: Dict, args) -> Dict:
    table = {}
    for variant in args.variants:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        if not runs:
            continue
        row = {"label": VARIANTS[variant], "seeds": len(runs),
               "lora_params": runs[0]["lora_params"]}
        for key in ("heldout_loss", "accuracy", "valid_loss", "seconds_per_iteration"):
            row[key] = _mean_std([r[key] for r in runs])
        alloc = [r["allocation"] for r in runs if r.get("allocation")]
        for key in ("spearman_rank_vs_target_frequency", "grown_share_top_quarter_target_experts",
                    "lora_flops_per_target_token_ratio_to_uniform"):
            row[key] = _mean_std([a[key] for a in alloc]) if alloc else (None, None)
        table[variant] = row
    return table


def markdown(results: Dict, args) -> str:
    s = results["settings"]
    lines = [f"DR-LoRA quality benchmark: target domain `{s['target_domain']}`, "
             f"{s['num_layers']} layers x {s['num_experts']} experts (top-{s['topk']}), hidden "
             f"{s['hidden_size']}, expert ffn {s['moe_ffn_hidden_size']}; ranks r_init "
             f"{s['r_init']} / r_target {s['r_target']} / r_max {s['r_max']}; base "
             f"{s['base_iters']} iterations, fine-tune {s['finetune_iters']} iterations x "
             f"{s['batch_size']} sequences of 64 tokens; {len(s['seeds'])} seed(s); held-out "
             f"prompts: {s['eval_prompts']}.", "",
             "| variant | LoRA params (active at end) | held-out loss | accuracy % | "
             "valid loss (trainer) | s/iteration |", "|---|---|---|---|---|---|"]
    b = results["base"]
    lines.append(f"| base model, no fine-tuning | 0 | {b['heldout_loss']:.3f} | "
                 f"{100 * b['accuracy']:.1f} | - | - |")
    for variant, row in results["table"].items():
        lines.append(f"| {row['label']} | {row['lora_params']:,} | "
                     f"{_fmt(*row['heldout_loss'])} | {_fmt(*row['accuracy'], 100, 1)} | "
                     f"{_fmt(*row['valid_loss'])} | {_fmt(*row['seconds_per_iteration'], 1, 2)} |")
    fam = [(v, r) for v, r in results["table"].items() if v in DRLORA_FAMILY]
    if fam:
        lines += ["", "Where the grown ranks went (routing measured with the base model's routers "
                  "on held-out text; mean ± std over seeds):", "",
                  "| variant | Spearman(expert rank, target routing freq.), mean over layers | "
                  "share of grown ranks in the top-quarter target experts (uniform: 0.25) | "
                  "LoRA FLOPs per target token / uniform r_target |", "|---|---|---|---|"]
        for v, r in fam:
            lines.append(f"| {r['label']} | "
                         f"{_fmt(*r['spearman_rank_vs_target_frequency'], 1, 2)} | "
                         f"{_fmt(*r['grown_share_top_quarter_target_experts'], 1, 2)} | "
                         f"{_fmt(*r['lora_flops_per_target_token_ratio_to_uniform'], 1, 3)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DR-LoRA quality benchmark (synthetic multi-domain)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "benchmarks", "quality"),
                   help="output folder (default under runs/, which git ignores)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (0..N-1)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--target-domain", default="sort",
                   help="fine-tuning domain (one with many distinct prompts: sort, reverse, "
                        "code)")
    p.add_argument("--finetune-iters", type=int, default=300)
    p.add_argument("--base-iters", type=int, default=250,
                   help="base training iterations (short: the base knows the target domain "
                        "only partly, so fine-tuning has something to learn)")
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per iteration")
    p.add_argument("--num-per-domain", type=int, default=1500,
                   help="base corpus records per domain")
    p.add_argument("--finetune-records", type=int, default=3000,
                   help="target-domain records for fine-tuning (a separate draw)")
    p.add_argument("--base-includes-target", action=argparse.BooleanOptionalAction, default=True,
                   help="train the base on the target domain too (default; its held-out "
                        "prompts never), or not (--no-base-includes-target: a new domain)")
    p.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts")
    for flag, default in (("--corpus-seed", 7), ("--vocab-size", 512), ("--num-layers", 4),
                          ("--hidden-size", 128), ("--moe-ffn-hidden-size", 128),
                          ("--num-experts", 16), ("--topk", 2), ("--r-init", 2),
                          ("--r-target", 4), ("--r-max", 8)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--p-grow", type=float, default=0.5)
    p.add_argument("--grow-interval", type=int, default=None,
                   help="steps between growth events (default finetune_iters // 15)")
    p.add_argument("--json", default=None, help="JSON path (default OUT/quality.json)")
    p.add_argument("--fresh", action="store_true", help="retrain the base even if cached")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    paths = prepare_data(args, out)

    # One single-process "world" for the evaluation in this process (training runs under
    # torchrun in subprocesses, without these variables).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    for key in ("LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        os.environ.pop(key, None)

    base_dir = os.path.join(out, "base")
    bflags = base_flags(args, paths, base_dir)
    from megatron_drlora.data.tokenizer import file_sha256

    stamp = {"flags": bflags, "tokenizer_sha256": file_sha256(paths["tokenizer"]),
             "data_settings": json.load(open(os.path.join(out, "data", "settings.json")))}
    stamp_path = os.path.join(base_dir, "bench_settings.json")
    if args.fresh or not (os.path.isfile(stamp_path) and json.load(open(stamp_path)) == stamp):
        shutil.rmtree(base_dir, ignore_errors=True)
        _say(f"> base: {args.base_iters} iterations on "
             f"{'all domains' if args.base_includes_target else 'all domains but the target'}"
             f" -> {base_dir}")
        base_train = train(bflags, base_dir)
        with open(stamp_path, "w") as fh:
            json.dump(stamp, fh)
        _say(f"  done in {base_train['seconds']:.0f} s, final train loss "
             f"{base_train['final_train_loss']}, validation loss {base_train['valid_loss']}")
    else:
        _say(f"> base: reusing {base_dir}")

    evaluator = Evaluator(paths)
    model, _, _ = evaluator.load(bflags, None)
    base_scores = evaluator.score(model)
    base_routing = evaluator.routing(model)
    del model
    _say(f"> base model on held-out '{args.target_domain}': loss "
         f"{base_scores['heldout_loss']:.3f}, accuracy {100 * base_scores['accuracy']:.1f}%")

    settings = {k: getattr(args, k) for k in (
        "target_domain", "finetune_iters", "base_iters", "lr", "batch_size", "num_per_domain",
        "finetune_records", "base_includes_target", "corpus_seed", "vocab_size", "eval_prompts",
        "num_layers", "hidden_size", "moe_ffn_hidden_size", "num_experts", "topk", "r_init",
        "r_target", "r_max", "p_grow")}
    settings.update(seeds=list(range(args.seeds)), variants=args.variants,
                    schedule=schedule(args))
    results = {"settings": settings, "base": base_scores, "base_routing": base_routing,
               "runs": []}
    for seed in range(args.seeds):
        # Validation loss before fine-tuning: the fine-tune flags with --skip-train. LoRA's B
        # starts at zero, so the adapted model is the base: one run serves every variant.
        before_dir = os.path.join(out, "runs", f"before_s{seed}")
        shutil.rmtree(before_dir, ignore_errors=True)
        _say(f"> validation loss before fine-tuning, seed {seed} (--skip-train) -> {before_dir}")
        launch(finetune_flags(args, paths, base_dir, before_dir, args.variants[0], seed)
               + ["--skip-train"], before_dir)
        before = read_log(os.path.join(before_dir, "train.log"))["valid_loss"]
        if before is None:
            raise SystemExit(f"{before_dir}/train.log: Megatron-LM printed no validation loss")
        for variant in args.variants:
            run_dir = os.path.join(out, "runs", f"{variant}_s{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # no stale checkpoints or logs
            flags = finetune_flags(args, paths, base_dir, run_dir, variant, seed)
            _say(f"> fine-tune {variant} seed {seed} -> {run_dir}")
            record = {"variant": variant, "seed": seed, "run_dir": run_dir,
                      "valid_loss_before": before}
            record.update(train(flags, run_dir))
            model, handle, rank_map = evaluator.load(flags, run_dir)
            logged = record.pop("logged_rank_map")
            if logged is not None and logged != rank_map.tolist():
                raise SystemExit(f"{run_dir}: the checkpoint's rank map differs from the last "
                                 f"one in drlora_ranks.jsonl")
            record.update(evaluator.score(model))
            L, E, M = handle.rank_map_shape()
            total_rank = int(rank_map.sum())
            record["lora_params"] = total_rank * (args.hidden_size + args.moe_ffn_hidden_size)
            record["final_mean_rank"] = total_rank / (L * E * M)
            if variant in DRLORA_FAMILY:
                record["rank_map"] = rank_map.tolist()
                record["allocation"] = allocation_analysis(
                    rank_map, base_routing, args.target_domain, args.r_init, args.topk,
                    args.hidden_size, args.moe_ffn_hidden_size, args.r_target)
            del model, handle
            _say(f"  {record['seconds']:.0f} s; held-out loss {record['heldout_loss']:.3f}, "
                 f"accuracy {100 * record['accuracy']:.1f}%, mean rank "
                 f"{record['final_mean_rank']:.2f}")
            results["runs"].append(record)
    results["table"] = summarize(results, args)
    results["wall_seconds"] = time.perf_counter() - t_start
    text = markdown(results, args)
    with open(os.path.join(out, "quality.md"), "w") as fh:
        fh.write(text + "\n")
    json_path = args.json or os.path.join(out, "quality.json")
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print("\n" + text)
    _say(f"\nwrote {os.path.join(out, 'quality.md')} and {json_path} "
         f"({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import __main__
    sys.exit(main())
