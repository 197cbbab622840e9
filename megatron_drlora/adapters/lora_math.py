"""The LoRA delta of experts, computed on the active rank prefix only.

One expert (`lora_delta`): an expert at rank r of r_max multiplies by A[:r] and B[:, :r], so
its cost is r * (k + d) per token. Autograd's slice backward writes exact zeros into the
inactive rows of A and columns of B, so they get zero gradient on every backend, their Adam
moments stay zero and they keep their init values until activated.

Grouped experts (`grouped_lora_delta`): two grouped GEMMs over all local experts at the largest
active rank (rounded up to 16 bytes), with the hidden columns above each expert's rank masked
to exact zeros: the same output and gradients, a kernel count independent of the number of
experts, at the cost of computing every expert at the widest rank of the layer.
Nothing here knows about processes.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# None on torches without F.grouped_mm: the per-expert loop is used then.
_GROUPED_MM = getattr(F, "grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN_BYTES = 16


def lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """`scale * B[:, :rank] @ A[:rank] @ x` for one expert; x is [..., k], a [R, k], b [d, R].

    An expert with no tokens (or rank 0) still runs the empty products rather than returning a
    constant: the factors stay in the autograd graph and get exact zero gradients, so every
    adapter's gradient hook fires each step (Megatron DDP with overlap_grad_reduce waits for
    all of them).
    """
    if dropout > 0.0 and training and rank > 0 and x.numel() > 0:
        x = F.dropout(x, p=dropout, training=True)
    hidden = F.linear(x, a[:rank])
    return F.linear(hidden, b[:, :rank]) * scale


def grouped_lora_delta(
    x: torch.Tensor,
    tokens_per_expert,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int],
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
    ranks_device: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LoRA deltas of all local experts for tokens sorted by expert (grouped-GEMM layout).

    x: [T, k] with the first tokens_per_expert[0] rows for local expert 0, and so on;
    tokens_per_expert: host list or tensor (any device); a: [E, R, k]; b: [E, d, R];
    ranks: active rank per local expert on the host (sizes the kernels), `ranks_device` the
    same as a tensor (builds the mask; copied from `ranks` when not given). Returns [T, d].

    Why grouped: the number of kernels per call does not grow with the number of local
    experts (two grouped GEMMs at the largest active rank plus a rank mask). Where
    `torch.nn.functional.grouped_mm` cannot run well (older torch, float64, strides not
    16-byte aligned, CUDA other than bf16 on sm90: see `_grouped_kernel_for`) the per-expert
    loop computes the same math.
    """
    num_experts = a.shape[0]
    if len(ranks) != num_experts:
        raise ValueError(f"grouped_lora_delta: {len(ranks)} ranks for {num_experts} local "
                         f"experts")
    if torch.is_tensor(tokens_per_expert):
        if tokens_per_expert.numel() != num_experts:
            raise ValueError(f"grouped_lora_delta: {tokens_per_expert.numel()} token groups "
                             f"for {num_experts} local experts")
    else:
        counts = [int(c) for c in tokens_per_expert]
        if len(counts) != num_experts:
            raise ValueError(f"grouped_lora_delta: {len(counts)} token groups for "
                             f"{num_experts} local experts")
        if sum(counts) != x.shape[0]:
            raise ValueError(f"grouped_lora_delta: tokens_per_expert sums to {sum(counts)}, "
                             f"input has {x.shape[0]} tokens")
    if x.shape[0] == 0:
        return _no_token_delta(x, a, b, scale)
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    width = _grouped_width(x, a, b, ranks)
    if width is not None:
        return _grouped_delta(x, tokens_per_expert, a, b, ranks, ranks_device, width, scale)
    counts = (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
              else tokens_per_expert)
    pieces = []
    # unbind, not a[e]: one backward for all experts instead of a full-size zero gradient each
    for chunk, rank, a_e, b_e in zip(torch.split(x, [int(c) for c in counts]), ranks,
                                     a.unbind(0), b.unbind(0)):
        pieces.append(lora_delta(chunk, a_e, b_e, int(rank), scale))
    return torch.cat(pieces, dim=0)


def _no_token_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """[0, d] from empty products over all experts at once: every factor stays in the autograd
    graph with an exact zero gradient (grouped_mm's backward refuses zero tokens)."""
    hidden = torch.matmul(x.unsqueeze(0), a.transpose(1, 2))
    return torch.matmul(hidden, b.transpose(1, 2)).sum(0) * scale


