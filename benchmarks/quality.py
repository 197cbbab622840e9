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
3. for every seed and variant, a fine-tune on the target domain through the training entry
   (megatron_drlora.training.loop.pretrain, i.e. examples/pretrain_gpt.py, run in this
   process; the equivalent command is written to RUN/command.txt) under the same parameter
   budget r_target (except uniform_r_max, which is LoRA at r_max: twice the budget);
4. evaluation in this process: the model at TP1/EP1 with the base checkpoint, apply_drlora and
   the adapter checkpoint (adapters, router, rank map): held-out loss on response tokens and
   task accuracy by greedy generation + exact match (synthetic.is_correct);
5. where the DR-LoRA ranks went: routing frequency per expert (forward hooks on the routers) on
   target-domain text vs the other domains, against each run's final rank map.

Output: OUT/quality.md (tables, mean +- std over seeds) and OUT/quality.json (every run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

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
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _run_tool(cmd: List[str], log_path: str) -> None:
    _say(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}); log: {log_path}")


def _mean_std(values: Sequence[float]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


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
# 2./3. training (the training entry, in this process)
# --------------------------------------------------------------------------------------------
def model_flags(args, paths) -> List[str]:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--ffn-hidden-size", str(2 * args.hidden_size), "--num-attention-heads", "4",
            "--num-experts", str(args.num_experts), "--moe-router-topk", str(args.topk),
            "--moe-ffn-hidden-size", str(args.moe_ffn_hidden_size), "--swiglu",
            "--normalization", "RMSNorm", "--position-embedding-type", "rope",
            "--seq-length", "64", "--micro-batch-size", str(args.batch_size),
            "--global-batch-size", str(args.batch_size),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths["tokenizer"],
            "--split", "90,10,0"]


def base_flags(args, paths, base_dir: str) -> List[str]:
    return model_flags(args, paths) + [
        "--data-path", paths["mixed"], "--seed", "1234",
        "--train-iters", str(args.base_iters), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, args.base_iters // 25)),
        "--moe-aux-loss-coeff", "0.01", "--log-interval", "50",
        "--save", base_dir, "--drlora-log-dir", base_dir]


