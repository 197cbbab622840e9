"""Write or move rows of a parameter in the optimizer's own copy of it (`write_param_rows`,
`move_param_rows`).

Why: the pooled bank (the rank pool, DR-LoRA's default) writes a rank's init into a free slot when it
grows. An optimizer that keeps its own main copy would otherwise overwrite the write at its
next step: Megatron's mixed-precision optimizers keep fp32 main params for bf16/fp16 params
(`param.main_param`), the distributed optimizer keeps fp32 main *shards* (flat ranges of the
param this data-parallel rank owns), fp32 params without the distributed optimizer are their
own main, and a ChainedOptimizer wraps several of these. A new slot also starts with zero
optimizer state (a fresh rank's moments, like the dense bank's never-trained ranks). When the
pool repacks its slots at a rank change, the main copy and the states move with the rows.

Where the mapping lives differs across megatron-core versions; it is read here only.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from megatron_drlora.adapters.pool import moved_rows


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
                f"the rank pool cannot write a grown rank into the optimizer's copy of the "
                f"adapters with {flag} (its main params and states live where DR-LoRA does "
                f"not reach); drop {flag} or pass --no-drlora-rank-pool (the dense bank)")


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
    if inner is None:  # Megatron's placeholder for a param group with nothing to train
        return None
    if not isinstance(inner, torch.optim.Optimizer):
        raise UnsupportedOptimizer(f"the rank pool (--no-drlora-rank-pool turns it off): "
                                   f"cannot find the parameters of a "
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


def _state_tensors(tensors: Dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items()
            if torch.is_tensor(v) and v.dim() > 0 and k != "step"}


def _distributed_buffer(leaf, param: torch.Tensor):
    """The grad buffer of a DistributedOptimizer leaf that holds `param` (None: another
    leaf's). Its `model_param_gbuf_map` only lists the params with a shard on this rank."""
    for buffer in getattr(leaf, "buffers", []):
        if param in buffer.param_index_map:
            return buffer
    return None


def _move_distributed(leaf, buffer, param: torch.Tensor, source: torch.Tensor) -> None:
    """Megatron's DistributedOptimizer: the main copy and states of `param` are flat shards
    spread over the optimizer's data-parallel group, and a moved row may come from another
    rank's shard. Every rank of the group (holding a shard of `param` or not: the calls are
    collective) rebuilds each whole tensor by one all-reduce of zero-padded shards, moves the
    rows and keeps its own range, over the group that shards `buffer`. Growth events only."""
    _refuse_unsupported(leaf)
    held = param in getattr(leaf, "model_param_group_index_map", {})
    # the same tensor kinds and dtypes on every rank: read from a param this rank holds
    example = next(iter(getattr(leaf, "model_param_group_index_map", {})), None)
    if example is None:
        raise UnsupportedOptimizer("the rank pool (--no-drlora-rank-pool turns it off): this "
                                   "data-parallel rank holds no shard of any parameter of the "
                                   "distributed optimizer")
    kinds = _state_tensors(dict(leaf._get_main_param_and_optimizer_states(example)))
    mine = _state_tensors(dict(leaf._get_main_param_and_optimizer_states(param))) if held else {}
    start = leaf._get_model_param_range_map(param)["param"].start if held else 0
    # An fp32 param is its own main: the "main shard" is a view of the param, which the
    # caller has moved already. Decided by dtype, the same on every rank (a collective
    # follows); a rank holding a shard checks the rule against the storage.
    if kinds["param"].dtype == param.dtype:
        kinds.pop("param")
        main = mine.pop("param", None)
        if main is not None and main.untyped_storage().data_ptr() != \
                param.untyped_storage().data_ptr():
            raise UnsupportedOptimizer("the rank pool (--no-drlora-rank-pool turns it off): "
                                       "the distributed optimizer keeps a separate main copy "
                                       "of a parameter of its own dtype")
    for key in sorted(kinds):
        full = torch.zeros(param.numel(), dtype=kinds[key].dtype, device=kinds[key].device)
        shard = mine.get(key)
        if shard is not None:
            full[start:start + shard.numel()] = shard.view(-1)
        torch.distributed.all_reduce(full, group=buffer.data_parallel_group)
        if shard is not None:
            moved = moved_rows(full.view(param.shape[0], -1), source).view(-1)
            shard.view(-1).copy_(moved[start:start + shard.numel()])


@torch.no_grad()
def move_param_rows(optimizer, param: torch.Tensor, source: torch.Tensor) -> None:
    """Row i of `param`'s main copy and optimizer states (dim 0) becomes old row `source[i]`,
    zero where `source[i] < 0`: the pooled bank repacks its slots at a rank change and the
    optimizer's copy must move with the parameter (which the caller moves itself). With
    Megatron's distributed optimizer this is collective over its data-parallel group. A param
    the optimizer does not hold is left alone."""
    if optimizer is None:
        return
    source = source.to(torch.int64).cpu()
    for leaf in _leaves(optimizer):
        if hasattr(leaf, "model_param_gbuf_map"):  # Megatron's DistributedOptimizer
            buffer = _distributed_buffer(leaf, param)
            if buffer is not None:
                _move_distributed(leaf, buffer, param, source)
            continue
        found = _targets(leaf, param)
        if found is None:
            continue
        main, _, states = found
        for tensor in ([main] if main is not None else []) + list(_state_tensors(states).values()):
            full = tensor.view(param.shape[0], -1)
            full.copy_(moved_rows(full, source))


def check_pool_optimizer(optimizer, params) -> None:
    """Refuse at start-up, naming the flag, an optimizer whose copy of the pool parameters
    `params` `write_param_rows` / `move_param_rows` could not reach (else the first growth
    event, hours in, would)."""
    if optimizer is None:
        return
    for leaf in _leaves(optimizer):
        for param in params:
            if hasattr(leaf, "model_param_gbuf_map"):
                if _distributed_buffer(leaf, param) is not None:
                    _refuse_unsupported(leaf)
            else:
                _targets(leaf, param)  # refuses what it cannot write
