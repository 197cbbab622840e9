"""DRLoRARun: the DR-LoRA side of one Megatron-LM training run.

Megatron-LM's loop calls, per iteration: forward/backward over the micro-batches, then
`config.finalize_model_grads_func`, then `optimizer.step()`. The run hooks in at exactly those
two points:
- finalize: Megatron's own `finalize_model_grads` (DP/EP gradient reduction), then
  `controller.collect` (router freeze, this step's statistics, one fused all-reduce);
- after the optimizer step (the optimizer's `step` is wrapped once, found through
  `config.grad_scale_func`, which Megatron-LM sets to the optimizer's `scale_loss`):
  `controller.finish(stepped)`. A step Megatron skips (fp16 overflow, NaN) leaves the saliency
  EMAs untouched; a growth event runs on the EMAs as they stand, so new ranks are active from
  the next iteration's forward.
The step number is Megatron's own (`args.curr_iteration`), so events land on the planned
iterations whatever was resumed.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from megatron_drlora.config import DRLoRAConfig

_RUN: Optional["DRLoRARun"] = None



def current_run() -> Optional["DRLoRARun"]:
    return _RUN


def start_run(config: Optional[DRLoRAConfig]) -> Optional["DRLoRARun"]:
    """Make the run Megatron-LM's providers will use (None: no DR-LoRA, full training)."""
    global _RUN
    _RUN = DRLoRARun(config) if config is not None else None
    return _RUN


def _print0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _refuse_dense_checkpoint_for_pool(args) -> None:
    """A checkpoint written with --no-drlora-rank-pool (the dense bank) has no slot tables;
    dist_checkpointing would fail on the missing key deep inside the load: say so before it
    starts."""
    from megatron_drlora.checkpoint import CheckpointError, resolve

    if not getattr(args, "load", None):
        return
    try:
        path = resolve(args.load, "--load", getattr(args, "ckpt_step", None))
    except CheckpointError:
        return  # nothing to resume: Megatron-LM starts from scratch
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(path)
    adapters = [k for k in keys if k.startswith("drlora.layers.")]
    if adapters and not any("pool_table" in k for k in adapters):
        raise RuntimeError(f"--load {path} was written by the dense bank (no slot tables: "
                           f"--no-drlora-rank-pool, or a version before the rank pool was "
                           f"the default); resume it with --no-drlora-rank-pool (a pooled "
                           f"checkpoint loads either way)")


def warmup_iterations(args) -> int:
    """LR warm-up in iterations, as Megatron-LM's OptimizerParamScheduler counts it."""
    from megatron_drlora.schedule import warmup_iterations as from_iterations

    if args.train_samples:  # sample-based: warm-up and decay are in samples
        samples = args.lr_warmup_samples
        if args.lr_warmup_fraction is not None:
            samples = args.lr_warmup_fraction * (args.lr_decay_samples or args.train_samples)
        return int(samples) // args.global_batch_size
    return from_iterations(args.train_iters, args.lr_warmup_iters, args.lr_warmup_fraction,
                           args.lr_decay_iters)


