"""Core attention for multi-latent attention (MLA, DeepSeek-V2/V3) with the local spec on CPU.

Why it exists: Megatron-Core's `MLASelfAttention` builds its core attention with
`k_channels=qk_head_dim + qk_pos_emb_head_dim` and `v_channels=v_head_dim` (query/key heads
wider than value heads) and its own softmax scale. With Transformer Engine that is
`TEDotProductAttention`; the local spec's `DotProductAttention` (megatron-core 0.19) accepts
neither keyword and assumes one head size. Without TE (this project's CPU/gloo runs) MLA
therefore cannot be built at all. This module computes the same thing in plain torch: causal
(or masked) softmax attention, scores in fp32, q/k head size != v head size, the scale MLA
passes. `megatron_drlora.model_features.adjust_spec` installs it only for MLA on the local spec
when CUDA or TE is absent; with TE the spec is untouched.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.module import MegatronModule


class MLACoreAttention(MegatronModule):
    """softmax(scale * q k^T + mask) v over [s, b, heads, dim] tensors -> [sq, b, heads * v_dim].

    Heads are this TP rank's (MLA has no query groups: k and v carry every head)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("MLA on the local spec (MLACoreAttention) does not support context "
                             "parallelism; use Transformer Engine")
        # The base Attention builds one without k/v channels first; MLA then replaces it.
        k_channels = k_channels or config.kv_channels
        v_channels = v_channels or config.kv_channels
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels
        self.hidden_size_per_attention_head_v = v_channels
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / float(k_channels) ** 0.5)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_dropout = torch.nn.Dropout(p)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("MLACoreAttention: packed sequences and attention bias need "
                             "Transformer Engine")
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3).float()   # [b, n, sq, dk]
        k = key.permute(1, 2, 3, 0).float()     # [b, n, dk, sk]
        scores = torch.matmul(q, k) * self.softmax_scale
        if attention_mask is None:  # causal, the query positions are the last sq of sk
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(
                1 + sk - sq)
        scores = scores.masked_fill(attention_mask.to(scores.device).bool(),
                                    torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if self.training and self.attention_dropout.p > 0:
            from megatron.core import tensor_parallel

            if not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    probs = self.attention_dropout(probs)
            else:
                probs = self.attention_dropout(probs)
        context = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, n, sq, dv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * value.shape[-1])

