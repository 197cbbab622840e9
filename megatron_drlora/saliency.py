"""Expert saliency (algorithm.md section 4): routing-frequency and rank-importance EMAs.

Tensor math only. The caller reduces the per-step statistics over the parallel groups first
(see comm.py), so every rank feeds identical inputs and holds identical EMAs; this module never
communicates. EMAs are float64 so that the saliency order, which decides growth, does not depend
on summation order noise between parallel layouts. They live on the statistics' device and
`update_on_device` never reads a value back to the host (no GPU sync per step); checkpoints get
CPU copies.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from megatron_drlora.config import SALIENCY_VARIANTS

__all__ = ["SaliencyState", "rank_sensitivity_l1", "statistics_are_finite"]


def statistics_are_finite(*tensors: Optional[torch.Tensor]) -> bool:
    """True when no tensor (None ignored) holds NaN or inf.

    One NaN in an EMA stays there for the rest of the run and makes the growth order arbitrary,
    so a step with non-finite statistics (e.g. an fp16 overflow the optimizer skips) is dropped.
    """
    return bool(_all_finite(*tensors))


def _all_finite(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim bool on the tensors' device: the check of statistics_are_finite without a sync."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def rank_sensitivity_l1(grad: torch.Tensor, weight: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Per-rank-slot || grad (.) weight ||_1 (the factors of Eq. 6), accumulated in float64.

    Keeps dim 0 (the local expert) and `rank_dim`, sums |grad * weight| over every other dim:
    A [E, R, k] with rank_dim=1 -> [E, R]; B [E, d, R] with rank_dim=2 -> [E, R]. Under tensor
    parallelism each shard returns its partial sum; adding the shards' results gives the full l1.
    """
    if grad.shape != weight.shape:
        raise ValueError(f"rank_sensitivity_l1: grad shape {tuple(grad.shape)} differs from "
                         f"weight shape {tuple(weight.shape)}")
    if grad.dim() < 2:
        raise ValueError("rank_sensitivity_l1: expected [experts, ...] with a rank dim, got "
                         f"shape {tuple(grad.shape)}")
    rank_dim = rank_dim % grad.dim()
    if rank_dim == 0:
        raise ValueError("rank_sensitivity_l1: dim 0 is the expert dim; rank_dim must be another")
    # One float64 copy, multiplied and abs'ed in place (weight promoted inside the kernel):
    # the same exact float64 products as two casts, with half the memory traffic.
    prod = grad.detach().to(torch.float64, copy=True)
    prod.mul_(weight.detach()).abs_()
    other = [d for d in range(1, grad.dim()) if d != rank_dim]
    return prod.sum(dim=other) if other else prod


