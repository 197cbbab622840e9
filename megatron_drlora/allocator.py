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

from typing import Sequence

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
                    scope: str = "layer") -> torch.Tensor:
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
    """
    _validate(saliency, ranks, cap, r_max, scope)
    L, E, M = ranks.shape
    quota_t = _int_list("quota", quota, L).to(ranks.device)
    target_t = _int_list("layer_targets", layer_targets, L).to(ranks.device)
    if ranks.numel() == 0:
        return ranks.clone()

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
