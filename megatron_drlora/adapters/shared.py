"""Uniform LoRA on an MoE layer's shared expert (`--drlora-shared-experts uniform`).

The shared expert sees every token, so DR-LoRA's routing-frequency saliency says nothing about
it: it gets plain LoRA at rank r_target on the projections of --drlora-targets, outside the
DR-LoRA budget, the statistics, the allocator and the rank map. Scale, dropout and init follow
the routed adapters (A kaiming-uniform from (seed, layer, "shared", projection), B zero).

Megatron's SharedExpertMLP is a dense tensor-parallel MLP (attention TP, not expert TP; its
weights are reduced by DDP over the whole data-parallel group), so its factors shard like the
base: fc1 (column parallel) shards B on its output, fc2 (row parallel) shards A on its input.
The hooks see fc1's input before and fc2's output after the base layer's own TP communication,
so the rank-wide hidden state h = A x carries it instead (a [tokens, r] tensor):
- fc1: h = A x, then copied to the TP region (all-reduce of dh in backward), or with sequence
  parallelism all-gathered along the sequence (reduce-scatter of dh in backward);
- fc2: h = A_local x_local is a partial sum: all-reduced, or reduce-scattered along the
  sequence with sequence parallelism.
Without sequence parallelism every factor's gradient is then exact on every TP rank; with it the
whole factor (fc1's A, fc2's B) sees only this rank's tokens and is marked `sequence_parallel`,
so Megatron's finalize_model_grads sums it over TP like the layer norms. The whole factor is
counted in the grad norm on TP rank 0 only (`tensor_model_parallel` False), as Megatron counts
replicated dense weights.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_drlora.adapters.bank import ProjectionSpec, init_seed, kaiming_uniform_a
from megatron_drlora.adapters.lora_math import add_to_fc1_half


class SharedExpertLoRA(torch.nn.Module):
    """LoRA factors of one shared expert: A_p [r, k_local], B_p [d_local, r] per projection."""

    def __init__(self, layer: int, projections: List[ProjectionSpec], rank: int, scale: float,
                 dropout: float = 0.0, seed: int = 1234, sequence_parallel: bool = False,
                 tp_group=None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.layer = int(layer)
        self.specs: Dict[str, ProjectionSpec] = {p.name: p for p in projections}
        self.projection_names = [p.name for p in projections]
        self.rank = int(rank)
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self.sequence_parallel = bool(sequence_parallel)
        self.tp_group = tp_group
        for spec in projections:
            a = torch.empty(self.rank, spec.in_local, dtype=dtype, device=device)
            b = torch.zeros(spec.out_local, self.rank, dtype=dtype, device=device)
            self.register_parameter(f"{spec.name}_A", torch.nn.Parameter(a))
            self.register_parameter(f"{spec.name}_B", torch.nn.Parameter(b))
            for which, sharded, dim in (("A", spec.a_sharded, 1), ("B", spec.b_sharded, 0)):
                param = self.factor(spec.name, which)
                param.allreduce = True  # a dense parameter: DDP reduces it over all of DP
                param.drlora_shared = True
                param.drlora_sharded = sharded
                param.tensor_model_parallel = sharded
                param.partition_dim = dim if sharded else -1
                param.partition_stride = 1
                if not sharded and spec.tp_size > 1 and self.sequence_parallel:
                    param.sequence_parallel = True  # summed over TP by finalize_model_grads
        self.reset_parameters()

    def factor(self, projection: str, which: str) -> torch.nn.Parameter:
        return getattr(self, f"{projection}_{which}")

    def num_parameters(self) -> int:
        """Full (unsharded) parameter count of this shared expert's adapters."""
        return sum(self.rank * (s.in_features + s.out_features) for s in self.specs.values())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name in self.projection_names:
            spec = self.specs[name]
            full = kaiming_uniform_a(self.rank, spec.in_features,
                                     init_seed(self.seed, self.layer, "shared", name))
            if spec.a_sharded:
                width = spec.in_local
                full = full[:, spec.tp_rank * width:(spec.tp_rank + 1) * width]
            self.factor(name, "A").copy_(full.to(self.factor(name, "A").dtype))
            self.factor(name, "B").zero_()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Nothing: saved by megatron_drlora.checkpoint under layout-independent keys."""
        return {}

    # --- forward --------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0.0 and self.training:
            x = F.dropout(x, p=self.dropout, training=True)
        return x

    def fc1_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Delta of a column-parallel fc1 projection for fc1's input x (see the docstring)."""
        from megatron.core import tensor_parallel as tp

        spec = self.specs[name]
        h = F.linear(self._input(x), self.factor(name, "A"))
        if spec.tp_size > 1:
            if self.sequence_parallel:
                h = tp.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True,
                                                            group=self.tp_group)
            else:
                h = tp.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, self.factor(name, "B")) * self.scale

    def fc2_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Delta of a row-parallel fc2 projection for fc2's (TP-sharded) input x."""
        from megatron.core import tensor_parallel as tp

        spec = self.specs[name]
        h = F.linear(self._input(x), self.factor(name, "A"))
        if spec.tp_size > 1:
            if self.sequence_parallel:
                h = tp.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = tp.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, self.factor(name, "B")) * self.scale

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, projections={self.projection_names}, rank={self.rank}, "
                f"scale={self.scale:g}")


def attach_to_shared_expert(shared_mlp, adapter: SharedExpertLoRA) -> List:
    """Forward hooks adding the deltas to the shared expert's linear_fc1 / linear_fc2 outputs
    (the gated shared expert's sigmoid gate then scales the adapted output, untouched)."""
    handles = []
    fc1 = [n for n in adapter.projection_names if adapter.specs[n].linear == "fc1"]
    fc2 = [n for n in adapter.projection_names if adapter.specs[n].linear == "fc2"]

    def fc1_hook(module, args, output):
        out, bias = output
        for name in fc1:
            out = add_to_fc1_half(out, adapter.fc1_delta(name, args[0]),
                                  adapter.specs[name].fc1_half)
        return out, bias

    def fc2_hook(module, args, output):
        out, bias = output
        for name in fc2:
            out = out + adapter.fc2_delta(name, args[0])
        return out, bias

    if fc1:
        handles.append(shared_mlp.linear_fc1.register_forward_hook(fc1_hook))
    if fc2:
        handles.append(shared_mlp.linear_fc2.register_forward_hook(fc2_hook))
    return handles
