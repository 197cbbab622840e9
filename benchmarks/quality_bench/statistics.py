"""Mean and spread over seeds, and paired per-seed differences with a 95% t-interval."""

from __future__ import annotations

import math
import statistics as _stats
from typing import Dict, List, Optional, Sequence

# Two-sided 95% quantiles of Student's t (0.975), by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
         40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 0.975 quantile of t with `df` degrees of freedom (the table's next lower df where
    it has no entry, which errs wide; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 observations")
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def mean_std(values: Sequence[Optional[float]]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return sum(values) / len(values), _stats.stdev(values) if len(values) > 1 else 0.0


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict:
    """a - b over the seeds both have: per-seed differences, mean, standard deviation and the
    95% t-interval of the mean (None with fewer than 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "diffs": diffs, "n": len(diffs),
           "mean": sum(diffs) / len(diffs) if diffs else None,
           "sd": None, "half_width": None, "low": None, "high": None}
    if len(diffs) >= 2:
        sd = _stats.stdev(diffs)
        half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(sd=sd, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def prompt_sampling_se(a: Dict[int, str], b: Dict[int, str]) -> Optional[float]:
    """Standard error, from the finite held-out set, of the seed-averaged accuracy difference
    a - b: per prompt, the difference of the two variants' correctness averaged over the
    seeds both have; SE = sd over prompts / sqrt(prompts). (The t-interval over seeds holds
    the held-out set fixed; this says how much a different draw of prompts would move it.)"""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    n = len(a[seeds[0]])
    per_prompt = [sum(int(a[s][i]) - int(b[s][i]) for s in seeds) / len(seeds)
                  for i in range(n)]
    return _stats.stdev(per_prompt) / math.sqrt(n) if n > 1 else None


def verdict(diff: Dict, higher_is_better: bool = True, unit: str = "") -> str:
    """Plain words for a paired difference: better / worse when the 95% interval excludes 0,
    otherwise no detectable difference."""
    if diff["mean"] is None:
        return "not measured"
    if diff["low"] is None:
        return f"{diff['mean']:+.3g}{unit} (one seed: no interval)"
    if diff["low"] > 0 or diff["high"] < 0:
        better = (diff["low"] > 0) == higher_is_better
        return "DR-LoRA better" if better else "DR-LoRA worse"
    return "no detectable difference (the interval includes 0)"


__all__: List[str] = ["mean_std", "paired", "prompt_sampling_se", "t975", "verdict"]