class SaliencyState:
    """The EMAs of Eq. 5 and Eq. 7 for all layers and experts, identical on every rank.

    frequency  [L, E] float64: f, EMA of the routed weight per token (Eq. 5).
    importance [L, E, M, R] float64: g_j per rank slot (Eq. 7), R = r_max; slots that are not
    active keep their value (0 unless they were active before a reset).
    updates: number of accepted updates (for logging and checkpoints; reading it syncs).
    """

    def __init__(self, num_layers: int, num_experts: int, num_modules: int, r_max: int,
                 device: Optional[torch.device] = None):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts),
                        ("num_modules", num_modules), ("r_max", r_max)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"SaliencyState: {name} must be a positive integer, got {v!r}")
        self.shape = (num_layers, num_experts, num_modules, r_max)
        self.frequency = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.importance = torch.zeros(self.shape, dtype=torch.float64, device=device)
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def updates(self) -> int:
        return int(self._updates)

    @property
    def device(self) -> torch.device:
        return self.frequency.device

    def to(self, device) -> "SaliencyState":
        """Move the EMAs (once, e.g. to the adapters' GPU); new tensors, same values."""
        self.frequency, self.importance, self._updates = (
            t.to(device, non_blocking=True)
            for t in (self.frequency, self.importance, self._updates))
        return self

    # --- per-step update --------------------------------------------------------------------
    def _check(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            raise ValueError(f"SaliencyState: {name} must have shape {tuple(shape)}, got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        t = t.detach()
        return t if t.device == self.frequency.device else t.to(self.frequency.device)

    def active_mask(self, ranks: torch.Tensor) -> torch.Tensor:
        """[L, E, M, R] bool: slot j of a module is active iff j < its rank (prefix rule)."""
        ranks = self._check("ranks", ranks, self.shape[:3])
        slots = torch.arange(self.shape[3], device=ranks.device)
        return slots < ranks[..., None]

    def update(self, routed_sum: torch.Tensor, tokens: torch.Tensor,
               l1_a: Optional[torch.Tensor], l1_b: Optional[torch.Tensor],
               ranks: torch.Tensor, beta: float) -> bool:
        """One optimizer step's statistics, already reduced over the whole global batch.

        routed_sum [L, E]: routing weight (or token count) each expert received this step.
        tokens [L]: tokens routed by each layer this step; w = routed_sum / tokens (0 if none).
        l1_a, l1_b [L, E, M, R]: ||dL/da_j (.) a_j||_1 and ||dL/db_j (.) b_j||_1; s_j is their
        product (Eq. 6). Pass both as None to update only the frequency (e.g. when the
        'frequency' variant needs no gradient statistics).
        ranks [L, E, M]: active ranks during this step; only slots j < rank are updated.
        Returns False, changing nothing, when any statistic is NaN or inf; True otherwise.
        Reading that answer waits for the device; the training loop uses update_on_device.
        """
        return bool(self.update_on_device(routed_sum, tokens, l1_a, l1_b, ranks, beta))

    def update_on_device(self, routed_sum: torch.Tensor, tokens: torch.Tensor,
                         l1_a: Optional[torch.Tensor], l1_b: Optional[torch.Tensor],
                         ranks: torch.Tensor, beta: float) -> torch.Tensor:
        """`update` without a host sync: returns a 0-dim bool tensor (True: accepted). A
        non-finite step is masked out on the device (torch.where), leaving every EMA and the
        update count bit-identical, instead of being tested on the host."""
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"SaliencyState.update: beta must be in [0, 1), got {beta!r}")
        L, E, M, R = self.shape
        routed = self._check("routed_sum", routed_sum, (L, E)).to(torch.float64)
        toks = self._check("tokens", tokens, (L,)).to(torch.float64)
        if (l1_a is None) != (l1_b is None):
            raise ValueError("SaliencyState.update: pass both l1_a and l1_b, or neither")
        s = None
        if l1_a is not None:
            a = self._check("l1_a", l1_a, self.shape).to(torch.float64)
            b = self._check("l1_b", l1_b, self.shape).to(torch.float64)
            s = a * b  # Eq. 6
        w = torch.where(toks[:, None] > 0, routed / toks.clamp_min(1e-300)[:, None],
                        torch.zeros_like(routed))
        ok = _all_finite(routed, toks, w, s)
        self.frequency.copy_(torch.where(
            ok, torch.add(self.frequency * beta, w, alpha=1.0 - beta), self.frequency))
        if s is not None:
            mask = self.active_mask(ranks) & ok
            ema = self.importance * beta + s * (1.0 - beta)
            self.importance.copy_(torch.where(mask, ema, self.importance))
        self._updates.add_(ok.to(torch.int64))
        return ok

    # --- reading the state ------------------------------------------------------------------
    def expert_rank(self, ranks: torch.Tensor) -> torch.Tensor:
        """[L, E] float64: r_{l,i}, the expert's rank averaged over its modules."""
        return self._check("ranks", ranks, self.shape[:3]).to(torch.float64).mean(dim=2)

    def expert_importance(self, ranks: torch.Tensor) -> torch.Tensor:
        """[L, E] float64: g_{l,i} of Eq. 8, mean of g_j over each module's active slots, then
        mean over modules. A module with rank 0 contributes 0 (it has nothing to average)."""
        mask = self.active_mask(ranks)
        r = mask.sum(dim=3).to(torch.float64)
        per_module = (self.importance * mask).sum(dim=3) / r.clamp_min(1.0)
        return per_module.mean(dim=2)

    def saliency(self, ranks: torch.Tensor, variant: str = "full",
                 gamma: float = 1.2) -> torch.Tensor:
        """[L, E] float64: S of Eq. 9 = numerator / (r + 1)^gamma.

        numerator: f * g ('full'), f ('frequency') or g ('importance'); the ablations replace
        only the numerator, and gamma = 0 is the no-penalty ablation.
        """
        if variant == "full":
            num = self.frequency * self.expert_importance(ranks)
        elif variant == "frequency":
            num = self.frequency.clone()
        elif variant == "importance":
            num = self.expert_importance(ranks)
        else:
            raise ValueError(f"--drlora-saliency: unknown variant {variant!r}; choose one of "
                             f"{', '.join(SALIENCY_VARIANTS)}")
        return num / (self.expert_rank(ranks) + 1.0).pow(float(gamma))

    def reset_importance(self, layers: Optional[Iterable[int]] = None) -> None:
        """g <- 0 after a growth event (all layers, or those listed); f is kept."""
        if layers is None:
            self.importance.zero_()
            return
        layers = list(layers)
        if any(not 0 <= l < self.shape[0] for l in layers):
            raise ValueError(f"SaliencyState.reset_importance: layers {layers} out of range "
                             f"0..{self.shape[0] - 1}")
        if layers:
            self.importance[torch.tensor(layers, dtype=torch.long,
                                         device=self.importance.device)] = 0.0

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """CPU copies (checkpoints are written from the host), whatever device the EMAs use."""
        return {"frequency": self.frequency.detach().to("cpu", copy=True),
                "importance": self.importance.detach().to("cpu", copy=True),
                "updates": self._updates.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore; a shape mismatch means the checkpoint is from another model or r_max."""
        missing = {"frequency", "importance", "updates"} - set(state)
        if missing:
            raise ValueError(f"SaliencyState.load_state_dict: missing {sorted(missing)}")
        for name, shape in (("frequency", self.shape[:2]), ("importance", self.shape)):
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"SaliencyState.load_state_dict: '{name}' has shape "
                    f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(shape)} "
                    "[layers, experts(, modules, r_max)]; was the checkpoint saved with another "
                    "model, --drlora-targets or --drlora-rank-max?")
        # In place (whoever holds these tensors keeps seeing them), onto the EMAs' device.
        self.frequency.copy_(state["frequency"].detach())
        self.importance.copy_(state["importance"].detach())
        self._updates.fill_(int(state["updates"]))
