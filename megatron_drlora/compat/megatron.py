"""Megatron-Core version differences, in one place.

Supported: megatron-core 0.16.1 (Python 3.11; what CI tests) through 0.19.x (Python 3.12 GPU
containers). The rest of the package asks this module what an experts module is and which
process groups it uses instead of testing versions itself.
"""

from __future__ import annotations

from typing import List, Optional

import torch


def prepare_import() -> None:
    """Call before the first `import megatron`: megatron/training (0.17+) imports
    `typing.override`, new in Python 3.12; on 3.11 typing_extensions provides it. Also stubs
    triton on CPU-only machines (see compat.cpu.preimport)."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    from megatron_drlora.compat import cpu

    cpu.preimport()


def use_prebuilt_dataset_helpers() -> None:
    """megatron.training's initialize compiles the dataset index helpers with `make` in the
    installed package; pip wheels ship the compiled helpers_cpp but no Makefile, so that step
    exits. When the compiled module imports, there is nothing to build."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron build it as usual
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None


def save_with_an_empty_optimizer_group() -> None:
    """A DR-LoRA run can leave one of Megatron's optimizer groups without a trainable
    parameter (the dense group when the router is frozen: only expert adapters train). Megatron
    then chains a stub FP32Optimizer (`optimizer=None`) that trains nothing, but 0.19 asks it
    for its state on every save and load (`None.state_dict()`) and reads its `param_groups`
    when ChainedOptimizer aligns the step counters. A stub's state is empty; the stub stays in
    the chain, so the chain's collectives and the checkpoint's structure are unchanged."""
    try:
        from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer
    except ImportError:
        return
    if getattr(FP32Optimizer, "_drlora_stub_state", False):
        return

    def stub_aware(method, stub_result):
        def wrapped(self, *args, **kwargs):
            if getattr(self, "optimizer", None) is None:
                return stub_result()
            return method(self, *args, **kwargs)
        return wrapped

    empty = lambda: {"state": {}, "param_groups": []}  # noqa: E731
    FP32Optimizer.state_dict = stub_aware(FP32Optimizer.state_dict, empty)
    FP32Optimizer.sharded_state_dict = stub_aware(FP32Optimizer.sharded_state_dict, empty)
    FP32Optimizer.load_state_dict = stub_aware(FP32Optimizer.load_state_dict, lambda: None)
    FP32Optimizer._drlora_stub_state = True

    original = getattr(ChainedOptimizer, "_synchronize_steps", None)
    if original is None:
        return

    def synchronize_steps(self):
        chained = self.chained_optimizers
        real = [o for o in chained if getattr(o, "optimizer", None) is not None]
        if len(real) == len(chained):
            return original(self)
        self.chained_optimizers = real
        try:
            return original(self)
        finally:
            self.chained_optimizers = chained

    ChainedOptimizer._synchronize_steps = synchronize_steps


def have_transformer_engine() -> bool:
    """True when a real Transformer Engine is importable (never installed by this package)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def expert_kind(experts: torch.nn.Module) -> str:
    """'sequential', 'te_grouped' or 'legacy_grouped'; a clear error for anything else."""
    from megatron.core.transformer.moe import experts as mexperts

    if isinstance(experts, mexperts.SequentialMLP):
        return "sequential"
    te_grouped = getattr(mexperts, "TEGroupedMLP", None)
    if te_grouped is not None and isinstance(experts, te_grouped):
        return "te_grouped"
    legacy = getattr(mexperts, "GroupedMLP", None)  # removed in megatron-core 0.19
    if legacy is not None and isinstance(experts, legacy):
        return "legacy_grouped"
    raise TypeError(
        f"DR-LoRA does not know the experts implementation {type(experts).__module__}."
        f"{type(experts).__name__}; supported: SequentialMLP, TEGroupedMLP, GroupedMLP")


def is_moe_layer(mlp: torch.nn.Module) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(mlp, MoELayer)


def expert_groups(experts: torch.nn.Module):
    """(ep_group, expert-TP group) of an experts module, falling back to parallel_state."""
    from megatron.core import parallel_state as ps

    ep = getattr(experts, "ep_group", None)
    etp = getattr(experts, "tp_group", None)
    if ep is None:
        ep = ps.get_expert_model_parallel_group()
    if etp is None:
        etp = ps.get_expert_tensor_parallel_group()
    return ep, etp


def num_local_experts(experts: torch.nn.Module) -> int:
    return int(experts.num_local_experts)


def moe_layer_pattern(config) -> List[int]:
    """1 for every global transformer layer that is an MoE layer (Megatron's moe_layer_freq)."""
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return [int(v) for v in freq]


def global_layer_index(layer: torch.nn.Module) -> int:
    """0-based global index of a TransformerLayer (Megatron's layer_number is 1-based, global)."""
    return int(layer.layer_number) - 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (all expose `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_chunks(model) -> List[torch.nn.Module]:
    if isinstance(model, (list, tuple)):
        return [unwrap_model(m) for m in model]
    return [unwrap_model(model)]


def reduced_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient the optimizer will use: Megatron DDP's `main_grad`, else `.grad`."""
    grad = getattr(param, "main_grad", None)
    if grad is not None:
        return grad
    return param.grad


def distributed_optimizer_grad_masks(ddp_models, params) -> dict:
    """For params in a distributed-optimizer DDP buffer: a bool mask of the elements whose
    `main_grad` is fully reduced on this rank (its reduce-scatter shard); elsewhere main_grad
    still holds this rank's unreduced gradient. Params of non-distributed buffers are absent.
    """
    wanted = {id(p) for p in params}
    masks = {}
    for ddp in ddp_models or []:
        if not getattr(getattr(ddp, "ddp_config", None), "use_distributed_optimizer", False):
            continue
        buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers",
                                                                    []))
        for buffer in buffers:
            for param, (start, end, bucket_id) in buffer.param_index_map.items():
                if id(param) not in wanted:
                    continue
                group = ddp.param_to_bucket_group[param]
                size = group.intra_distributed_optimizer_instance_size
                rank = group.intra_distributed_optimizer_instance_rank
                bucket = buffer.buckets[bucket_id]
                shard = bucket.grad_data.numel() // size
                lo = max(start, bucket.offset + rank * shard)
                hi = min(end, bucket.offset + (rank + 1) * shard)
                mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
                if hi > lo:
                    mask[lo - start:hi - start] = True
                masks[param] = mask.view(param.shape)
    return masks


def build_optimizer(optimizer_config, ddp_models):
    """Megatron's optimizer (plain or distributed, as configured) with weight decay off for the
    router, besides Megatron's usual bias / 1-d exclusions: DR-LoRA freezes the router during
    warm-up by zeroing its gradient, and a decoupled weight decay would still move it."""
    from megatron.core.optimizer import get_megatron_optimizer

    try:  # megatron-core >= 0.16: per-parameter overrides
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer import ParamGroupOverride, ParamKey
    except ImportError:
        return get_megatron_optimizer(optimizer_config, ddp_models)
    overrides = get_standard_config_overrides(config=optimizer_config)
    overrides[ParamKey(name="*.router.*")] = ParamGroupOverride(wd_mult=0.0)
    return get_megatron_optimizer(optimizer_config, ddp_models, config_overrides=overrides)
