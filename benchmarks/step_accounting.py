"""What benchmarks/step_time.py measures besides time: adapter memory read from Megatron's DDP
buffers and optimizer, DR-LoRA's host syncs in a training step, rank maps along the planned
trajectory, and the integration of step times over a run."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Dict, List, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------------
# adapter memory, from the DDP buffers and the optimizer that hold it
# --------------------------------------------------------------------------------------------
MEMORY_PARTS = ("parameters", "gradients", "main_copies", "optimizer_state")


def _optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _model_of_main(opt) -> Dict[int, torch.Tensor]:
    """id(main param) -> model param, for Megatron's mixed-precision and distributed
    optimizers (an FP32Optimizer steps the model params themselves)."""
    pairs = {}
    for model_attr, main_attr in (("float16_groups", "fp32_from_float16_groups"),
                                  ("fp32_from_fp32_groups", "fp32_from_fp32_groups"),
                                  ("model_float16_groups", "shard_fp32_from_float16_groups"),
                                  ("model_fp32_groups", "shard_fp32_groups")):
        models, mains = getattr(opt, model_attr, None), getattr(opt, main_attr, None)
        if not models or not mains:
            continue
        for group_models, group_mains in zip(models, mains):
            for model_param, main_param in zip(group_models, group_mains):
                pairs[id(main_param)] = model_param
    return pairs


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except Exception:
        return a is b


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def trainable_memory(model_chunks, optimizer, adapters: Sequence[torch.Tensor]) -> Dict:
    """Bytes of the adapters' parameters, gradients (DDP's `main_grad` views of its grad
    buffers), main copies (the optimizer's fp32 params when they are not the model params)
    and optimizer state (every tensor in the torch optimizer's state of their main params).
    The same for every other trainable parameter (routers) under `other`. `model_chunks`:
    the DDP-wrapped chunks Megatron trains."""
    adapter_ids = {id(p) for p in adapters}
    out = {"adapters": dict.fromkeys(MEMORY_PARTS, 0), "other": dict.fromkeys(MEMORY_PARTS, 0)}

    def add(param, part, n):
        out["adapters" if id(param) in adapter_ids else "other"][part] += int(n)

    for chunk in model_chunks:
        for p in chunk.parameters():
            if not p.requires_grad:
                continue
            add(p, "parameters", _nbytes(p))
            grad = getattr(p, "main_grad", None)
            add(p, "gradients", _nbytes(grad if grad is not None else p))
    for opt in _optimizers(optimizer):
        model_of = _model_of_main(opt)
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for main in group["params"]:
                model = model_of.get(id(main), main)
                if model is not main and not _same_storage(model, main):
                    add(model, "main_copies", _nbytes(main))
                for value in inner.state.get(main, {}).values():
                    if torch.is_tensor(value) and value.numel() > 1:
                        add(model, "optimizer_state", _nbytes(value))
    for key in ("adapters", "other"):
        out[key]["total"] = sum(out[key][p] for p in MEMORY_PARTS)
    grad_buffers = 0
    for chunk in model_chunks:
        for attr in ("buffers", "expert_parallel_buffers"):
            buffers = getattr(chunk, attr, None)  # DDP's lists (a plain module: its method)
            for buf in buffers if isinstance(buffers, (list, tuple)) else []:
                if getattr(buf, "grad_data", None) is not None:
                    grad_buffers += _nbytes(buf.grad_data)
    out["ddp_grad_buffer_bytes"] = grad_buffers  # incl. routers and bucket padding
    return out


# --------------------------------------------------------------------------------------------
# host syncs caused by DR-LoRA
# --------------------------------------------------------------------------------------------
_T = torch.Tensor
# Calls that read a value back to the host (a GPU sync) or have a data-dependent shape.
_SYNCING = {_T.item, _T.tolist, _T.cpu, _T.numpy, _T.__bool__, _T.__float__, _T.__int__,
            _T.__index__, _T.nonzero, torch.nonzero, _T.argwhere, torch.argwhere,
            _T.masked_select, torch.masked_select, _T.unique, torch.unique}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.rand, torch.randn}
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE = os.sep + "megatron_drlora" + os.sep
# compat/cpu.py's factory proxies stand in for Megatron's own device="cuda" allocations on
# CPU: their calls belong to the Megatron code that called them.
_PASS_THROUGH = (os.path.join("megatron_drlora", "compat", "cpu.py"),)


def _skipped(name: str) -> bool:
    return (name.startswith(_TORCH_DIR) or name == __file__ or name.endswith(_PASS_THROUGH)
            or name.endswith(os.path.join("", "warnings.py")))


def _drlora_frame(stack=None):
    """'file:line' of the innermost frame outside torch and this file if it is DR-LoRA's."""
    if stack is None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not _skipped(name):
                return (f"{name.split(_PACKAGE)[-1]}:{frame.f_lineno}" if _PACKAGE in name
                        else None)
            frame = frame.f_back
        return None
    for name, line in reversed(stack):
        if not _skipped(name):
            return f"{name.split(_PACKAGE)[-1]}:{line}" if _PACKAGE in name else None
    return None


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls DR-LoRA's own code makes that wait for an accelerator: scalar reads,
    host copies, data-dependent shapes, host-built tensors (the rule of
    tests/test_host_syncs.py). On CPU nothing waits, so this simulates a model on a GPU.

    Tensors DR-LoRA keeps on the host by design (the rank map; `host` at construction) and
    everything computed only from them are exempt: reading them costs no device sync."""

    def __init__(self, host_tensors: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.calls: List[str] = []
        self._host = {id(t): t for t in host_tensors}  # strong refs: ids stay unique

    def _only_host(self, args, kwargs) -> bool:
        tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
        return bool(tensors) and all(id(t) in self._host for t in tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "_drlora_cpu", False):
            # compat.cpu's Tensor.type wrapper calls the C method, which lands here as the
            # wrapper again: answer with the C method, the outer wrapper adjusts the name once
            func = torch._C.TensorBase.type
        host_only = self._only_host(args, kwargs)
        reason = None
        if func in _SYNCING:
            reason = func.__name__
        elif func is _T.to and ("device" in kwargs or any(
                isinstance(a, (str, torch.device)) for a in args[1:])):
            reason = "to(device)"
        elif func is _T.copy_ and args[0].device != args[1].device:
            reason = "copy_ across devices"
        elif func in _FACTORIES and "device" not in kwargs:
            reason = f"{func.__name__} on the host"
        out = func(*args, **kwargs)
        if host_only or (func in _FACTORIES and "device" not in kwargs):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if torch.is_tensor(t):
                    self._host[id(t)] = t
        if reason is not None and not host_only:
            where = _drlora_frame()
            if where is not None:
                self.calls.append(f"{reason} at {where}")
        return out


class CudaSyncCounter:
    """On CUDA: the synchronising operations torch itself reports
    (`torch.cuda.set_sync_debug_mode('warn')`), attributed to DR-LoRA when its code is the
    innermost non-torch frame. Never raises: a failure is reported as None."""

    def __init__(self):
        self.drlora: List[str] = []
        self.total = 0
        self.error = None

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message).lower():
                return
            self.total += 1
            where = _drlora_frame([(f.filename, f.lineno) for f in traceback.extract_stack()])
            if where is not None:
                self.drlora.append(where)

        warnings.showwarning = show
        try:
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as err:  # an old torch: no count, not a failure
            self.error = repr(err)
        return self

    def __exit__(self, *exc):
        try:
            torch.cuda.set_sync_debug_mode(0)
        except Exception:
            pass
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------------
# rank maps along the planned trajectory
# --------------------------------------------------------------------------------------------
def trajectory_maps(schedule, initial: torch.Tensor, points: int, seed: int,
                    scope: str = "layer") -> List[Tuple[int, torch.Tensor]]:
    """[(events done, rank map)] at `points` places of the run: the initial map, the map once
    the planned average rank is 1/(points-1), 2/(points-1), ... of the way to r_target.

    The maps come from the real allocator (allocator.allocate_growth with the schedule's
    quota, cap and targets) fed a synthetic saliency: a per-expert popularity (log-normal,
    fixed for the run) times noise per event, divided by (rank / r_init)^1.2 like the paper's
    rank penalty, so busy experts grow first and the map ends heterogeneous."""
    from megatron_drlora.allocator import allocate_growth

    L, E, M = initial.shape
    g = torch.Generator().manual_seed(seed)
    popularity = torch.exp(torch.randn(L, E, generator=g, dtype=torch.float64))
    n_events = schedule.num_event_steps
    start = schedule.planned_total_active(-1)
    target = schedule.planned_total_active(schedule.train_iters)
    wanted = []
    for i in range(points):
        goal = start + (target - start) * i / max(1, points - 1)
        k = next((k for k in range(n_events + 1)
                  if schedule.planned_total_active(schedule.event_step(k) if k else -1)
                  >= goal), n_events)
        wanted.append(k)
    targets = [schedule.layer_target(l) for l in range(L)]
    ranks = initial.clone().to(torch.int64)
    out, k = [], 0
    for want in wanted:
        while k < want:
            noise = torch.exp(0.3 * torch.randn(L, E, generator=g, dtype=torch.float64))
            penalty = (ranks.double().mean(dim=2) / schedule.r_init) ** 1.2
            ranks = allocate_growth(popularity * noise / penalty, ranks, schedule.quotas,
                                    schedule.cap, schedule.r_max, targets, scope)
            k += 1
        out.append((k, ranks.clone()))
    return out


# --------------------------------------------------------------------------------------------
# a run from per-step measurements
# --------------------------------------------------------------------------------------------
def integrate_run(points: List[Tuple[float, float]], schedule, event_extra: float) -> Dict:
    """Mean of a per-step quantity over the run: each step at the planned average rank (the
    ranks its forward uses are those after the events of earlier steps), the quantity
    interpolated linearly between the measured (average rank, value) points, plus
    `event_extra` once per growth event. Returns the mean and the time-weighted rank."""
    points = sorted(points)

    def value_at(rank: float) -> float:
        if rank <= points[0][0]:
            return points[0][1]
        for (r0, v0), (r1, v1) in zip(points, points[1:]):
            if rank <= r1:
                return v0 + (v1 - v0) * (rank - r0) / (r1 - r0) if r1 > r0 else v1
        return points[-1][1]

    T = schedule.train_iters
    boundaries = [0] + [e + 1 for e in schedule.event_steps()] + [T]
    acc = weighted_rank = 0.0
    for lo, hi in zip(boundaries, boundaries[1:]):
        if hi <= lo:
            continue
        rank = schedule.planned_total_active(lo - 1) / schedule.total_modules
        acc += (hi - lo) * value_at(rank)
        weighted_rank += (hi - lo) * rank
    events = schedule.num_event_steps
    return {"mean": (acc + events * event_extra) / T, "steps_only_mean": acc / T,
            "time_weighted_average_rank": weighted_rank / T, "events": events,
            "train_iters": T, "warmup_iters": schedule.t_warmup,
            "grow_interval": schedule.grow_interval}
