"""When DR-LoRA grows, and by how much: the growth schedule of the paper's section 3.3.

Pure integer arithmetic (no torch, no torch.distributed, no Megatron), so every rank computes the
identical schedule from the same flags and the planning tool can run anywhere. See
the paper (arXiv 2601.04823), Eq. 10-12 and Table 10, for what this module implements.

Step convention: steps are 0-based optimizer iteration indices. The event at step t happens after
the gradients of step t are reduced and before step t's optimizer update, so "after step t" in
`events_through` / `planned_total_active` includes the event at t itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from megatron_drlora.config import ALLOCATION_SCOPES, ROUTER_MODES, DRLoRAConfig

__all__ = ["GrowthSchedule", "budget_shortfall_message", "exact_floor_product",
           "per_event_cap", "warmup_iterations"]


def exact_floor_product(fraction: float, n: int) -> int:
    """floor(fraction * n) with `fraction` read as the decimal the user typed.

    Binary floats make e.g. 0.29 * 100 = 28.999999999999996; reading 0.29 as 29/100 gives the
    29 a user expects, and the same answer on every rank and in the planning tool.
    """
    return math.floor(Fraction(repr(float(fraction))) * n)


def per_event_cap(p_grow: float, r_max: int, r_init: int) -> int:
    """Eq. 12: cap = floor((r_max - r_init) * p_grow), the exact decimal product.

    The one definition of the cap: config validation and the schedule both call it, so a config
    that validates can never get a schedule whose cap is 0.
    """
    return exact_floor_product(p_grow, r_max - r_init)


def warmup_iterations(train_iters: int, lr_warmup_iters: Optional[int] = None,
                      lr_warmup_fraction: Optional[float] = None,
                      lr_decay_iters: Optional[int] = None) -> int:
    """LR warm-up iterations by Megatron-LM's rule, as an integer step for growth events.

    Megatron warms up for lr_warmup_fraction * lr_decay_iters (lr_decay_iters defaulting to
    train_iters) when the fraction is given, else for lr_warmup_iters (default 0). The planner
    and the training entry both call this, so they agree; a fractional length is floored (exact
    decimal: 0.03 * 38000 -> 1140, as in the paper).
    """
    fraction = lr_warmup_fraction
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 <= fraction <= 1:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {fraction!r}")
        decay = train_iters if lr_decay_iters is None else lr_decay_iters
        if not _is_int(decay) or decay <= 0:
            raise ValueError(f"--lr-decay-iters must be a positive integer, got {decay!r}")
        return exact_floor_product(fraction, decay)
    if lr_warmup_iters is None:
        return 0
    if not _is_int(lr_warmup_iters) or lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be an integer >= 0, got {lr_warmup_iters!r}")
    return lr_warmup_iters


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GrowthSchedule:
    """The fixed growth plan of one run: event steps, per-layer quota Q (Eq. 11), cap (Eq. 12).

    Frozen because every rank must hold the same plan for the whole run; build it once with
    `GrowthSchedule.build`. A run that does not grow (method 'uniform', or r_init == budget) has
    no events, zero quotas, and still answers `router_trainable`.
    """

    train_iters: int
    t_warmup: int
    t_end: int
    grow_interval: int
    n_events: int  # T_events = floor((t_end - t_warmup) / T_grow): the quota's denominator
    cap: int
    r_init: int
    r_target: int
    r_max: int
    modules_per_layer: Tuple[int, ...]
    quotas: Tuple[int, ...]
    allocation: str = "layer"
    router_mode: str = "warmup_frozen"

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, config: DRLoRAConfig, train_iters: int, warmup_iters: Optional[int],
              modules_per_layer: Sequence[int]) -> "GrowthSchedule":
        """Compute the plan; raise ValueError naming the flag to change when it cannot work.

        `warmup_iters` is the LR warm-up length (Megatron's `--lr-warmup-iters`); it is used only
        when `config.warmup_iters` (`--drlora-warmup-iters`) is None. `modules_per_layer[l]` is
        N_mod(l), the number of adapted modules of layer l (2 x experts by default).
        """
        if not _is_int(train_iters) or train_iters <= 0:
            raise ValueError(f"--train-iters must be a positive integer, got {train_iters!r}")
        if config.warmup_iters is not None:
            warmup, warmup_flag = config.warmup_iters, "--drlora-warmup-iters"
        else:
            warmup, warmup_flag = warmup_iters, "--lr-warmup-iters"
        if not _is_int(warmup) or warmup < 0:
            raise ValueError(f"{warmup_flag} must be an integer >= 0, got {warmup!r}")
        mods = tuple(modules_per_layer)
        if not mods or not all(_is_int(n) and n > 0 for n in mods):
            raise ValueError("modules_per_layer must list a positive number of adapted modules "
                             f"for every layer (N_mod(l) = experts x targets), got {list(mods)}")

        if config.grow_buffer is None:  # the config accepts None; the schedule needs a number
            raise ValueError("--drlora-grow-buffer must be an integer >= 0, got None")
        t_end = train_iters - config.grow_buffer
        r_init, r_target, r_max = config.rank_init, config.budget, config.rank_max
        cap = per_event_cap(config.p_grow, r_max, r_init)
        n_events, quotas = 0, (0,) * len(mods)
        if config.grows:
            if warmup >= t_end:
                raise ValueError(
                    f"no growth event fits: warm-up ends at step {warmup} ({warmup_flag}) but "
                    f"growth must stop at t_end = train_iters - grow_buffer = {train_iters} - "
                    f"{config.grow_buffer} = {t_end}; lower {warmup_flag} or "
                    f"--drlora-grow-buffer, or raise --train-iters")
            n_events = (t_end - warmup) // config.grow_interval
            if n_events < 1:
                raise ValueError(
                    f"no full growth interval fits: t_end - t_warmup = {t_end} - {warmup} = "
                    f"{t_end - warmup} steps is shorter than --drlora-grow-interval="
                    f"{config.grow_interval}; lower --drlora-grow-interval, {warmup_flag} or "
                    f"--drlora-grow-buffer, or raise --train-iters")
            quotas = tuple(_ceil_div(n * (r_target - r_init), n_events) for n in mods)
        return cls(train_iters=train_iters, t_warmup=warmup, t_end=t_end,
                   grow_interval=config.grow_interval, n_events=n_events, cap=cap,
                   r_init=r_init, r_target=r_target, r_max=r_max, modules_per_layer=mods,
                   quotas=quotas, allocation=config.allocation, router_mode=config.router)

    # --- basic quantities -------------------------------------------------------------------
    @property
    def grows(self) -> bool:
        return self.n_events > 0

    @property
    def num_layers(self) -> int:
        return len(self.modules_per_layer)

    @property
    def total_modules(self) -> int:
        return sum(self.modules_per_layer)

    def quota(self, layer: int) -> int:
        """Q of `layer` (Eq. 11): module-ranks handed out per event, 0 when not growing."""
        return self.quotas[layer]

    def layer_target(self, layer: int) -> int:
        """N_mod(l) * r_target: the active ranks `layer` ends with (uniform LoRA's count)."""
        return self.modules_per_layer[layer] * self.r_target

    def layer_initial(self, layer: int) -> int:
        return self.modules_per_layer[layer] * self.r_init

    # --- events -----------------------------------------------------------------------------
    @property
    def last_event_step(self) -> Optional[int]:
        """Last event: the largest t_warmup + k*T_grow <= t_end that is a real step (< T_total).

        With --drlora-grow-buffer 0, t_end = T_total is not a step of the run; the quota's
        ceiling makes the target reachable one event earlier anyway.
        """
        if not self.grows:
            return None
        last = min(self.t_end, self.train_iters - 1)
        return self.t_warmup + (last - self.t_warmup) // self.grow_interval * self.grow_interval

    @property
    def num_event_steps(self) -> int:
        """How many events happen (T_events + 1 when t_end is a real step: both ends count)."""
        last = self.last_event_step
        return 0 if last is None else (last - self.t_warmup) // self.grow_interval + 1

    def is_event(self, step: int) -> bool:
        last = self.last_event_step
        return (last is not None and self.t_warmup <= step <= last
                and (step - self.t_warmup) % self.grow_interval == 0)

    def event_steps(self) -> List[int]:
        last = self.last_event_step
        return [] if last is None else list(range(self.t_warmup, last + 1, self.grow_interval))

    def events_through(self, step: int) -> int:
        """Number of events at steps <= `step` (the event at `step` itself included)."""
        last = self.last_event_step
        if last is None or step < self.t_warmup:
            return 0
        return (min(step, last) - self.t_warmup) // self.grow_interval + 1

    def event_step(self, event: int) -> int:
        """Step of the 1-based `event`-th event."""
        if not 1 <= event <= self.num_event_steps:
            raise ValueError(f"event {event} out of range 1..{self.num_event_steps}")
        return self.t_warmup + (event - 1) * self.grow_interval

    # --- router -----------------------------------------------------------------------------
    def router_trainable(self, step: int, router_mode: Optional[str] = None) -> bool:
        """Whether the router gets gradients at `step` (default mode: the config's `router`)."""
        mode = self.router_mode if router_mode is None else router_mode
        if mode == "warmup_frozen":
            return step >= self.t_warmup
        if mode == "frozen":
            return False
        if mode == "trained":
            return True
        raise ValueError(f"--drlora-router: unknown mode {mode!r}; choose one of "
                         f"{', '.join(ROUTER_MODES)}")

    # --- the plan if every event spends its quota --------------------------------------------
    def _per_event_growth(self, layers: Sequence[int]) -> int:
        """Module-ranks one event can add to `layers`: the quota, unless the cap binds first
        (each module grows by at most `cap` per event)."""
        return min(sum(self.quotas[l] for l in layers),
                   sum(self.modules_per_layer[l] for l in layers) * self.cap)

    def _groups(self) -> List[List[int]]:
        """Layers that share one budget pool: each layer alone, or all layers together."""
        if self.allocation == "global":
            return [list(range(self.num_layers))]
        if self.allocation not in ALLOCATION_SCOPES:
            raise ValueError(f"--drlora-allocation: unknown scope {self.allocation!r}")
        return [[l] for l in range(self.num_layers)]

    def planned_total_active(self, step: int) -> int:
        """Total active ranks over all layers after the events at steps <= `step`, if every event
        spends its quota (capped at the targets). Exact as long as r_max never stops an expert
        from taking its cap, which is what the paper's Table 10 assumes."""
        k = self.events_through(step)
        total = 0
        for group in self._groups():
            init = sum(self.layer_initial(l) for l in group)
            target = max(init, sum(self.layer_target(l) for l in group))
            total += min(init + k * self._per_event_growth(group), target)
        return total

    def planned_average_rank(self, step: int) -> float:
        return self.planned_total_active(step) / self.total_modules

    def target_reached_event(self) -> Optional[int]:
        """1-based event after which every layer (or the global pool) is at its target; 0 when
        there is nothing to grow; None when the quota / cap cannot get there by t_end."""
        needed = 0
        for group in self._groups():
            gap = sum(self.layer_target(l) - self.layer_initial(l) for l in group)
            if gap <= 0:
                continue
            per_event = self._per_event_growth(group)
            if per_event <= 0:
                return None
            needed = max(needed, _ceil_div(gap, per_event))
        return needed if needed <= self.num_event_steps else None


def budget_shortfall_message(schedule: GrowthSchedule) -> Optional[str]:
    """Why the run will end below its budget (how many ranks short, which flags to change), or
    None when the target is reached. In short runs the per-event cap binds before the quota;
    the planner prints this and the training entry warns with it at start-up."""
    if schedule.target_reached_event() is not None:
        return None
    target = sum(schedule.layer_target(l) for l in range(schedule.num_layers))
    got = schedule.planned_total_active(schedule.train_iters - 1)
    return (f"DR-LoRA will not reach its budget: after the last of {schedule.num_event_steps} "
            f"growth events the layers hold {got:,} of their {target:,} active ranks, "
            f"{target - got:,} module-ranks short, because a module grows by at most cap = "
            f"{schedule.cap} ranks per event (floor((r_max - r_init) * p_grow)); raise "
            f"--drlora-p-grow or --drlora-rank-max, lower --drlora-grow-interval, or raise "
            f"--train-iters")
