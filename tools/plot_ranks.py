"""Draw a DR-LoRA run's rank allocation: layers x experts heatmap and rank growth (PNG).

    python tools/plot_ranks.py RUN_DIR/drlora_ranks.jsonl [--out DIR] [--iteration N]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.plotting import plot_growth, plot_heatmap, read_rank_log  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rank_log", help="drlora_ranks.jsonl written by a training run")
    p.add_argument("--out", default=None, help="output folder (default: next to the log)")
    p.add_argument("--iteration", type=int, default=None,
                   help="heatmap of the last map at or before this iteration (default: final)")
    args = p.parse_args(argv)
    try:
        records = read_rank_log(args.rank_log)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = records[-1]
    if args.iteration is not None:
        earlier = [r for r in records if r["iteration"] <= args.iteration]
        if not earlier:
            print(f"error: no rank map at or before iteration {args.iteration}", file=sys.stderr)
            return 2
        chosen = earlier[-1]
    out = args.out or os.path.dirname(os.path.abspath(args.rank_log))
    os.makedirs(out, exist_ok=True)
    heat = plot_heatmap(chosen, os.path.join(out, "drlora_rank_heatmap.png"))
    growth = plot_growth(records, os.path.join(out, "drlora_rank_growth.png"))
    print(f"heatmap: {heat}\ngrowth:  {growth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
