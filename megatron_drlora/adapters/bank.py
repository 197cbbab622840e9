"""ExpertLoRABank: the packed LoRA factors of all local experts of one MoE layer.

One bank per MoE layer holds, for each adapted projection p (gate / up / down):
    A_p: [local experts, r_max, k_local]   B_p: [local experts, d_local, r_max]
allocated once at r_max (static shapes keep Megatron's DDP buffers, the distributed optimizer
and dist_checkpointing valid while ranks grow) plus the active rank of every (expert, p).

Tensor-parallel sharding follows the base layer, never the rank dimension (lessons.md):
column-parallel fc1 (gate/up) shards B on its output, row-parallel fc2 (down) shards A on its
input; the other factor is whole on every expert-TP rank.

Init depends only on (seed, global layer, global expert, projection): A is drawn for the full
(unsharded) shape from a generator seeded by that identity and the local shard is sliced out, so
every TP/EP/PP layout starts from the same adapters.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class ProjectionSpec:
    """Shape and sharding of one adapted projection of one expert."""

    name: str                 # "gate", "up" or "down"
    linear: str               # "fc1" or "fc2": the base linear it adds to
    fc1_half: Optional[str]   # "gate"/"up" for a gated fc1, None otherwise
    in_features: int          # full (unsharded) input size k
    out_features: int         # full (unsharded) output size d
    tp_size: int = 1          # expert-tensor-parallel size
    tp_rank: int = 0

    @property
    def a_sharded(self) -> bool:
        """fc2 is row-parallel: its input (A's k dim) is sharded."""
        return self.linear == "fc2" and self.tp_size > 1

    @property
    def b_sharded(self) -> bool:
        """fc1 is column-parallel: its output (B's d dim) is sharded."""
        return self.linear == "fc1" and self.tp_size > 1

    @property
    def in_local(self) -> int:
        return self.in_features // self.tp_size if self.a_sharded else self.in_features

    @property
    def out_local(self) -> int:
        return self.out_features // self.tp_size if self.b_sharded else self.out_features


def init_seed(seed: int, layer: int, expert: int, projection: str) -> int:
    """A 63-bit generator seed from the adapter's global identity (layout independent)."""
    digest = hashlib.sha256(f"drlora/{seed}/{layer}/{expert}/{projection}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def kaiming_uniform_a(r_max: int, fan_in: int, seed: int) -> torch.Tensor:
    """Full A [r_max, fan_in] drawn like kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(k), 1/sqrt(k))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(r_max, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound


class LocalExpertAdapters(torch.nn.Module):
    """What every bank of one MoE layer has (the dense ExpertLoRABank and adapters/pool.py's
    PooledLoRABank): which global experts of which layer, their projections, the LoRA scale,
    dropout and init seed, and the host copy of the active ranks (`_ranks_list`, set by the
    bank: reading it never syncs with the device)."""

    def __init__(self, layer: int, global_expert_ids: Sequence[int], num_global_experts: int,
                 projections: Sequence[ProjectionSpec], r_max: int, scale: float,
                 dropout: float, seed: int):
        super().__init__()
        self.layer = int(layer)
        self.global_expert_ids = [int(e) for e in global_expert_ids]
        self.num_global_experts = int(num_global_experts)
        self.specs: Dict[str, ProjectionSpec] = {p.name: p for p in projections}
        self.projection_names: List[str] = [p.name for p in projections]
        self.r_max = int(r_max)
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self._ranks_list: List[List[int]] = []

    def rank(self, local_expert: int, projection: str) -> int:
        return self._ranks_list[local_expert][self.projection_names.index(projection)]

    def ranks_of(self, projection: str) -> List[int]:
        j = self.projection_names.index(projection)
        return [row[j] for row in self._ranks_list]

    def _checked_rank_map(self, ranks) -> torch.Tensor:
        """A rank map [local experts, projections] as a host int64 tensor, or ValueError."""
        ranks = torch.as_tensor(ranks, dtype=torch.int64).cpu()
        if tuple(ranks.shape) != tuple(self.ranks.shape):
            raise ValueError(f"layer {self.layer}: rank map shape {tuple(ranks.shape)} != "
                             f"{tuple(self.ranks.shape)} (local experts, projections)")
        if int(ranks.min()) < 0 or int(ranks.max()) > self.r_max:
            raise ValueError(f"layer {self.layer}: ranks must lie in [0, r_max={self.r_max}]")
        return ranks


class ExpertLoRABank(LocalExpertAdapters):
    """LoRA factors and active ranks of the local experts of one MoE layer."""

    pooled = False  # adapters/pool.py: PooledLoRABank (--drlora-rank-pool) is True

    def __init__(
        self,
        layer: int,
        global_expert_ids: Sequence[int],
        num_global_experts: int,
        projections: Sequence[ProjectionSpec],
        r_max: int,
        r_init: int,
        scale: float,
        dropout: float = 0.0,
        seed: int = 1234,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ):
        super().__init__(layer, global_expert_ids, num_global_experts, projections, r_max,
                         scale, dropout, seed)
        num_local = len(self.global_expert_ids)
        for spec in projections:
            a = torch.empty(num_local, self.r_max, spec.in_local, dtype=dtype, device=device)
            b = torch.zeros(num_local, spec.out_local, self.r_max, dtype=dtype, device=device)
            self.register_parameter(f"{spec.name}_A", torch.nn.Parameter(a))
            self.register_parameter(f"{spec.name}_B", torch.nn.Parameter(b))
            for which, sharded, dim in (("A", spec.a_sharded, 2), ("B", spec.b_sharded, 1)):
                param = self.factor(spec.name, which)
                # Megatron's expert-parameter contract: allreduce=False puts the param in DDP's
                # expert buffer, reduced over the expert-data-parallel group and scaled by
                # edp/dp. Always right for adapters (each expert's gradient already covers the
                # tokens of its whole dispatch group); Megatron marks its own expert weights only
                # when EP > 1, which sums different expert-TP shards when EP = 1 < ETP != TP.
                param.allreduce = False
                param.drlora = True
                param.drlora_sharded = sharded  # sharded across expert-TP like its base layer
                # Grad-norm bookkeeping: like Megatron's expert weights every adapter factor is
                # "tensor parallel" (counted on every rank), except a factor replicated across
                # expert-TP ranks, which is counted on expert-TP rank 0 only ('shared' elsewhere).
                duplicate = spec.tp_size > 1 and not sharded and spec.tp_rank != 0
                param.tensor_model_parallel = not duplicate
                param.partition_dim = dim
                param.partition_stride = 1
                if duplicate:
                    param.shared = True
        # The active rank of every (local expert, projection); a Python copy avoids a
        # device-to-host sync in every forward.
        self.register_buffer(
            "ranks", torch.full((num_local, len(projections)), int(r_init), dtype=torch.int64),
            persistent=False)
        self._ranks_list: List[List[int]] = self.ranks.tolist()
        self.reset_parameters()

    # --- parameters -----------------------------------------------------------------------
    def factor(self, projection: str, which: str) -> torch.nn.Parameter:
        return getattr(self, f"{projection}_{which}")

    def lora_factors(self, projection: str, width: Optional[int] = None):
        """(A [E, r_max, k], B [E, d, r_max]) for the forward: the parameters themselves (the
        pooled bank gathers them; `width` is its hint and ignored here)."""
        return self.factor(projection, "A"), self.factor(projection, "B")

    def dense_factor(self, projection: str, which: str) -> torch.Tensor:
        """A detached copy of a factor (the same accessor as the pooled bank's)."""
        return self.factor(projection, which).detach().clone()

    @torch.no_grad()
    def write_dense_factor(self, projection: str, which: str, value: torch.Tensor) -> None:
        self.factor(projection, which).copy_(value.to(self.factor(projection, which).dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper init: A rows kaiming-uniform (from the global identity), B zero."""
        for name in self.projection_names:
            spec = self.specs[name]
            a, b = self.factor(name, "A"), self.factor(name, "B")
            for local, expert in enumerate(self.global_expert_ids):
                full = kaiming_uniform_a(self.r_max, spec.in_features,
                                         init_seed(self.seed, self.layer, expert, name))
                if spec.a_sharded:
                    width = spec.in_local
                    full = full[:, spec.tp_rank * width:(spec.tp_rank + 1) * width]
                a[local].copy_(full.to(a.dtype))
            b.zero_()

    # --- ranks ----------------------------------------------------------------------------
    @torch.no_grad()
    def set_ranks(self, ranks: torch.Tensor) -> None:
        """Set the active ranks [local experts, projections]; growth only changes integers."""
        ranks = self._checked_rank_map(ranks)
        self.ranks.copy_(ranks.to(self.ranks.device))
        self._ranks_list = ranks.tolist()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Nothing: Megatron's model-wide sharded_state_dict (the base) never sees adapters.
        Adapters are saved by megatron_drlora.checkpoint under layout-independent keys."""
        return {}

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, experts={self.global_expert_ids[0]}.."
                f"{self.global_expert_ids[-1]} of {self.num_global_experts}, "
                f"projections={self.projection_names}, r_max={self.r_max}, scale={self.scale:g}")
