"""Data of the quality benchmark: the demo's pipeline plus a target *mix*.

The base corpus is every synthetic domain (`tools/generate_corpus.py`), the frequent mix
domain `--frequent-base-factor` times over. The fine-tuning data
is a mix of two domains: a frequent one the base already solves (default `prose`: recall of
ten fixed facts in long templated sentences, many tokens per record) and a rarer one it does
not (default `sort`: sorting 3-6 letters, learned only partly by the short base run). Routing
frequency on this mix is dominated by the frequent domain's tokens, while the loss that
fine-tuning can still reduce is almost all in the rare domain: the experts the data routes to
most are not the ones whose adaptation matters most.

Held-out prompts: for each mix domain, one prompt in ten (crc32 bucket) is held out of every
training set (base and fine-tune), so held-out and training records share the distribution but
never a prompt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from benchmarks.quality_bench.runs import REPO, run_tool, say

HELD_OUT_BUCKETS = 10  # one prompt in ten (by crc32) is held out


def held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0


def draw(domain: str, n: int, seed: int, keep) -> List[Dict]:
    """n records of `domain` (seeded, reproducible) whose prompt passes `keep`."""
    from megatron_drlora.data.synthetic import generate

    pool = generate(domain, max(1000, 20 * n), seed)
    records = [r for r in pool if keep(r["prompt"])][:n]
    if len(records) < n:
        raise SystemExit(f"could draw only {len(records)} of {n} {domain} records for this "
                         f"split; ask for fewer")
    return records


def mix_counts(args) -> Dict[str, int]:
    """Fine-tuning records per mix domain."""
    rare = int(round(args.finetune_records * args.rare_share))
    return {args.frequent_domain: args.finetune_records - rare, args.rare_domain: rare}


def prepare_data(args, out: str) -> Dict[str, str]:
    """Corpus, tokenizer, indexed datasets, held-out sets and routing probes under OUT/data
    (reused when the settings are unchanged). Returns the paths."""
    from megatron_drlora.data.synthetic import DOMAINS, iter_jsonl, write_jsonl

    data = os.path.join(out, "data")
    corpus = os.path.join(data, "corpus")
    mix = (args.frequent_domain, args.rare_domain)
    eval_counts = {args.frequent_domain: args.eval_prompts_frequent,
                   args.rare_domain: args.eval_prompts_rare}
    stamp = {"num_per_domain": args.num_per_domain, "corpus_seed": args.corpus_seed,
             "vocab_size": args.vocab_size, "mix": mix_counts(args),
             "frequent_base_factor": args.frequent_base_factor, "eval": eval_counts,
             "probe_records": args.probe_records, "split": "crc32 buckets"}
    stamp_path = os.path.join(data, "settings.json")
    paths = {"tokenizer": os.path.join(data, "tokenizer.model"),
             "mixed": os.path.join(data, "mixed_text_document"),
             "target": os.path.join(data, "target_text_document"),
             "probe": os.path.join(data, "target_probe.jsonl")}
    for domain in mix:
        paths[f"heldout_{domain}"] = os.path.join(data, f"heldout_{domain}.jsonl")
    if os.path.isfile(stamp_path) and json.load(open(stamp_path)) == stamp and \
            all(os.path.exists(p) for k, p in paths.items() if k not in ("mixed", "target")) \
            and os.path.exists(paths["target"] + ".idx"):
        say(f"> data: reusing {data}")
        return paths
    if os.path.isdir(data):
        shutil.rmtree(data)
    os.makedirs(data)
    py = sys.executable
    run_tool([py, "tools/generate_corpus.py", "--domains", ",".join(DOMAINS),
              "--num-per-domain", str(args.num_per_domain), "--seed", str(args.corpus_seed),
              "--format", "instruction", "--out", corpus], os.path.join(data, "corpus.log"))
    # The base never sees a held-out prompt of a mix domain.
    mixed_path = os.path.join(corpus, "mixed.jsonl")
    mixed = [rec for _, rec in iter_jsonl(mixed_path)
             if not (rec["domain"] in mix and held_out(rec["prompt"]))]
    # The frequent domain, over-represented in the base corpus so the base solves it.
    extra = (args.frequent_base_factor - 1) * args.num_per_domain
    if extra > 0:
        mixed += draw(args.frequent_domain, extra, args.corpus_seed + 50_021,
                      lambda p: not held_out(p))
        random.Random(args.corpus_seed + 3).shuffle(mixed)
    write_jsonl(mixed_path, mixed)
    train_records: List[Dict] = []
    for i, (domain, n) in enumerate(mix_counts(args).items()):
        train_records += draw(domain, n, args.corpus_seed + 1 + i, lambda p: not held_out(p))
        heldout = draw(domain, eval_counts[domain], args.corpus_seed + 99_991 + i, held_out)
        write_jsonl(paths[f"heldout_{domain}"], heldout)
    random.Random(args.corpus_seed).shuffle(train_records)
    target_file = os.path.join(data, "target.jsonl")
    write_jsonl(target_file, train_records)
    # Routing probe of the target data: the first records of the (shuffled) fine-tuning mix.
    write_jsonl(paths["probe"], train_records[:args.probe_records])
    run_tool([py, "tools/train_tokenizer.py", "--input", mixed_path, target_file,
              "--vocab-size", str(args.vocab_size), "--model-prefix",
              os.path.join(data, "tokenizer")], os.path.join(data, "tokenizer.log"))
    # the two datasets at once (each is mostly the tool's start-up)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = [pool.submit(run_tool, [py, "tools/preprocess_data.py", "--input", source,
                                       "--tokenizer-model", paths["tokenizer"],
                                       "--output-prefix", os.path.join(data, name),
                                       "--append-eod"],
                            os.path.join(data, f"preprocess_{name}.log"))
                for name, source in (("mixed", mixed_path), ("target", target_file))]
        for future in done:
            future.result()
    with open(stamp_path, "w") as fh:
        json.dump(stamp, fh)
    return paths


__all__ = ["REPO", "draw", "held_out", "mix_counts", "prepare_data"]
