"""DRLoRAController: the per-step driver of DR-LoRA inside a training loop.

Call `after_gradients(step)` once per optimizer step, after the gradients of the whole step are
reduced (Megatron: after `finalize_model_grads`) and before `optimizer.step()`:

    stats -> one fused all-reduce -> EMAs (identical on every rank) -> [growth event: pure
    allocator -> new rank map -> agreement check] -> router freeze -> reset accumulators

The decision itself (schedule, allocator, saliency) is pure and runs on identical inputs on
every rank; this class only wires it to the model, the statistics and comm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_drlora import comm
from megatron_drlora.allocator import allocate_growth
from megatron_drlora.compat.megatron import distributed_optimizer_grad_masks
from megatron_drlora.saliency import SaliencyState
from megatron_drlora.schedule import GrowthSchedule
from megatron_drlora.statistics import RoutingStatistics, local_sensitivity


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

    def log_line(self) -> str:
        per_layer = " ".join(f"L{l}:{lo}-{hi}" for l, (lo, hi) in
                             enumerate(zip(self.layer_min, self.layer_max)))
        return (f" growth event at step {self.step:8d} (iteration {self.step + 1}) | "
                f"+{self.grown} module-ranks | "
                f"average rank {self.average_rank:.2f} | min-max per layer {per_layer}")


class DRLoRAController:
    """Statistics, saliency EMAs, the growth schedule and the rank map of one training run."""

    def __init__(self, handle, train_iters: int, warmup_iters: Optional[int] = 0,
                 ddp_models=None):
        self.handle = handle
        self.config = handle.config
        L, E, M = handle.rank_map_shape()
        self.schedule = GrowthSchedule.build(self.config, train_iters, warmup_iters,
                                             [E * M] * L)
        self.saliency = SaliencyState(L, E, M, self.config.rank_max)
        self.rank_map = handle.initial_rank_map()
        handle.set_rank_map(self.rank_map)
        self.routing = RoutingStatistics(handle)
        self.events: List[Dict] = []
        self._edp_rank = comm.expert_data_parallel_rank()
        # With the distributed optimizer each expert-DP rank owns a shard of the reduced grads.
        self._grad_masks = distributed_optimizer_grad_masks(ddp_models,
                                                            list(handle.lora_parameters()))

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
        start = time.perf_counter()
        cfg = self.config
        report = StepReport(step=step, router_trainable=self.schedule.router_trainable(step))
        if not report.router_trainable:
            self._zero_router_grads()
        if cfg.method == "drlora":
            need_grads = cfg.saliency != "frequency"
            routed = self.routing.routed if cfg.frequency == "weight" else self.routing.counts
            tensors = [routed, self.routing.tokens]
            if need_grads:
                tensors += list(local_sensitivity(self.handle, self._contributes("a_sharded"),
                                                  self._contributes("b_sharded"),
                                                  self._grad_masks))
            reduced = comm.reduce_step_statistics(*tensors)
            l1_a, l1_b = (reduced[2], reduced[3]) if need_grads else (None, None)
            self.saliency.update(reduced[0], reduced[1], l1_a, l1_b, self.rank_map, cfg.beta)
            if self.schedule.is_event(step):
                self._grow(step, report)
        self.routing.reset()
        report.seconds = time.perf_counter() - start
        return report

    def _grow(self, step: int, report: StepReport) -> None:
        cfg, sched = self.config, self.schedule
        scores = self.saliency.saliency(self.rank_map, cfg.saliency, cfg.gamma)
        new_map = allocate_growth(scores, self.rank_map, list(sched.quotas), sched.cap,
                                  sched.r_max, [sched.layer_target(l) for l in
                                                range(sched.num_layers)], cfg.allocation)
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
    def state_dict(self) -> Dict:
        return {
            "rank_map": self.rank_map.clone(),
            "saliency": self.saliency.state_dict(),
            "config": self.config.to_dict(),
            "schedule": {"train_iters": self.schedule.train_iters,
                         "t_warmup": self.schedule.t_warmup},
            "num_events": len(self.events),
        }

    def load_state_dict(self, state: Dict) -> None:
        rank_map = torch.as_tensor(state["rank_map"], dtype=torch.int64)
        if tuple(rank_map.shape) != tuple(self.rank_map.shape):
            raise ValueError(f"checkpoint rank map {tuple(rank_map.shape)} does not fit this "
                             f"model's {tuple(self.rank_map.shape)} (MoE layers, experts, "
                             f"projections)")
        saved = state.get("config", {})
        for key in ("budget", "r_init", "r_max", "targets", "method"):
            if key in saved and saved[key] != self.config.to_dict()[key]:
                raise ValueError(f"checkpoint was trained with DR-LoRA {key}={saved[key]!r}, "
                                 f"this run has {self.config.to_dict()[key]!r}; use the same "
                                 f"--drlora-* settings to resume")
        self.saliency.load_state_dict(state["saliency"])
        self.rank_map = rank_map
        self.handle.set_rank_map(rank_map)