class DRLoRARun:
    """Adapted chunks, the controller, and the hooks into Megatron-LM's loop."""

    def __init__(self, config: DRLoRAConfig):
        self.config = config
        self.chunks = []
        self.handle = None
        self.controller = None
        self.base_checkpoint: Optional[str] = None
        self.rank_log = None
        self.step_log = None
        self.optimizer = None
        self._loaded_state: Optional[Dict] = None
        self._ddp_attached = False
        self._window_seconds = 0.0
        self._window_steps = 0
        self.last_step_seconds = 0.0
        self._unwritten_steps = []
        self._loss_report = None  # (device, entries) of the current step

    # --- model construction (model provider) -----------------------------------------------
    def adapt(self, model, args) -> None:
        """Collect this rank's chunks; with the last one, load the base and apply DR-LoRA."""
        from megatron_drlora.checkpoint import load_base_checkpoint
        from megatron_drlora.inject import apply_drlora
        from megatron_drlora.megatron_lm import checkpoint_view

        self.chunks.append(model)
        if len(self.chunks) < (args.virtual_pipeline_model_parallel_size or 1):
            return
        self.base_checkpoint = args.pretrained_checkpoint
        if self.base_checkpoint:
            load_base_checkpoint(self.base_checkpoint, self.chunks)
            _print0(f"> loaded the frozen base from --pretrained-checkpoint "
                    f"{self.base_checkpoint}")
        else:  # in-process use only (benchmarks): the command line requires a base
            _print0("> no --pretrained-checkpoint: the base keeps its initialisation")
        # Megatron-LM would otherwise load --pretrained-checkpoint again as a --finetune start
        # when --load holds nothing; here the base is ours to load, the checkpoint is adapters.
        args.pretrained_checkpoint = None
        self.handle = apply_drlora(self.chunks, self.config, log=_print0)
        if self.config.rank_pool:
            _refuse_dense_checkpoint_for_pool(args)
        for i, chunk in enumerate(self.chunks):
            checkpoint_view.install(chunk, self, holds_state=i == 0)
            chunk.config.finalize_model_grads_func = self.finalize_model_grads
            chunk.register_forward_pre_hook(self._before_forward)
        if args.weight_decay > 0 and self.config.router == "warmup_frozen":
            _print0(f"> note: the router is frozen during warm-up by zero gradients; with "
                    f"--weight-decay {args.weight_decay} Megatron's decoupled weight decay "
                    f"still shrinks it then (the paper uses --weight-decay 0)")

    # --- the controller ---------------------------------------------------------------------
    def _ensure_controller(self):
        if self.controller is not None:
            return self.controller
        from megatron.training import get_args

        from megatron_drlora.controller import DRLoRAController
        from megatron_drlora.megatron_lm.logs import RankLog, StepLog
        from megatron_drlora.schedule import budget_shortfall_message

        args = get_args()
        loaded = self._loaded_state
        self.controller = DRLoRAController(self.handle, args.train_iters,
                                           self.config.warmup_iters
                                           if self.config.warmup_iters is not None
                                           else warmup_iterations(args),
                                           # a load's ranks stay (a pooled bank would free
                                           # the loaded slots above r_init otherwise)
                                           rank_map=None if loaded is None
                                           else loaded["rank_map"])
        sched = self.controller.schedule
        _print0(f"> DR-LoRA schedule: {sched.num_event_steps} growth events (first "
                f"{sched.event_steps()[0] if sched.grows else '-'}, every "
                f"{sched.grow_interval}), quota per layer {sched.quotas[0] if sched.quotas else 0}"
                f", cap {sched.cap}, router trainable from iteration "
                f"{sched.t_warmup if self.config.router == 'warmup_frozen' else self.config.router}")
        shortfall = budget_shortfall_message(sched)
        if shortfall:
            _print0(f"> WARNING: {shortfall}")
        log_dir = args.drlora_log_dir or args.save or "runs"
        fresh = self._loaded_state is None or bool(args.finetune)
        self.rank_log = RankLog(log_dir, self.handle.projections, self.handle.moe_layer_numbers,
                                fresh=fresh)
        self.step_log = StepLog(log_dir, fresh=fresh)
        if self._loaded_state is not None:
            self._restore(self._loaded_state, args)
            self._loaded_state = None
        if fresh:
            self.rank_log.rank_map(0, self.controller.rank_map, kind="initial")
        return self.controller

    def _before_forward(self, module, inputs):
        if self.controller is None and torch.is_grad_enabled() and module.training:
            self._ensure_controller()  # routing statistics count from the first forward

    # --- finalize_model_grads_func ------------------------------------------------------------
    def finalize_model_grads(self, model, num_tokens=None, *args, **kwargs):
        from megatron.core.distributed import finalize_model_grads
        from megatron.training import get_args

        finalize_model_grads(model, num_tokens, *args, **kwargs)
        controller = self._ensure_controller()
        if not self._ddp_attached:
            controller.attach_ddp_models(model)
            self._follow_optimizer(model[0])
            self._ddp_attached = True
        mega = get_args()
        scale = float(self.optimizer.get_loss_scale()) if mega.fp16 else 1.0
        controller.collect(mega.curr_iteration, loss_scale=scale)

    def _follow_optimizer(self, chunk) -> None:
        from megatron.core.utils import get_model_config

        optimizer = getattr(get_model_config(chunk).grad_scale_func, "__self__", None)
        if optimizer is None or not callable(getattr(optimizer, "step", None)):
            raise RuntimeError("DR-LoRA expects Megatron-LM's training loop: "
                               "config.grad_scale_func must be the Megatron optimizer's "
                               "scale_loss (megatron.training.training sets it)")
        step = optimizer.step

        def step_then_drlora(*args, **kwargs):
            result = step(*args, **kwargs)
            self._after_optimizer_step(bool(result[0]), result[1])
            return result

        optimizer.step = step_then_drlora
        self.optimizer = optimizer
        self.controller.attach_optimizer(optimizer)  # the rank pool writes / moves its copy

    def _after_optimizer_step(self, stepped: bool, grad_norm) -> None:
        from megatron.training import get_args

        args = get_args()
        report = self.controller.finish(args.curr_iteration, stepped)
        self.last_step_seconds = report.seconds
        self._loss_report = None
        self._window_seconds += report.seconds
        self._window_steps += 1
        iteration = args.curr_iteration + 1
        average = float(self.controller.rank_map.double().mean())
        # Whether a step's statistics were dropped as non-finite is known on the device only:
        # the step records are written at log intervals, events, saves and the end, where
        # Megatron-LM synchronises anyway, not after every step.
        self._unwritten_steps.append((iteration, stepped, grad_norm, average, report))
        if report.event or iteration % args.log_interval == 0 or iteration == args.train_iters:
            self._write_steps()
        if report.event:
            _print0(report.log_line())
            self.rank_log.rank_map(report.step, self.controller.rank_map,
                                   saliency=self.controller.events[-1]["saliency"])
        if iteration % args.log_interval == 0 or report.event:
            self._write_scalars(iteration, report)
        if iteration == args.train_iters:
            self._plot()

    # --- logging ------------------------------------------------------------------------------
    def _write_steps(self) -> None:
        for iteration, stepped, grad_norm, average, report in self._unwritten_steps:
            self.step_log.step(iteration, stepped, grad_norm, average, report.seconds,
                               report.event, report.dropped)
        self._unwritten_steps = []

    def rank_figures(self) -> Dict[str, float]:
        ranks = (self.controller.rank_map if self.controller is not None
                 else self.handle.initial_rank_map()).double()
        return {"avg rank": float(ranks.mean()), "min rank": float(ranks.min()),
                "max rank": float(ranks.max())}

    def loss_report(self, device) -> Dict[str, torch.Tensor]:
        """Entries for the forward step's loss dict: Megatron-LM averages them over the log
        interval and prints them in its iteration line and to TensorBoard / W&B. On the loss's
        device (Megatron all-reduces them with NCCL on GPUs); built once per step, not per
        micro-batch."""
        if self._loss_report is None or self._loss_report[0] != device:
            figures = self.rank_figures()
            figures["saliency ms"] = 1000.0 * self.last_step_seconds
            self._loss_report = (device, {f"drlora {name}": torch.tensor([value, 1.0],
                                                                         device=device)
                                          for name, value in figures.items()})
        return self._loss_report[1]

    def _write_scalars(self, iteration: int, report) -> None:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        values = {f"drlora/{k}": v for k, v in self.rank_figures().items()}
        values["drlora/saliency seconds per step"] = (
            self._window_seconds / max(1, self._window_steps))
        if report.event:
            values["drlora/ranks grown at event"] = float(report.grown)
        self._window_seconds, self._window_steps = 0.0, 0
        writer, wandb = get_tensorboard_writer(), get_wandb_writer()
        for name, value in values.items():
            if writer is not None:
                writer.add_scalar(name, value, iteration)
        if wandb is not None:
            wandb.log(values, iteration)

    def _plot(self) -> None:
        if torch.distributed.get_rank() != 0 or not os.path.isfile(self.rank_log.path):
            return
        try:
            from megatron_drlora.plotting import plot_run

            paths = plot_run(self.rank_log.path)
            _print0(f"> DR-LoRA rank pictures: {paths['heatmap']}, {paths['growth']}")
        except ImportError:
            _print0("> matplotlib is not installed: no rank pictures (tools/plot_ranks.py "
                    "draws them later from drlora_ranks.jsonl)")

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> Dict:
        """The DR-LoRA state a checkpoint carries (before the controller exists, e.g. while
        Megatron-LM builds the request of a load, the initial one)."""
        if self.controller is not None:
            from megatron.training import get_args

            self._write_steps()  # the log covers what the checkpoint covers
            state = self.controller.state_dict()
            state["iteration"] = get_args().curr_iteration + 1  # the iteration being saved
        else:
            state = {"rank_map": self.handle.initial_rank_map(), "saliency": None,
                     "config": self.config.to_dict(), "settings": {}, "num_events": 0,
                     "shared_experts": self.handle.shared_summary()}
        state["base_checkpoint"] = self.base_checkpoint
        return state

    def load_checkpoint_state(self, state: Dict) -> None:
        """Called by the view's load_state_dict during Megatron-LM's load_checkpoint (the
        optimizer and scheduler exist then, so the schedule's length is known)."""
        from megatron.training import get_args

        if self.controller is None:
            self._loaded_state = state
            self._ensure_controller()
        else:
            self._restore(state, get_args())

    def _restore(self, state: Dict, args) -> None:
        try:
            self.controller.load_state_dict(state, new_run=bool(args.finetune))
        except ValueError as err:
            hint = ("" if args.finetune else "; resume with the same settings, or start a new "
                    "run from these adapters with --finetune")
            raise RuntimeError(f"--load {args.load}: {err}{hint}") from None
        if not args.finetune and state.get("iteration") is not None:
            dropped = (self.rank_log.resume_at(state["iteration"])
                       + self.step_log.resume_at(state["iteration"]))
            if dropped:
                _print0(f"> DR-LoRA logs: dropped {dropped} records of iterations after "
                        f"{state['iteration']}, the checkpoint this run resumes from")
        average = float(self.controller.rank_map.double().mean())
        _print0(f"> DR-LoRA state restored: average rank {average:.2f}"
                f"{' (saliency EMAs restart: --finetune)' if args.finetune else ''}")
