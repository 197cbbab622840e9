"""Rank allocations: the frequency-proportional static map, LoRA FLOPs per target token, the
FLOPs-matched uniform rank, and where a run's ranks went. Pure Python on nested lists
([MoE layer][expert][projection] ranks, [MoE layer][expert] routing counts)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence


def static_frequency_map(counts: List[List[float]], projections: int, r_init: int,
                         r_target: int, r_max: int) -> List[List[List[int]]]:
    """Per layer, every expert keeps r_init and the rest of the layer's budget
    (experts x (r_target - r_init) expert-ranks, both projections alike) is shared in
    proportion to the expert's routing frequency, capped at r_max (the excess goes to the
    others in proportion, water-filling), rounded by largest remainder. Each layer ends with
    exactly the budget of uniform LoRA at r_target, like DR-LoRA."""
    out = []
    room = r_max - r_init
    for layer in counts:
        E = len(layer)
        extra = E * (r_target - r_init)
        share = [max(0.0, c) for c in layer]
        if sum(share) == 0:
            share = [1.0] * E
        ideal = [0.0] * E
        capped: set = set()
        left = float(extra)
        while True:  # water-filling: proportional among the experts below the cap
            free = [e for e in range(E) if e not in capped]
            weight = sum(share[e] for e in free)
            for e in free:
                ideal[e] = left * share[e] / weight if weight > 0 else left / len(free)
            over = [e for e in free if ideal[e] > room]
            if not over:
                break
            for e in over:
                ideal[e] = float(room)
                capped.add(e)
            left = extra - room * len(capped)
        ranks = [int(math.floor(x + 1e-9)) for x in ideal]
        order = sorted(range(E), key=lambda e: (-(ideal[e] - ranks[e]), e))
        for e in order[:extra - sum(ranks)]:
            ranks[e] += 1
        out.append([[r_init + r] * projections for r in ranks])
    return out


def lora_flops_per_token(rank_map, counts, tokens: float, widths: Sequence[int]) -> float:
    """LoRA multiply-adds per token: every routed (token, expert) assignment pays
    rank x (in + out) per adapted projection."""
    total = 0.0
    for layer_ranks, layer_counts in zip(rank_map, counts):
        for ranks, count in zip(layer_ranks, layer_counts):
            total += count * sum(r * w for r, w in zip(ranks, widths))
    return total / tokens


def flops_ratio_to_uniform(rank_map, counts, widths: Sequence[int], r_target: int) -> float:
    """LoRA FLOPs per target token of `rank_map` / those of uniform LoRA at r_target (under
    the same routing counts)."""
    uniform = [[[r_target] * len(widths) for _ in layer] for layer in counts]
    return (lora_flops_per_token(rank_map, counts, 1.0, widths)
            / lora_flops_per_token(uniform, counts, 1.0, widths))


def flops_matched_rank(ratios: Sequence[float], r_target: int) -> Dict:
    """The uniform rank whose LoRA FLOPs per target token match DR-LoRA's: r_target x the mean
    ratio over DR-LoRA's runs, rounded to the nearest integer (halves up)."""
    exact = r_target * sum(ratios) / len(ratios)
    rank = max(1, int(math.floor(exact + 0.5)))
    return {"exact": exact, "rank": rank, "ratios": list(ratios),
            "rounding": "nearest integer, halves up",
            "flops_of_rank_vs_drlora": rank / exact}


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
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


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def expert_groups(routing: Dict, rare: str) -> Dict[str, List[List[int]]]:
    """Per layer, the quarter of experts the target mix routes to most ('busiest') and the
    quarter with the largest rare-domain share of their traffic ('rare')."""
    counts, rare_counts = routing["counts"], routing["counts_by_domain"][rare]
    busiest, rare_experts = [], []
    for layer, layer_rare in zip(counts, rare_counts):
        E = len(layer)
        quarter = max(1, E // 4)
        share = [r / c if c > 0 else 0.0 for r, c in zip(layer_rare, layer)]
        busiest.append(sorted(range(E), key=lambda e: (-layer[e], e))[:quarter])
        rare_experts.append(sorted(range(E), key=lambda e: (-share[e], e))[:quarter])
    return {"busiest": busiest, "rare": rare_experts}


def allocation_analysis(rank_map, routing: Dict, rare: str, r_init: int) -> Dict:
    """Where the ranks above r_init went, against the base model's routing on the target mix:
    Spearman(expert rank, mix frequency) and (expert rank, rare-domain frequency), mean over
    layers, and the share of the grown ranks in the busiest / most rare-specific quarter."""
    groups = expert_groups(routing, rare)
    rho_mix, rho_rare, in_busy, in_rare = [], [], [], []
    for l, layer in enumerate(rank_map):
        expert_rank = [sum(e) / len(e) for e in layer]
        rho_mix.append(spearman(expert_rank, routing["counts"][l]))
        rho_rare.append(spearman(expert_rank, routing["counts_by_domain"][rare][l]))
        grown = [sum(max(0, r - r_init) for r in e) for e in layer]
        total = sum(grown)
        if total > 0:
            in_busy.append(sum(grown[e] for e in groups["busiest"][l]) / total)
            in_rare.append(sum(grown[e] for e in groups["rare"][l]) / total)
    return {"spearman_rank_vs_mix_frequency": _mean(rho_mix),
            "spearman_rank_vs_rare_frequency": _mean(rho_rare),
            "grown_share_busiest_quarter": _mean(in_busy),
            "grown_share_rare_quarter": _mean(in_rare)}
