"""Write rows of a parameter into the optimizer's own copy of it (`write_param_rows`).

Why: the pooled bank (`--drlora-rank-pool`) writes a rank's init into a free slot when it
grows. An optimizer that keeps its own main copy would otherwise overwrite the write at its
next step: Megatron's mixed-precision optimizers keep fp32 main params for bf16/fp16 params
(`param.main_param`), the distributed optimizer keeps fp32 main *shards* (flat ranges of the
param this data-parallel rank owns), fp32 params without the distributed optimizer are their
own main, and a ChainedOptimizer wraps several of these. A new slot also starts with zero
optimizer state (a fresh rank's moments, like the dense bank's never-trained ranks).

Where the mapping lives differs across megatron-core versions; it is read here only.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch


class UnsupportedOptimizer(RuntimeError):
    """The optimizer keeps a copy of the parameters DR-LoRA cannot write into."""


def _flat_rows(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor):
    width = param.numel() // param.shape[0]
    rows = rows.to(torch.int64).cpu()
    index = (rows.unsqueeze(1) * width + torch.arange(width)).reshape(-1)
    return index, values.reshape(-1)


def _write(target: torch.Tensor, start: int, index: torch.Tensor, values: Optional[torch.Tensor]):
    """target is the flat range [start, start + numel) of the param; write the elements of
    `index` that fall in it (values None: zeros)."""
    flat = target.view(-1)
    keep = (index >= start) & (index < start + flat.numel())
    if not bool(keep.any()):
        return
    where = (index[keep] - start).to(flat.device)
    if values is None:
        flat[where] = 0
    else:
        flat[where] = values[keep.to(values.device)].to(device=flat.device, dtype=flat.dtype)


def _leaves(optimizer) -> Iterator:
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        for inner in chained:
            yield from _leaves(inner)
    else:
        yield optimizer


def _refuse_unsupported(optimizer) -> None:
    config = getattr(optimizer, "config", None)
    for attr, flag in (("use_precision_aware_optimizer", "--use-precision-aware-optimizer"),
                       ("optimizer_cpu_offload", "--optimizer-cpu-offload")):
        if getattr(config, attr, False):
            raise UnsupportedOptimizer(
                f"--drlora-rank-pool cannot write a grown rank into the optimizer's copy of "
                f"the adapters with {flag} (its main params and states live where DR-LoRA "
                f"does not reach); drop {flag} or --drlora-rank-pool")


def _targets(optimizer, param) -> Optional[Tuple[Optional[torch.Tensor], int, Dict]]:
    """(main copy or None if it is `param` itself, flat start offset, optimizer states) of
    `param` in one leaf optimizer, or None if it does not hold `param`."""
    if hasattr(optimizer, "model_param_gbuf_map"):  # Megatron's DistributedOptimizer
        if param not in optimizer.model_param_gbuf_map:
            return None
        if param not in getattr(optimizer, "model_param_group_index_map", {}):
            return (None, 0, {})  # no shard of it on this rank
        _refuse_unsupported(optimizer)
        tensors = dict(optimizer._get_main_param_and_optimizer_states(param))
        start = optimizer._get_model_param_range_map(param)["param"].start
        return tensors.pop("param"), start, tensors
    if hasattr(optimizer, "float16_groups"):  # Float16OptimizerWithFloat16Params
        inner = optimizer.optimizer
        for group16, group32 in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            for model_param, main in zip(group16, group32):
                if model_param is param:
                    return main, 0, dict(inner.state.get(main, {}))
        if any(param is p for group in optimizer.fp32_from_fp32_groups for p in group):
            return None, 0, dict(inner.state.get(param, {}))
        return None
    inner = getattr(optimizer, "optimizer", optimizer)  # FP32Optimizer or a torch optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise UnsupportedOptimizer(f"--drlora-rank-pool: cannot find the parameters of a "
                                   f"{type(optimizer).__name__}")
    if any(param is p for group in inner.param_groups for p in group["params"]):
        _refuse_unsupported(optimizer)
        return None, 0, dict(inner.state.get(param, {}))
    return None


@torch.no_grad()
def write_param_rows(optimizer, param: torch.Tensor, rows: torch.Tensor,
                     values: torch.Tensor) -> None:
    """Make rows `rows` of `param` (dim 0) equal `values` in the optimizer too: its main copy
    gets `values` (already in the param's dtype, so a bf16 param's fp32 main equals the param,
    as at the optimizer's construction) and the optimizer states of those rows are zeroed.
    `param` itself must already hold the values. Raises UnsupportedOptimizer, naming the flag,
    for an optimizer whose copy cannot be written; a param the optimizer does not hold is left
    alone (it is not trained by it)."""
    if optimizer is None or rows.numel() == 0:
        return
    index, flat_values = _flat_rows(param, rows, values)
    for leaf in _leaves(optimizer):
        found = _targets(leaf, param)
        if found is None:
            continue
        main, start, states = found
        if main is not None:
            _write(main, start, index, flat_values)
        for key, state in states.items():
            if torch.is_tensor(state) and state.dim() > 0 and key != "step":
                _write(state, start, index, None)
