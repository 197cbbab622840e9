"""GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`, model type `glm4_moe`) read into a
`ModelDescription`.

What the config means in Megatron (transformers 5's Glm4MoeTopkRouter, eval mode):
- q/k/v biases (`attention_bias`, o_proj has none): `--add-qkv-bias`; `use_qk_norm`: per-head
  RMSNorm of q and k (`--qk-layernorm`).
- `partial_rotary_factor` f: RoPE on the first f x head_dim channels of each head, rotate-half
  (not interleaved) pairs, inv_freq over that rotary dim: Megatron's `--rotary-percent f`, whose
  layout is the same. A rotary dim that is odd is refused; scaled RoPE is refused
  (`rope_parameters.rope_type`).
- `first_k_dense_replace` k: layers 0..k-1 are dense SwiGLU MLPs of `intermediate_size`:
  `--moe-layer-freq [0]*k+[1]*(L-k)`, `--ffn-hidden-size intermediate_size`.
- `n_shared_experts` x `moe_intermediate_size`: one ungated shared expert
  (`--moe-shared-expert-intermediate-size`).
- The router: sigmoid scores; `e_score_correction_bias` is added for the choice only and the
  weights are the unbiased scores of the chosen experts, renormalised (+1e-20) and multiplied by
  `routed_scaling_factor`. Megatron's sigmoid router does exactly this with
  `--moe-router-score-function sigmoid --moe-router-enable-expert-bias` (bias = the router's
  `expert_bias`) and `--moe-router-topk-scaling-factor`. Megatron always renormalises a sigmoid
  top-k > 1 and never top-1, so `norm_topk_prob` must be true for top-k > 1 and false for top-1.
- `n_group` / `topk_group`: transformers ranks groups by the sum of their top-2 biased scores,
  Megatron by the sum of their top-(topk / group_topk): equal only when topk / topk_group == 2;
  otherwise refused. With `topk_group == n_group` every group is kept (no flags written).
- `num_nextn_predict_layers`: the multi-token-prediction layers (HF layers L .. L+n-1, unused
  by transformers' causal LM) are skipped on import with a note and not exported.
Tensor names: dense layers `mlp.{gate,up,down}_proj`, shared expert
`mlp.shared_experts.{gate,up,down}_proj`, router `mlp.gate.weight` and
`mlp.gate.e_score_correction_bias`; experts as Qwen-MoE's.
"""

from __future__ import annotations

from typing import Callable

FAMILY = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"


def describe_glm4_moe(get: Callable, refuse: Callable, common: dict):
    """ModelDescription of a Glm4MoeConfig; `common` holds the fields every family shares."""
    from megatron_drlora.hf.families import ModelDescription

    layers = common["num_layers"]
    experts = int(get("n_routed_experts", None) or get("num_local_experts"))
    topk = int(get("num_experts_per_tok"))
    params = get("rope_parameters", None) or {}
    partial = float(params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
                    or 1.0)
    rot_dim = int(common["head_dim"] * partial)
    if not 0 < partial <= 1 or rot_dim % 2 or rot_dim == 0:
        refuse("partial_rotary_factor", partial, f"a rotary dim int(head_dim x factor) = "
               f"{rot_dim} that is even and positive")
    dense = int(get("first_k_dense_replace", 0) or 0)
    if not 0 <= dense < layers:
        refuse("first_k_dense_replace", dense, f"at least one MoE layer among {layers}")
    router = sigmoid_router(get, refuse, experts, topk)
    shared = int(get("n_shared_experts", 0) or 0)
    moe_ffn = int(get("moe_intermediate_size"))
    return ModelDescription(
        **common, num_experts=experts, topk=topk, moe_ffn_hidden_size=moe_ffn,
        ffn_hidden_size=int(get("intermediate_size")),
        norm_epsilon=float(get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(get("attention_bias", False)),
        qk_norm="head" if get("use_qk_norm", False) else "none",
        shared_expert_ffn=shared * moe_ffn or None, rotary_percent=partial,
        first_dense_layers=dense, mtp_layers=int(get("num_nextn_predict_layers", 0) or 0),
        **router)


def sigmoid_router(get: Callable, refuse: Callable, experts: int, topk: int) -> dict:
    """ModelDescription router fields of a GLM-4.5 / DeepSeek-V3 style sigmoid router with
    `e_score_correction_bias` (see the module docstring), or a refusal naming the key."""
    norm = bool(get("norm_topk_prob", True))
    if topk > 1 and not norm:
        refuse("norm_topk_prob", False, "Megatron's sigmoid router always renormalises a top-k "
               "> 1")
    if topk == 1 and norm:
        refuse("norm_topk_prob", True, "Megatron's sigmoid router does not renormalise top-1 "
               "(transformers would give every token weight routed_scaling_factor)")
    groups, group_topk = int(get("n_group", 1) or 1), int(get("topk_group", 1) or 1)
    if experts % groups or not 1 <= group_topk <= groups:
        refuse("n_group", groups, f"{experts} experts in equal groups, topk_group {group_topk} "
               f"of them")
    if group_topk < groups and topk != 2 * group_topk:
        refuse("topk_group", group_topk, f"transformers ranks groups by their top-2 scores, "
               f"Megatron by their top-(num_experts_per_tok / topk_group) = top-"
               f"{topk // group_topk}")
    scaling = float(get("routed_scaling_factor", 1.0) or 1.0)
    return dict(norm_topk_prob=norm, router_score="sigmoid", router_expert_bias=True,
                router_num_groups=groups if group_topk < groups else None,
                router_group_topk=group_topk if group_topk < groups else None,
                router_scaling=scaling if scaling != 1.0 else None)