def grouped_width(max_rank: int, r_max: int, x: torch.Tensor) -> int:
    """The rank width the grouped kernels run at for `x`'s dtype: the largest active rank
    rounded up to 16 bytes, capped at r_max (a pooled bank gathers its factors this wide)."""
    align = max(1, _ALIGN_BYTES // x.element_size())
    return min(r_max, -(-max(max_rank, 1) // align) * align)


def _grouped_width(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   ranks: Sequence[int]) -> Optional[int]:
    """The rank width the grouped kernels run at, or None when they cannot run here.

    The width is the largest active rank rounded up to 16 bytes (grouped GEMM needs 16-byte
    aligned strides), capped at r_max. Everything is decided from shapes, strides and the
    host copy of the ranks: no device read.
    """
    if _GROUPED_MM is None or x.shape[0] == 0 or not _grouped_kernel_for(x.device, x.dtype):
        return None
    if not (x.dtype == a.dtype == b.dtype):
        return None
    if x.device != a.device or x.device != b.device or x.stride(-1) != 1:
        return None
    item = x.element_size()
    width = grouped_width(max(ranks, default=0), a.shape[1], x)
    strides = (x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), width,
               b.shape[1])
    if a.stride(2) != 1 or b.stride(2) != 1 or any(s * item % _ALIGN_BYTES for s in strides):
        return None
    if any(t.data_ptr() % _ALIGN_BYTES for t in (x, a, b)):
        return None
    return width


@functools.lru_cache(maxsize=None)
def _grouped_kernel_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs here without reading the offsets on the host and with exact
    zero gradients for experts without tokens. On CUDA that is the CUTLASS kernel, bf16 on
    sm90: torch's fallback (other dtypes and GPUs) copies the offsets to the host (a sync) and
    loops, and on sm100 empty groups have been reported to get non-zero weight gradients
    (pytorch/pytorch#172439); there the per-expert loop runs instead. On CPU there is no
    device to wait for (grouped_mm loops over the groups in C++)."""
    if device.type == "cpu":
        return dtype in _GROUPED_DTYPES
    if device.type == "cuda" and torch.version.hip is None:
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9
    return False


def _device_counts(tokens_per_expert, device: torch.device) -> torch.Tensor:
    """Tokens per expert as an int64 tensor on `device`: a host-to-device copy that does not
    wait for the device (non_blocking), never a device-to-host read."""
    if torch.is_tensor(tokens_per_expert):
        counts = tokens_per_expert.to(torch.int64)
    else:
        counts = torch.tensor([int(c) for c in tokens_per_expert], dtype=torch.int64)
    return counts.to(device, non_blocking=True)


def _grouped_delta(x, counts, a, b, ranks, ranks_device, width, scale):
    """Two grouped GEMMs at `width` for all experts; columns of the hidden product at or above
    an expert's active rank are masked to exact zeros (masked_fill), so the output and every
    gradient equal the per-expert prefix products, and the inactive rows of A / columns of B
    get exact zero gradients. The mask is built on the device from the ranks tensor."""
    num_experts, tokens = a.shape[0], x.shape[0]
    counts = _device_counts(counts, x.device)
    offs = counts.cumsum(0).to(torch.int32)
    hidden = _GROUPED_MM(x, a[:, :width].transpose(1, 2), offs=offs)
    if any(int(r) != width for r in ranks):
        if ranks_device is None:
            ranks_device = _device_counts(ranks, x.device)
        expert_of_token = torch.repeat_interleave(
            torch.arange(num_experts, device=x.device), counts, output_size=tokens)
        inactive = (torch.arange(width, device=x.device)
                    >= ranks_device.to(x.device)[expert_of_token].unsqueeze(1))
        hidden = hidden.masked_fill(inactive, 0.0)
    return _GROUPED_MM(hidden, b[:, :, :width].transpose(1, 2), offs=offs) * scale


def add_to_fc1_half(out: torch.Tensor, delta: torch.Tensor, half: Optional[str]) -> torch.Tensor:
    """Add a delta to the gate half, the up half, or all of a (local) fc1 output.

    Megatron chunks each TP shard's local fc1 output into [gate, up] before the activation
    (gated linear unit), so "up" is the second half of the *local* output.
    """
    if half is None:
        return out + delta
    width = out.shape[-1] // 2
    gate, up = out[..., :width], out[..., width:]
    if half == "gate":
        return torch.cat([gate + delta, up], dim=-1)
    if half == "up":
        return torch.cat([gate, up + delta], dim=-1)
    raise ValueError(f"unknown fc1 half {half!r}")


def dense_reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int,
                    scale: float) -> torch.Tensor:
    """W + s * B[:, :r] @ A[:r]: the merged weight, for export and for tests."""
    return w + scale * (b[:, :rank].to(torch.float64) @ a[:rank].to(torch.float64)).to(w.dtype)