def schedule(args) -> Dict[str, int]:
    warmup = max(1, args.finetune_iters // 15)
    interval = args.grow_interval or max(1, args.finetune_iters // 15)
    return {"warmup": warmup, "interval": interval, "buffer": warmup}


def finetune_flags(args, paths, base_dir: str, run_dir: str, variant: str, seed: int) -> List[str]:
    sch = schedule(args)
    flags = model_flags(args, paths) + [
        "--data-path", paths["target"], "--pretrained-checkpoint", base_dir,
        "--seed", str(1234 + seed), "--train-iters", str(args.finetune_iters),
        "--lr", str(args.lr), "--lr-decay-style", "linear",
        "--lr-warmup-iters", str(sch["warmup"]), "--log-interval", "50",
        "--eval-interval", str(args.finetune_iters), "--eval-iters", "4",
        "--save", run_dir, "--drlora-log-dir", run_dir, "--drlora-seed", str(1234 + seed)]
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


def train(flags: List[str], log_dir: str) -> Dict:
    """One run of the training entry in this process (stdout into log_dir/train.log)."""
    from megatron_drlora.training.loop import pretrain

    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "command.txt"), "w") as fh:
        fh.write("python examples/pretrain_gpt.py " + " ".join(shlex.quote(f) for f in flags)
                 + "\n")
    start = time.perf_counter()
    with open(os.path.join(log_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
        summary = pretrain(flags)
    seconds = time.perf_counter() - start
    if summary.get("stopped"):
        raise SystemExit(f"training in {log_dir} stopped early ({summary['stopped']}); see "
                         f"{os.path.join(log_dir, 'train.log')}")
    history = summary["history"]
    return {"seconds": seconds,
            "seconds_per_iteration": sum(h["seconds"] for h in history) / max(1, len(history)),
            "drlora_seconds_per_iteration": (sum(h.get("drlora_seconds", 0.0) for h in history)
                                             / max(1, len(history))),
            "final_train_loss": history[-1]["loss"] if history else None,
            "valid_loss_before": summary.get("initial_valid_loss"),
            "valid_loss": summary.get("final_valid_loss"),
            "events": summary.get("events", [])}


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
        """The model of a run at TP1/EP1: base checkpoint, then adapters + router + rank map."""
        import torch

        from megatron_drlora.checkpoint import load_base_checkpoint, load_checkpoint
        from megatron_drlora.inject import apply_drlora
        from megatron_drlora.modeling import build_gpt_moe
        from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel
        from megatron_drlora.training.arguments import parse_args
        from megatron_drlora.training.loop import _model_args, padded_vocab_size

        args = parse_args(flags)
        initialize_megatron_parallel(ParallelSizes(), seed=args.seed)
        vocab = padded_vocab_size(self.tokenizer.vocab_size, 1)
        chunks = build_gpt_moe(_model_args(args, vocab))
        load_base_checkpoint(args.pretrained_checkpoint or args.save, chunks)
        handle, rank_map = None, None
        if args.drlora is not None:
            handle = apply_drlora(chunks, args.drlora, log=lambda _: None)
            loaded = load_checkpoint(run_dir, chunks, handle, optimizer=None)
            rank_map = torch.as_tensor(loaded["drlora"]["rank_map"], dtype=torch.int64)
            handle.set_rank_map(rank_map)
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
        by_len: Dict[int, List[int]] = {}
        for i, (p, r) in enumerate(encoded):
            by_len.setdefault(len(p) + len(r), []).append(i)
        with torch.no_grad():
            for idx in by_len.values():
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
            by_len = {}
            for i, (p, _) in enumerate(encoded):
                by_len.setdefault(len(p), []).append(i)
            vocab = self.tokenizer.vocab_size
            for idx in by_len.values():
                for s in range(0, len(idx), batch):
                    chunk = idx[s:s + batch]
                    rows = [list(encoded[i][0]) for i in chunk]
                    outs: List[List[int]] = [[] for _ in chunk]
                    done = [False] * len(chunk)
                    for _ in range(self.max_new):
                        logits = self._forward(model, rows)
                        nxt = logits[:, -1, :vocab].argmax(dim=-1).tolist()
                        for j, t in enumerate(nxt):
                            if not done[j]:
                                if t == self.tokenizer.eod:
                                    done[j] = True
                                else:
                                    outs[j].append(t)
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
                    encoded = [sum(self._encode(r), []) for r in recs]
                    by_len: Dict[int, List[List[int]]] = {}
                    for e in encoded:
                        by_len.setdefault(len(e), []).append(e)
                    for rows in by_len.values():
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
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

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
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


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
    p.add_argument("--corpus-seed", type=int, default=7)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--r-init", type=int, default=2)
    p.add_argument("--r-target", type=int, default=4)
    p.add_argument("--r-max", type=int, default=8)
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

    # One single-process "world" for every training run and evaluation in this process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
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
        if os.path.isdir(base_dir):
            shutil.rmtree(base_dir)
        _say(f"> base: {args.base_iters} iterations on "
             f"{'all domains' if args.base_includes_target else 'all domains but the target'}"
             f" -> {base_dir}")
        base_train = train(bflags, base_dir)
        with open(stamp_path, "w") as fh:
            json.dump(stamp, fh)
        _say(f"  done in {base_train['seconds']:.0f} s, final train loss "
             f"{base_train['final_train_loss']:.3f}")
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
        "finetune_records", "base_includes_target",
        "corpus_seed", "vocab_size", "eval_prompts", "num_layers", "hidden_size",
        "moe_ffn_hidden_size", "num_experts", "topk", "r_init", "r_target", "r_max", "p_grow")}
    settings.update(seeds=list(range(args.seeds)), variants=args.variants,
                    schedule=schedule(args))
    results = {"settings": settings, "base": base_scores, "base_routing": base_routing,
               "runs": []}
    for seed in range(args.seeds):
        for variant in args.variants:
            run_dir = os.path.join(out, "runs", f"{variant}_s{seed}")
            if os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # the rank log appends: start clean
            flags = finetune_flags(args, paths, base_dir, run_dir, variant, seed)
            _say(f"> fine-tune {variant} seed {seed} -> {run_dir}")
            record = {"variant": variant, "seed": seed, "run_dir": run_dir}
            record.update(train(flags, run_dir))
            model, handle, rank_map = evaluator.load(flags, run_dir)
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
