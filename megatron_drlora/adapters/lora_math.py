"""The LoRA delta of experts, computed on the active rank prefix only.

Why prefix slicing: an expert at rank r of r_max multiplies by A[:r] and B[:, :r], so its
cost is r * (k + d) per token, not r_max * (k + d). Autograd's slice backward writes exact
zeros into the inactive rows of A and columns of B, so they get zero gradient on every backend,
their Adam moments stay zero and they keep their init values until activated (algorithm.md
section 2). Nothing here knows about processes; `replicated_grad` is injected by the caller.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Identity = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


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
    tokens_per_expert: Sequence[int],
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int],
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
    prepare_a: Identity = _identity,
    prepare_b: Identity = _identity,
) -> torch.Tensor:
    """LoRA deltas of all local experts for tokens sorted by expert (grouped-GEMM layout).

    x: [T, k] with the first tokens_per_expert[0] rows for local expert 0, and so on;
    a: [E, R, k]; b: [E, d, R]; ranks: active rank per local expert. Returns [T, d].
    `prepare_a` / `prepare_b` wrap each expert's factor (the tensor-parallel gradient hook).
    """
    counts = [int(c) for c in tokens_per_expert]
    if len(counts) != a.shape[0] or len(ranks) != a.shape[0]:
        raise ValueError(
            f"grouped_lora_delta: {len(counts)} token groups and {len(ranks)} ranks for "
            f"{a.shape[0]} local experts")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_lora_delta: tokens_per_expert sums to {sum(counts)}, "
                         f"input has {x.shape[0]} tokens")
    pieces = []
    # unbind, not a[e]: one backward for all experts instead of a full-size zero gradient each
    for chunk, rank, a_e, b_e in zip(torch.split(x, counts), ranks, a.unbind(0), b.unbind(0)):
        pieces.append(lora_delta(chunk, prepare_a(a_e), prepare_b(b_e), int(rank), scale,
                                 dropout, training))
    if not pieces:
        return x.new_zeros((0, b.shape[1]))
    return torch.cat(pieces, dim=0)


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
