#!/usr/bin/env python
"""Write the synthetic multi-domain corpus as JSONL: one file per domain plus `mixed.jsonl`.

Example (from the repo root):
    python tools/generate_corpus.py --domains arithmetic,code,prose,units \
        --num-per-domain 2000 --seed 1234 --out data/corpus --format instruction

Same arguments give byte-identical files. `mixed.jsonl` holds every domain's records in a
seeded shuffle: it is the natural input for tools/train_tokenizer.py (one tokenizer for all
domains) and for base-model pretraining, while the per-domain files feed fine-tuning and
held-out evaluation.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.data.synthetic import DOMAINS, FORMATS, generate, write_jsonl  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help=f"Comma-separated domains (default: all of {','.join(DOMAINS)}).")
    parser.add_argument("--num-per-domain", type=int, required=True,
                        help="Records per domain.")
    parser.add_argument("--seed", type=int, default=1234, help="Random seed (default 1234).")
    parser.add_argument("--out", required=True, help="Output directory (created if missing).")
    parser.add_argument("--format", choices=FORMATS, default="instruction",
                        help="instruction: prompt/response records (loss on the response only "
                        "after preprocessing); text: one 'text' field per record.")
    return parser


def parse_domains(value: str) -> list:
    domains = [d.strip() for d in value.split(",") if d.strip()]
    if not domains:
        raise ValueError("--domains is empty; give e.g. --domains arithmetic,code")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"--domains: unknown domain(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(DOMAINS)}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"--domains lists a domain twice: {value}")
    return domains


def run(args: argparse.Namespace) -> dict:
    """Generate and write the files; returns {path: number of records}."""
    domains = parse_domains(args.domains)
    if args.num_per_domain <= 0:
        raise ValueError(f"--num-per-domain must be > 0, got {args.num_per_domain}")
    written = {}
    mixed = []
    for domain in domains:
        records = generate(domain, args.num_per_domain, args.seed, fmt=args.format)
        path = os.path.join(args.out, f"{domain}.jsonl")
        write_jsonl(path, records)
        written[path] = len(records)
        mixed.extend(records)
    # Same seeded shuffle as synthetic.generate_mixed: any prefix of mixed.jsonl (and so any
    # train/valid split of it) covers all domains.
    random.Random(args.seed).shuffle(mixed)
    path = os.path.join(args.out, "mixed.jsonl")
    write_jsonl(path, mixed)
    written[path] = len(mixed)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, count in written.items():
        print(f"wrote {count} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
