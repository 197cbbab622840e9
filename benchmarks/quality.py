#!/usr/bin/env python
"""Quality of DR-LoRA against controls that separate allocation from compute.

    python benchmarks/quality.py [--out runs/benchmarks/quality] [--seeds 5] [--jobs 2]
    python benchmarks/quality.py --quick --out /tmp/q       # CI smoke test, about a minute

At the same parameter budget (uniform LoRA at r_target) unless named:

- uniform LoRA at r_target; uniform LoRA at r_max (2x the budget, named);
- uniform LoRA at the rank whose LoRA FLOPs per target token match DR-LoRA's (measured from
  DR-LoRA's final rank maps weighted by its routing counts on the target data; more
  parameters than the budget, named);
- a static map proportional to routing frequency measured once on the target data with the
  base model before training (`--drlora-rank-map`, no saliency, no growth);
- DR-LoRA and the paper's ablations (frequency only, importance only, global allocation).

Setting: 64 experts top-8 (OLMoE's counts) at small width; the fine-tuning data is a mix of a
frequent domain the base already solves and a rarer one it does not, so the experts the data
routes to most are not the ones whose adaptation matters most. Every training run is
`examples/pretrain_gpt.py` (Megatron-LM's loop plus the DR-LoRA plugin) under torchrun;
evaluation (held-out loss and greedy exact-match accuracy per domain, routing counts) runs in
this process. Statistics: paired per-seed differences with 95% t-intervals.

Output: OUT/quality.md, OUT/quality.json (every run), OUT/allocation.png. The parts are in
benchmarks/quality_bench/ (data, runs, evaluation, allocation, statistics, report, main).
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.quality_bench.main import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import __main__
    sys.exit(main())
