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


# --- Megatron process-group facts DR-LoRA needs ---------------------------------------------
def expert_data_parallel_rank() -> int:
    """Rank among the replicas of the same experts (their reduced grads are identical)."""
    if not is_distributed():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_expert_data_parallel_rank()


# --- the per-step statistics reduction ------------------------------------------------------
def reduce_step_statistics(*tensors: torch.Tensor) -> list:
    """Sum each tensor over all ranks in ONE fused all-reduce (float64); returns new tensors.

    Rows of layers on other pipeline stages are zero on this rank, experts of other EP ranks
    likewise, so the world-wide sum assembles the global [layers, experts, ...] statistics and
    every rank ends with bit-identical values. The buffer stays on the tensors' device (NCCL:
    the GPU, gloo: the CPU), so the reduction never waits for the host; only a CPU tensor
    under NCCL makes the round trip.
    """
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    if is_distributed():
        buf = flat
        if dist.get_backend() == "nccl" and flat.device.type != "cuda":
            buf = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        flat = buf if buf is flat else buf.to(flat.device)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


class RankMapDisagreement(RuntimeError):
    """Ranks hold different DR-LoRA rank maps: their growth decisions diverged."""


def check_rank_map_agreement(rank_map: torch.Tensor, step: int) -> None:
    """Verify that every rank holds the same [layers, experts, modules] rank map.

    One all-reduce of 2 x layers numbers: per layer a checksum weighting every entry by a fixed
    pseudo-random number (so no two different maps are likely to collide), reduced as MAX of c
    and MAX of -c (i.e. max and min). A layer whose max != min disagrees somewhere.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return
    L = rank_map.shape[0]
    weights = torch.rand(rank_map[0].shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(20260125)) + 1.0
    checksum = (rank_map.to(torch.float64) * weights).sum(dim=tuple(range(1, rank_map.dim())))
    both = torch.cat([checksum, -checksum])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    buf = both.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    buf = buf.cpu()
    high, low = buf[:L], -buf[L:]
    bad = [l for l in range(L) if high[l] != low[l]]
    if bad:
        raise RankMapDisagreement(
            f"DR-LoRA rank maps differ between ranks after the growth event at step {step}: "
            f"MoE layer(s) {bad} (this is rank {dist.get_rank()}, whose checksum for layer "
            f"{bad[0]} is {checksum[bad[0]].item():.6f}, range over ranks {low[bad[0]].item():.6f}"
            f"..{high[bad[0]].item():.6f}). The saliency statistics were not identical on all "
            f"ranks; stopping instead of training diverging replicas.")
