"""The growth decision: saliency + current ranks -> new ranks (algorithm.md section 5).

Pure tensor code with no communication: every rank calls it with the same (reduced) saliency
and the same rank map, and must get the same answer, so the function is deterministic (stable
sort, integer arithmetic) and never modifies its inputs.

The paper's greedy loop ("for each expert by saliency, for each module in order, take
n = min(cap, r_max - r_m, remaining)") is equivalent to a prefix-sum fill: lay the modules out in
visiting order with capacity c_i = min(cap, r_max - r_i); module i then gets
min(c_i, max(0, remaining - sum of the capacities before it)). That form is vectorised over all
layers at once.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["allocate_growth"]

_SCOPES = ("layer", "global")


def _int_list(name: str, values, length: int) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    values = list(values)
    if len(values) != length:
        raise ValueError(f"allocate_growth: {name} has {len(values)} entries, expected one per "
                         f"layer ({length})")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"allocate_growth: {name} must hold integers >= 0, got {values}")
    return torch.tensor(values, dtype=torch.int64)


def _validate(saliency: torch.Tensor, ranks: torch.Tensor, cap: int, r_max: int,
              scope: str) -> None:
    if not isinstance(ranks, torch.Tensor) or ranks.dim() != 3 or ranks.dtype != torch.int64:
        raise ValueError("allocate_growth: ranks must be an int64 tensor [layers, experts, "
                         f"modules], got {getattr(ranks, 'dtype', type(ranks))} "
                         f"{tuple(getattr(ranks, 'shape', ()))}")
    if not isinstance(saliency, torch.Tensor) or not saliency.is_floating_point():
        raise ValueError("allocate_growth: saliency must be a floating-point tensor, got "
                         f"{getattr(saliency, 'dtype', type(saliency))}")
    if tuple(saliency.shape) != tuple(ranks.shape[:2]):
        raise ValueError(f"allocate_growth: saliency shape {tuple(saliency.shape)} does not "
                         f"match ranks [layers, experts] = {tuple(ranks.shape[:2])}")
    if torch.isnan(saliency).any():
        bad = torch.nonzero(torch.isnan(saliency))[:5].tolist()
        raise ValueError(f"allocate_growth: saliency has NaN at (layer, expert) {bad}; a NaN "
                         "would make the growth order arbitrary")
    for name, v, low in (("cap", cap, 0), ("r_max", r_max, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"allocate_growth: {name} must be an integer >= {low}, got {v!r}")
    if ranks.numel() and (ranks.min() < 0 or ranks.max() > r_max):
        raise ValueError(f"allocate_growth: ranks must lie in [0, r_max={r_max}], got "
                         f"[{int(ranks.min())}, {int(ranks.max())}]")
    if scope not in _SCOPES:
        raise ValueError(f"allocate_growth: scope must be one of {_SCOPES}, got {scope!r}")


def _greedy_fill(capacity: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy fill of rows of `capacity` [N, K] (in visiting order) with `budget` [N] each."""
    before = torch.cumsum(capacity, dim=1) - capacity
    return torch.minimum(capacity, (budget[:, None] - before).clamp_min(0))


