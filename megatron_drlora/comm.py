"""Every collective DR-LoRA adds, and the Megatron process groups they use.

Nothing else in the package calls torch.distributed. Per training step DR-LoRA adds one fused
all-reduce of its statistics (plus, at growth events, one broadcast of global rank 0's new rank
map and one exact agreement check); with expert tensor parallelism > 1 also one all-reduce per
MoE layer of the accumulated gradients of the factors replicated across expert-TP ranks.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def world_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def sum_replicated_gradients(banks: Sequence[Tuple[object, Sequence[torch.Tensor]]]) -> int:
    """Sum, over its expert-TP group, the accumulated gradient of every adapter factor that is
    replicated across expert-TP ranks: one all-reduce per bank per optimizer step.

    With expert-TP > 1, fc1's A is whole on every expert-TP rank but each rank only sees the
    part of the output its B shard writes; fc2's B likewise multiplies a partial input sum, so
    each rank's gradient is partial and the true gradient is the sum over the group. Summing is
    linear, so it commutes with Megatron's expert-data-parallel reduction and its scaling and
    runs once on the step's accumulated gradient (`main_grad` with Megatron DDP, else `.grad`)
    instead of per expert per micro-batch in backward. With the distributed optimizer each
    expert-DP rank owns a shard of `main_grad`; expert-TP peers have the same expert-DP rank
    and the same buffer layout, so reducing whole tensors reduces every owned shard (the
    elements a rank does not own are summed too and never read).

    `banks`: (expert-TP group, that bank's replicated gradients) per bank; a bank's tensors are
    flattened into one buffer (one collective, one bank of temporary memory). Returns the
    number of all-reduces issued.
    """
    issued = 0
    for group, grads in banks:
        grads = [g for g in grads if g is not None]
        if not grads or group_size(group) == 1:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        issued += 1
    return issued


def group_size(group) -> int:
    if group is None or not is_distributed():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not is_distributed():
        return 0
    return dist.get_rank(group)


# --- Megatron process-group facts DR-LoRA needs ---------------------------------------------
def expert_data_parallel_rank() -> int:
    """Rank among the replicas of the same experts (their reduced grads are identical)."""
    if not is_distributed():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_expert_data_parallel_rank()


def data_parallel_rank() -> int:
    """Rank among the replicas of dense (non-expert) weights, context parallelism included."""
    if not is_distributed():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(with_context_parallel=True)


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


def _collective_device() -> torch.device:
    """Where a tensor must live for the world group's backend: CUDA for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_rank_map(rank_map: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Global rank `src`'s [layers, experts, modules] rank map, on every rank (int64, CPU).

    Every rank runs the allocator on (normally) bit-identical saliency, but a near-tie could
    still resolve differently on mixed hardware; broadcasting one rank's decision makes every
    rank apply the same map by construction. One broadcast over the world group.
    """
    rank_map = rank_map.to(torch.int64)
    if not is_distributed() or dist.get_world_size() == 1:
        return rank_map
    buf = rank_map.contiguous().to(_collective_device(), copy=True)
    dist.broadcast(buf, src=src)
    return buf.cpu()


def check_rank_map_agreement(rank_map: torch.Tensor, step: int) -> None:
    """Verify that every rank holds exactly the same [layers, experts, modules] rank map.

    One all-reduce (MAX) of the int64 map and its negation gives, per entry, the maximum and
    the minimum over ranks; integer comparison, so equal maps always pass and any difference
    is caught. The error names every MoE layer that differs and its first differing entry.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return
    rank_map = rank_map.to(torch.int64)
    n = rank_map.numel()
    both = torch.cat([rank_map.reshape(-1), -rank_map.reshape(-1)])
    buf = both.to(_collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    buf = buf.cpu()
    high, low = buf[:n].view(rank_map.shape), (-buf[n:]).view(rank_map.shape)
    differs = high != low
    bad = [l for l in range(rank_map.shape[0]) if bool(differs[l].any())]
    if bad:
        first = tuple(int(i) for i in differs[bad[0]].nonzero()[0])
        where = (bad[0],) + first
        raise RankMapDisagreement(
            f"DR-LoRA rank maps differ between ranks after the growth event at step {step}: "
            f"MoE layer(s) {bad} (this is rank {dist.get_rank()}; at [layer, expert, module] "
            f"{list(where)} it holds rank {int(rank_map[where])}, ranks hold "
            f"{int(low[where])}..{int(high[where])}). Stopping instead of training diverging "
            f"replicas.")
