"""Phi-MoE (`PhimoeForCausalLM`: Phi-3.5-MoE, Phi-mini-MoE, Phi-tiny-MoE) read into a
`ModelDescription`.

What differs from the other families and how it is built in Megatron:
- LayerNorm with bias (eps = `rms_norm_eps`): `--normalization LayerNorm`.
- `attention_bias`: q/k/v biases (`--add-qkv-bias`) and the o_proj bias
  (`--add-attention-output-bias`, megatron_drlora.model_features; experts get no bias).
- `lm_head_bias`: `--add-output-layer-bias`.
- SparseMixer top-2 routing with `router_jitter_noise` as its window:
  `--moe-router-type sparsemixer --moe-sparsemixer-jitter-eps EPS` (megatron_drlora.routers).
  `num_experts_per_tok` must be 2 (transformers' sparsemixer is top-2 whatever it says).
- `sliding_window` W (transformers: a query attends to the W most recent positions, itself
  included): Megatron's `--window-size W-1,0`.
- `input_jitter_noise` (training only: transformers scales the MoE input by uniform noise,
  twice): `--moe-layer-input-jitter-eps` (megatron_drlora.model_features).
- RoPE: plain RoPE only; longrope (Phi-3.5-MoE's 128k context) is refused naming the key.
On disk experts are named like Mixtral's (`block_sparse_moe.experts.E.w1/w3/w2`,
`block_sparse_moe.gate`); transformers 5 in memory: `mlp.router`, `mlp.experts.gate_up_proj`.
"""

from __future__ import annotations

from typing import Callable


def describe_phimoe(get: Callable, refuse: Callable, common: dict):
    """ModelDescription of a PhimoeConfig; `common` holds the fields every family shares."""
    from megatron_drlora.hf.families import ModelDescription

    topk = int(get("num_experts_per_tok"))
    if topk != 2:
        refuse("num_experts_per_tok", topk, "Phi-MoE's sparsemixer router is top-2")
    eps = float(get("router_jitter_noise", 0.01) or 0.0)
    if eps < 0:
        refuse("router_jitter_noise", eps, "sparsemixer's window must be >= 0")
    window = get("sliding_window", None)
    if window is not None and int(window) < 1:
        refuse("sliding_window", window, "a window of at least one position")
    input_jitter = float(get("input_jitter_noise", 0.0) or 0.0)
    if not 0 <= input_jitter < 1:
        refuse("input_jitter_noise", input_jitter, "a noise width in [0, 1)")
    bias = bool(get("attention_bias", False))
    return ModelDescription(
        **common, num_experts=int(get("num_local_experts")), topk=topk,
        moe_ffn_hidden_size=int(get("intermediate_size")),
        ffn_hidden_size=int(get("intermediate_size")), norm_topk_prob=False,
        norm_epsilon=float(get("rms_norm_eps", 1e-5)), qkv_bias=bias, attention_output_bias=bias,
        lm_head_bias=bool(get("lm_head_bias", False)), normalization="LayerNorm",
        router_type="sparsemixer", router_jitter_eps=eps, input_jitter_eps=input_jitter,
        sliding_window=None if window is None else int(window))
