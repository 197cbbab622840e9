"""Query/key RMSNorm over the whole projection (OLMoE), as a Megatron-Core layer-spec module.

Megatron-Core's `qk_layernorm` normalises every attention head on its own (an RMSNorm of size
head_dim, as in Qwen3-MoE). OLMoE normalises the whole query projection (size heads x head_dim)
and the whole key projection (query groups x head_dim) at once, with one weight per channel. The
two differ numerically, so a converted OLMoE would be silently wrong with Megatron's norm.

`ProjectionRMSNorm` replaces `q_layernorm` / `k_layernorm` in the layer spec
(`use_projection_qk_norm`). It receives Megatron's [sq, b, heads_local, head_dim] query/key and
normalises over all heads of the projection: the sum of squares is all-reduced over the TP group
(forward and backward).

The weight is replicated in full ([heads x head_dim]) on every TP rank, and each rank multiplies
by the slice of its own heads. Megatron's `finalize_model_grads` sums over TP the gradient of
every parameter whose name contains `q_layernorm` / `k_layernorm` (when `config.qk_layernorm`),
since it takes them for per-head norms shared by all heads. A TP-sharded weight would get the sum
of all ranks' shard gradients; the replicated weight gets its full gradient (each rank
contributes its slice, zeros elsewhere), identical on every rank. In checkpoints the weight is one
replicated tensor (key `...self_attention.q_layernorm.weight`, global shape [heads x head_dim]),
so a checkpoint loads under any TP size.
"""

from __future__ import annotations

import copy

import torch


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward and in backward: every rank's outputs depend on the total,
    so the gradient w.r.t. the total is the sum of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of the query (or key) projection; see the module docstring."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, projection: str = "query"):
        super().__init__()
        from megatron.core import parallel_state as ps

        if projection not in ("query", "key"):
            raise ValueError(f"ProjectionRMSNorm: projection must be 'query' or 'key', "
                             f"got {projection!r}")
        heads = config.num_attention_heads if projection == "query" else \
            (config.num_query_groups or config.num_attention_heads)
        tp = ps.get_tensor_model_parallel_world_size()
        groups = config.num_query_groups or config.num_attention_heads
        if groups % tp:
            # Megatron then replicates key heads across TP ranks; a sum over the TP group
            # would count them several times.
            raise ValueError(
                f"the whole-projection q/k norm (--qk-layernorm-scope projection) needs the "
                f"query groups ({groups}) divisible by --tensor-model-parallel-size {tp}")
        if tp > 1 and not config.qk_layernorm:
            raise ValueError("the whole-projection q/k norm needs --qk-layernorm: without it "
                             "Megatron does not sum the norm's gradient over tensor parallelism")
        self.projection = projection
        self.head_dim = int(hidden_size)
        self.full_size = heads * self.head_dim
        self.tp_size = tp
        local = heads // tp * self.head_dim
        start = ps.get_tensor_model_parallel_rank() * local
        self.local_slice = slice(start, start + local)
        self.eps = float(eps)
        # Replicated over TP, like Megatron's own q/k norms (see the module docstring).
        self.weight = torch.nn.Parameter(torch.ones(self.full_size, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = False
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [sq, b, heads_local, head_dim]
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1]).float()
        sumsq = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            from megatron.core import parallel_state as ps

            sumsq = _AllReduceSum.apply(sumsq, ps.get_tensor_model_parallel_group())
        normed = flat * torch.rsqrt(sumsq / self.full_size + self.eps)
        out = self.weight[self.local_slice] * normed.to(x.dtype)
        return out.reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"{self.projection}, {self.full_size} channels over all heads, eps={self.eps}"


def use_projection_qk_norm(block_spec):
    """A copy of a GPT decoder block spec whose attention q/k norms are ProjectionRMSNorm."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    block_spec = copy.deepcopy(block_spec)
    specs = getattr(block_spec, "layer_specs", None) or [block_spec]
    for layer_spec in specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        sub = getattr(attention, "submodules", None)
        if sub is None or not hasattr(sub, "q_layernorm"):
            raise ValueError("--qk-layernorm-scope projection: the layer spec has no "
                             "self_attention.q_layernorm to replace")
        sub.q_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"projection": "query"})
        sub.k_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"projection": "key"})
    return block_spec