def allocate_growth(saliency: torch.Tensor, ranks: torch.Tensor, quota: Sequence[int], cap: int,
                    r_max: int, layer_targets: Sequence[int],
                    scope: str = "layer",
                    group_capacity: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """New active ranks [L, E, M] after one growth event.

    saliency [L, E] (float): S of Eq. 9; higher grows first, ties go to the lower expert index
    (global scope: lower (layer, expert)). NaN is an error.
    ranks [L, E, M] (int64): current active ranks; M in the order modules are visited inside an
    expert (the caller orders them like the config targets: up, then down).
    quota [L]: Q per layer (Eq. 11). cap: per-module limit per event (Eq. 12).
    layer_targets [L]: N_mod(l) * r_target; a layer never grows past it ('layer' scope).
    scope 'layer': each layer spends min(Q_l, target_l - active_l) on its own experts.
    scope 'global': one pool min(sum Q, sum targets - total active) over all experts of all
    layers, so a single layer may end above its own target.
    group_capacity (experts per group, C), opt-in (`--drlora-rank-pool-capacity`): the experts
    of a layer form groups of consecutive indices (the EP ranks' local experts) and the active
    ranks of one group in one layer never exceed C; the visit is the same, a module of a full
    group gets nothing and the budget goes on to the next. Without it: the paper's rule.
    """
    _validate(saliency, ranks, cap, r_max, scope)
    L, E, M = ranks.shape
    quota_t = _int_list("quota", quota, L).to(ranks.device)
    target_t = _int_list("layer_targets", layer_targets, L).to(ranks.device)
    if ranks.numel() == 0:
        return ranks.clone()
    if group_capacity is not None:
        return _allocate_with_group_capacity(saliency, ranks, quota_t, target_t, cap, r_max,
                                             scope, group_capacity)

    active = ranks.sum(dim=(1, 2))
    capacity = (r_max - ranks).clamp(max=cap)  # >= 0: ranks <= r_max was checked
    # Stable ascending sort of -S == descending S with ties kept in index order.
    neg = -saliency.detach().to(device=ranks.device)
    if scope == "layer":
        budget = torch.minimum(quota_t, (target_t - active).clamp_min(0))
        order = torch.argsort(neg, dim=1, stable=True)  # [L, E]
        idx = order[:, :, None].expand(L, E, M)
        grant_sorted = _greedy_fill(capacity.gather(1, idx).reshape(L, E * M), budget)
        grant = torch.empty_like(ranks).scatter_(1, idx, grant_sorted.reshape(L, E, M))
    else:
        budget = torch.minimum(quota_t.sum(), (target_t.sum() - active.sum()).clamp_min(0))
        order = torch.argsort(neg.reshape(L * E), stable=True)  # flat index l*E + e
        idx = order[:, None].expand(L * E, M)
        flat_cap = capacity.reshape(L * E, M).gather(0, idx).reshape(1, L * E * M)
        grant_sorted = _greedy_fill(flat_cap, budget.reshape(1))
        grant = torch.empty(L * E, M, dtype=ranks.dtype, device=ranks.device)
        grant = grant.scatter_(0, idx, grant_sorted.reshape(L * E, M)).reshape(L, E, M)
    return ranks + grant


def _allocate_with_group_capacity(saliency, ranks, quota_t, target_t, cap, r_max, scope,
                                  group_capacity) -> torch.Tensor:
    """The greedy visit of `allocate_growth` with a per-(layer, group) limit on active ranks.

    Sequential (a module's grant depends on what its group already took), over the same
    stable descending-saliency order; growth events are rare, so L x E x M host steps are
    cheap. Integer arithmetic only: every rank gets the same answer."""
    L, E, M = ranks.shape
    per_group, limit = (int(v) for v in group_capacity)
    if per_group < 1 or E % per_group:
        raise ValueError(f"allocate_growth: group_capacity's experts per group ({per_group}) "
                         f"must divide the {E} experts of a layer")
    if limit < 0:
        raise ValueError(f"allocate_growth: group_capacity's limit must be >= 0, got {limit}")
    r = ranks.cpu().tolist()
    left = [[limit - sum(sum(r[l][e]) for e in range(g * per_group, (g + 1) * per_group))
             for g in range(E // per_group)] for l in range(L)]
    neg = (-saliency.detach().to(torch.float64)).cpu()
    active = ranks.sum(dim=(1, 2)).tolist()
    quota, target = quota_t.tolist(), target_t.tolist()

    def spend(order, remaining):
        for l, e in order:
            for m in range(M):
                n = min(cap, r_max - r[l][e][m], remaining, max(0, left[l][e // per_group]))
                r[l][e][m] += n
                left[l][e // per_group] -= n
                remaining -= n

    if scope == "layer":
        for l in range(L):
            order = torch.argsort(neg[l], stable=True).tolist()
            spend([(l, e) for e in order], max(0, min(quota[l], target[l] - active[l])))
    else:
        order = torch.argsort(neg.reshape(L * E), stable=True).tolist()
        spend([(i // E, i % E) for i in order],
              max(0, min(sum(quota), sum(target) - sum(active))))
    return torch.tensor(r, dtype=ranks.dtype, device=ranks.device)
