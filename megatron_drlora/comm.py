"""Every collective DR-LoRA adds, and the Megatron process groups they use.

Nothing else in the package calls torch.distributed. Per training step DR-LoRA adds one fused
all-reduce of its statistics (plus, at growth events, one small agreement check); with expert
tensor parallelism > 1 the backward pass also all-reduces the gradient of the adapter factor
that is replicated across expert-TP ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def world_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _SumGradientAcross(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_gradient_across(tensor: torch.Tensor, group) -> torch.Tensor:
    """Mark an adapter factor replicated over `group` whose per-rank gradients are partial.

    With expert-TP > 1, fc1's A is whole on every expert-TP rank but each rank only sees the
    part of the output its B shard writes; fc2's B likewise multiplies a partial input sum.
    Their true gradient is the sum over the group. The base layer's own partial-sum contract
    (dispatcher reduce-scatter) is left untouched: only this factor's gradient is summed.
    """
    if group is None or not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    return _SumGradientAcross.apply(tensor, group)


def group_size(group) -> int:
    if group is None or not is_distributed():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not is_distributed():
        return 0
    return dist.get_rank(group)


def all_reduce_sum_(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """In-place sum over `group` (the whole world when None); a no-op without processes."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
