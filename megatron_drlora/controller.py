"""DRLoRAController: the per-step driver of DR-LoRA inside a training loop.

Call `after_gradients(step)` once per optimizer step, after the gradients of the whole step are
reduced (Megatron: after `finalize_model_grads`) and before `optimizer.step()`:

    stats -> one fused all-reduce -> EMAs (identical on every rank) -> [growth event: pure
    allocator -> new rank map -> agreement check] -> router freeze -> reset accumulators

The decision itself (schedule, allocator, saliency) is pure and runs on identical inputs on
every rank; this class only wires it to the model, the statistics and comm.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_drlora import comm
from megatron_drlora.adapters.experts import replicated_gradients
from megatron_drlora.allocator import allocate_growth
from megatron_drlora.compat.megatron import distributed_optimizer_grad_masks
from megatron_drlora.saliency import SaliencyState
from megatron_drlora.schedule import GrowthSchedule
from megatron_drlora.statistics import RoutingStatistics, local_sensitivity

logger = logging.getLogger("megatron_drlora")

# What a run started from saved adapters must share with them: the factors' shapes.
SHAPE_SETTINGS = ("r_max", "targets", "shared_experts")
# What a checkpoint written before a setting existed meant by it.
SETTING_DEFAULTS = {"shared_experts": "none"}


@dataclass
class StepReport:
    step: int
    event: bool = False
    router_trainable: bool = True
    seconds: float = 0.0
    average_rank: float = 0.0
    layer_min: List[int] = field(default_factory=list)
    layer_max: List[int] = field(default_factory=list)
    layer_mean: List[float] = field(default_factory=list)
    grown: int = 0  # module-ranks activated at this event
    _dropped: str = field(default="", repr=False)
    _nonfinite: Optional[torch.Tensor] = field(default=None, repr=False)  # 0-dim, on device

    @property
    def dropped(self) -> str:
        """Why this step's statistics did not enter the EMAs ("" if they did). The finiteness
        check stays on the device until someone reads this (then it waits for the GPU)."""
        if self._nonfinite is not None:
            nonfinite, self._nonfinite = bool(self._nonfinite), None
            if nonfinite:
                self._dropped = "non-finite routing or rank-importance statistics"
                _warn_dropped(self.step, self._dropped)
        return self._dropped

    @dropped.setter
    def dropped(self, reason: str) -> None:
        self._dropped, self._nonfinite = reason, None

    def log_line(self) -> str:
        per_layer = " ".join(f"L{l}:{lo}-{hi}" for l, (lo, hi) in
                             enumerate(zip(self.layer_min, self.layer_max)))
        return (f" growth event at step {self.step:8d} (iteration {self.step + 1}) | "
                f"+{self.grown} module-ranks | "
                f"average rank {self.average_rank:.2f} | min-max per layer {per_layer}")


def _warn_dropped(step: int, reason: str) -> None:
    logger.warning("DR-LoRA: step %d statistics dropped (%s); the saliency EMAs keep their "
                   "previous values", step, reason)


class DRLoRAController:
    """Statistics, saliency EMAs, the growth schedule and the rank map of one training run."""

    def __init__(self, handle, train_iters: int, warmup_iters: Optional[int] = 0,
                 ddp_models=None, rank_map: Optional[torch.Tensor] = None):
        """`rank_map`: the map the adapters are at (a loaded checkpoint's) instead of the
        initial one. With the rank pool that matters: a pooled bank set back to r_init
        frees the slots above it and a later grow starts them from their init, while a dense
        bank keeps every rank's values whatever its active rank."""
        self.handle = handle
        self.config = handle.config
        L, E, M = handle.rank_map_shape()
        self.schedule = GrowthSchedule.build(self.config, train_iters, warmup_iters,
                                             [E * M] * L)
        self.saliency = SaliencyState(L, E, M, self.config.rank_max)
        self.rank_map = (handle.initial_rank_map() if rank_map is None
                         else torch.as_tensor(rank_map, dtype=torch.int64).clone())
        handle.set_rank_map(self.rank_map)
        self.routing = RoutingStatistics(handle)
        self.events: List[Dict] = []
        self._pending = None
        self._collect_seconds = 0.0
        self._edp_rank = comm.expert_data_parallel_rank()
        self._grad_masks = {}
        self.attach_ddp_models(ddp_models)

    def attach_ddp_models(self, ddp_models) -> None:
        """The DDP-wrapped chunks: with the distributed optimizer each expert-DP rank owns a
        shard of the reduced gradients, and only that shard is counted. Required once the
        adapters are wrapped by Megatron DDP (they have `main_grad`): collect() refuses to
        count gradients without knowing which shard this rank owns."""
        self._ddp_attached = ddp_models is not None
        self._grad_masks = distributed_optimizer_grad_masks(ddp_models,
                                                            list(self.handle.lora_parameters()))

    def attach_optimizer(self, optimizer) -> None:
        """The optimizer that trains the adapters. Needed with the rank pool when it keeps
        its own copy of them (Megatron's mixed-precision and distributed optimizers: fp32 main
        params; any optimizer's states): a grown rank's init is written there too and the
        new slot's optimizer state zeroed (compat.optimizer.write_param_rows), and at every
        rank change the pool is packed anew with the optimizer's copy and states moving with
        its rows (compat.optimizer.move_param_rows), so the forward takes views instead of
        gathering. Megatron-LM's loop attaches its optimizer itself; a torch optimizer over
        fp32 adapters may be left unattached (grown ranks then take free slots, nothing
        moves, and the forward gathers the active slots)."""
        from megatron_drlora.compat.optimizer import (check_pool_optimizer, move_param_rows,
                                                      write_param_rows)

        banks = self.handle.pooled_banks()
        check_pool_optimizer(optimizer, [p for bank in banks
                                         for p in (bank.slots_hidden, bank.slots_ffn)])
        for bank in banks:
            bank.row_writer = (None if optimizer is None else
                               functools.partial(write_param_rows, optimizer))
            bank.row_mover = (None if optimizer is None else
                              functools.partial(move_param_rows, optimizer))

    def _require_ddp_models(self) -> None:
        if self._ddp_attached:
            return
        if any(hasattr(p, "main_grad") for p in self.handle.lora_parameters()):
            raise RuntimeError(
                "DR-LoRA: the adapters are wrapped by Megatron DDP (they have main_grad) but "
                "the controller was given no DDP models, so it cannot tell which gradient "
                "shard this rank owns (with the distributed optimizer only that shard is "
                "reduced) and would miscount the rank importance. Pass "
                "DRLoRAController(..., ddp_models=<the DDP-wrapped model chunks>) or call "
                "controller.attach_ddp_models(<the DDP-wrapped model chunks>) before collect().")

    # --- which shards count ----------------------------------------------------------------
    def _contributes(self, sharded_attr: str):
        def gate(bank, name) -> bool:
            # Replicas of these experts hold the same reduced grads: count one of them; with the
            # distributed optimizer every replica adds the shard it owns instead.
            if not self._grad_masks and self._edp_rank != 0:
                return False
            spec = bank.specs[name]
            return getattr(spec, sharded_attr) or spec.tp_rank == 0

        return gate

    # --- the step --------------------------------------------------------------------------
    def after_gradients(self, step: int) -> StepReport:
        """collect() and finish() in one call, for loops whose optimizer step never skips."""
        self.collect(step)
        return self.finish(step, stepped=True)

    def collect(self, step: int, loss_scale: float = 1.0) -> None:
        """After the step's gradients are reduced, before the optimizer step: sum the expert-TP
        replicated factors' gradients (required once per step with expert-TP > 1), freeze the
        router if due, and reduce this step's statistics (one fused all-reduce). Nothing enters
        the EMAs until finish() says the optimizer really stepped. `loss_scale` (fp16) divides the
        rank importance so it is measured on unscaled gradients."""
        self._require_ddp_models()
        start = time.perf_counter()
        # Expert-TP > 1: sum the replicated factors' partial gradients first (one all-reduce
        # per MoE layer), so the statistics below and the optimizer's grad norm see true ones.
        comm.sum_replicated_gradients([replicated_gradients(l.bank) for l in self.handle.layers])
        cfg = self.config
        if not self.schedule.router_trainable(step):
            self._zero_router_grads()
        self._pending = None
        if cfg.method == "drlora":
            routed = self.routing.routed if cfg.frequency == "weight" else self.routing.counts
            tensors = [routed, self.routing.tokens]
            if cfg.saliency != "frequency":
                tensors += list(local_sensitivity(self.handle, self._contributes("a_sharded"),
                                                  self._contributes("b_sharded"),
                                                  self._grad_masks))
            reduced = comm.reduce_step_statistics(*tensors)
            if self.saliency.device != reduced[0].device:  # once: EMAs follow the statistics
                self.saliency.to(reduced[0].device)
            if len(reduced) == 4 and loss_scale != 1.0:
                reduced[2] = reduced[2] / loss_scale
                reduced[3] = reduced[3] / loss_scale
            self._pending = (step, reduced)
        self.routing.reset()
        self._collect_seconds = time.perf_counter() - start

    def finish(self, step: int, stepped: bool) -> StepReport:
        """After the optimizer step. `stepped` False (Megatron skipped the update: NaN/inf
        gradient, fp16 loss-scale overflow) drops the step's statistics; a non-finite statistic
        is dropped too, with a warning naming the step. A growth event due at this step runs
        either way, on the EMAs as they stand."""
        start = time.perf_counter()
        report = StepReport(step=step, router_trainable=self.schedule.router_trainable(step))
        pending, self._pending = self._pending, None
        if pending is not None:
            pending_step, reduced = pending
            if pending_step != step:
                raise RuntimeError(f"DR-LoRA statistics of step {pending_step} finished as "
                                   f"step {step}: collect() and finish() out of order")
            l1_a, l1_b = (reduced[2], reduced[3]) if len(reduced) == 4 else (None, None)
            if not stepped:
                report.dropped = "the optimizer skipped this step"
                _warn_dropped(step, report.dropped)
            else:  # no host sync: a non-finite step is masked on the device, reported lazily
                accepted = self.saliency.update_on_device(
                    reduced[0], reduced[1], l1_a, l1_b,
                    self._rank_map_on(self.saliency.device), self.config.beta)
                report._nonfinite = ~accepted
            if self.schedule.is_event(step):
                report.dropped  # noqa: B018 -- the event syncs anyway: resolve and warn now
                self._grow(step, report)
        report.seconds = self._collect_seconds + time.perf_counter() - start
        self._collect_seconds = 0.0
        return report

    def _rank_map_on(self, device: torch.device) -> torch.Tensor:
        """The rank map on the EMAs' device, copied once per new map (growth, load)."""
        if self.rank_map.device == device:
            return self.rank_map
        cached = getattr(self, "_rank_map_cache", None)
        if cached is None or cached[0] is not self.rank_map or cached[1].device != device:
            # non_blocking: a host-to-device copy that does not wait for the GPU's queue
            cached = self._rank_map_cache = (self.rank_map,
                                             self.rank_map.to(device, non_blocking=True))
        return cached[1]

    def _grow(self, step: int, report: StepReport) -> None:
        cfg, sched = self.config, self.schedule
        # The host reads the statistics only here (the pure allocator runs on CPU tensors).
        scores = self.saliency.saliency(self._rank_map_on(self.saliency.device), cfg.saliency,
                                        cfg.gamma).cpu()
        new_map = allocate_growth(scores, self.rank_map, list(sched.quotas), sched.cap,
                                  sched.r_max, [sched.layer_target(l) for l in
                                                range(sched.num_layers)], cfg.allocation,
                                  group_capacity=self.handle.growth_group_capacity())
        # Every rank applies global rank 0's decision (identical by construction even if a
        # near-tie resolved differently here), then an exact integer check confirms it.
        mine, new_map = new_map, comm.broadcast_rank_map(new_map, src=0)
        if not torch.equal(mine, new_map):
            logger.warning("DR-LoRA: at step %d this rank's allocator chose a different rank "
                           "map than global rank 0 (its saliency was not bit-identical); "
                           "applying rank 0's", step)
        comm.check_rank_map_agreement(new_map, step)
        report.event = True
        report.grown = int((new_map - self.rank_map).sum())
        self.rank_map = new_map
        self.handle.set_rank_map(new_map)
        self.saliency.reset_importance()
        per_expert = new_map.to(torch.float64).mean(dim=2)
        report.average_rank = float(new_map.to(torch.float64).mean())
        report.layer_min = [int(v) for v in new_map.flatten(1).min(dim=1).values]
        report.layer_max = [int(v) for v in new_map.flatten(1).max(dim=1).values]
        report.layer_mean = [float(v) for v in per_expert.mean(dim=1)]
        self.events.append({"step": step, "grown": report.grown,
                            "rank_map": new_map.tolist(),
                            "saliency": scores.tolist()})

    def _zero_router_grads(self) -> None:
        """Router frozen (warm-up): it stays in the optimizer but its gradient is zero."""
        for param in self.handle.router_parameters():
            for grad in (getattr(param, "main_grad", None), param.grad):
                if grad is not None:
                    grad.zero_()

    # --- checkpoints -----------------------------------------------------------------------
    def settings(self) -> Dict:
        """The resolved settings that shape the run: what a resume must not change."""
        cfg, sched = self.config, self.schedule
        return {"method": cfg.method, "budget": cfg.budget, "r_init": cfg.rank_init,
                "r_max": cfg.rank_max, "alpha": cfg.lora_alpha, "targets": list(cfg.targets),
                "dropout": cfg.dropout, "beta": cfg.beta, "gamma": cfg.gamma,
                "p_grow": cfg.p_grow, "grow_interval": cfg.grow_interval,
                "grow_buffer": cfg.grow_buffer, "allocation": cfg.allocation,
                "saliency": cfg.saliency, "frequency": cfg.frequency, "router": cfg.router,
                "seed": cfg.seed, "t_warmup": sched.t_warmup, "train_iters": sched.train_iters,
                "shared_experts": cfg.shared_experts}

    def state_dict(self) -> Dict:
        return {
            "rank_map": self.rank_map.clone(),
            "saliency": self.saliency.state_dict(),
            "config": self.config.to_dict(),
            "settings": self.settings(),
            "num_events": len(self.events),
            # reported apart from the routed budget (--drlora-shared-experts)
            "shared_experts": self.handle.shared_summary(),
        }

    def load_state_dict(self, state: Dict, new_run: bool = False) -> None:
        """Restore a saved state. Resuming (`new_run` False) refuses a state saved with other
        settings, naming each; a new run started from saved adapters (`new_run`, Megatron's
        --finetune) needs only the same r_max and targets and starts its EMAs afresh."""
        rank_map = torch.as_tensor(state["rank_map"], dtype=torch.int64)
        if tuple(rank_map.shape) != tuple(self.rank_map.shape):
            raise ValueError(f"checkpoint rank map {tuple(rank_map.shape)} does not fit this "
                             f"model's {tuple(self.rank_map.shape)} (MoE layers, experts, "
                             f"projections)")
        saved, now = state.get("settings", {}), self.settings()
        keys = SHAPE_SETTINGS if new_run else tuple(now)
        differ = [f"{k} {saved.get(k, SETTING_DEFAULTS.get(k))!r} (this run: {now[k]!r}"
                  f"{', --drlora-shared-experts' if k == 'shared_experts' else ''})"
                  for k in keys if saved.get(k, SETTING_DEFAULTS.get(k)) != now[k]]
        if differ:
            raise ValueError("the checkpoint was made with other DR-LoRA settings: "
                             + ", ".join(differ))
        if not new_run:
            self.saliency.load_state_dict(state["saliency"])
        self.rank_map = rank_map
        self.handle.set_rank_map(rank_map)
