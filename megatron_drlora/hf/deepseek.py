"""DeepSeek-V2 (`DeepseekV2ForCausalLM`, model type `deepseek_v2`) and DeepSeek-V3 / Moonlight
(`DeepseekV3ForCausalLM`, `deepseek_v3`) read into a `ModelDescription`.

What the config means in Megatron (transformers 5's modeling code, eval mode):
- Multi-latent attention: `--multi-latent-attention --qk-layernorm` (the q/kv latent RMSNorms,
  `q_a_layernorm` / `kv_a_layernorm`, are Megatron's `q_layernorm` / `kv_layernorm`),
  `--q-lora-rank` (absent: a plain q_proj, Megatron's `linear_q_proj`), `--kv-lora-rank`,
  `--qk-head-dim qk_nope_head_dim`, `--qk-pos-emb-head-dim qk_rope_head_dim`, `--v-head-dim`.
  transformers builds the latent norms with eps 1e-6 whatever `rms_norm_eps` says: when that
  differs (Moonlight's 1e-5), `--mla-latent-norm-epsilon 1e-06` (megatron_drlora.model_features).
  Megatron's MLA always de-interleaves the rope channels (pairs (2i, 2i+1) rotate together),
  which is DeepSeek-V2's complex rotation and V3's `rope_interleave: true`; for
  `rope_interleave: false` (rotate-half pairs (i, i + d/2)) the rope rows of the q and kv_a
  projections are permuted on import (and back on export), which is exact.
- RoPE: `--rope-type rope`, or YaRN (`rope_parameters.rope_type yarn`, DeepSeek-V2-Lite's):
  `--rope-type yarn --rotary-scaling-factor factor --mscale m --mscale-all-dim m_all`. The
  YaRN settings Megatron-LM has no flag for (`original_max_position_embeddings` 4096,
  `beta_fast` 32, `beta_slow` 1, `truncate`) must be Megatron's defaults; an explicit
  `attention_factor`, or `mscale_all_dim` without `mscale`, is refused (transformers then
  scales cos/sin by another factor than Megatron's ratio; `mscale` without `mscale_all_dim` is
  ignored by transformers and given to Megatron as 1). The softmax scale (mscale_all_dim^2 / sqrt(q head dim)) is Megatron's.
- V2 router: softmax over all experts, top-k, not renormalised, x `routed_scaling_factor`:
  `--moe-router-pre-softmax --moe-router-topk-scaling-factor`. transformers ignores
  `norm_topk_prob` for V2 (DeepSeek's own code renormalises), so true is refused.
  `topk_method: group_limited_greedy` ranks groups by their best expert; Megatron by the sum of
  their top-(num_experts_per_tok / topk_group): equal only when that is 1, else refused.
- V3 router (`topk_method: noaux_tc`, sigmoid, `e_score_correction_bias`): GLM-4.5's, the rules
  in `megatron_drlora.hf.glm4_moe.sigmoid_router`.
- `first_k_dense_replace` dense layers, `n_shared_experts` x `moe_intermediate_size` shared
  expert, multi-token-prediction layers skipped: as GLM-4.5. `moe_layer_freq` other than 1
  (DeepSeek's own code, which transformers does not follow) is refused.
Tensor names: `self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}`,
`self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}`; MLPs as GLM-4.5's.
"""

from __future__ import annotations

from typing import Callable

FAMILIES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
LATENT_NORM_EPS = 1e-6  # transformers builds q_a/kv_a_layernorm with its RMSNorm's default
YARN_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}


def describe_deepseek(family: str, get: Callable, refuse: Callable, common: dict):
    """ModelDescription of a DeepseekV2Config / DeepseekV3Config (see the module docstring)."""
    from megatron_drlora.hf.families import ModelDescription
    from megatron_drlora.hf.glm4_moe import sigmoid_router

    layers, heads = common["num_layers"], common["num_attention_heads"]
    for key in ("n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size"):
        if get(key, None) is None:
            refuse(key, None, "an MoE model with multi-latent attention needs it set")
    experts = int(get("n_routed_experts"))
    topk = int(get("num_experts_per_tok"))
    quant = get("quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        refuse("quantization_config", method, "quantized (e.g. DeepSeek-V3's FP8) weights; "
               "convert a bf16 / fp32 copy")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            refuse(key, True, "biases in MLA / MLP projections")
    if int(get("num_key_value_heads", heads) or heads) != heads:
        refuse("num_key_value_heads", get("num_key_value_heads"), "MLA has one key/value head "
               "per query head")
    if int(get("moe_layer_freq", 1) or 1) != 1:
        refuse("moe_layer_freq", get("moe_layer_freq"), "transformers makes every layer from "
               "first_k_dense_replace on an MoE layer")
    dense = int(get("first_k_dense_replace", 0) or 0)
    if not 0 <= dense < layers:
        refuse("first_k_dense_replace", dense, f"at least one MoE layer among {layers}")
    if family == "deepseek_v2":
        router = _softmax_router(get, refuse, experts, topk)
    else:
        method = get("topk_method", "noaux_tc") or "noaux_tc"
        if method != "noaux_tc":
            refuse("topk_method", method, "DeepSeek-V3 routes with noaux_tc")
        router = sigmoid_router(get, refuse, experts, topk)
    score = get("scoring_func", None)
    if score is not None and score != router["router_score"]:
        refuse("scoring_func", score, f"transformers' {family} router uses "
               f"{router['router_score']}")
    rope = _rope(get, refuse)
    rope_dim = int(get("qk_rope_head_dim"))
    if rope_dim % 2:
        refuse("qk_rope_head_dim", rope_dim, "an even rotary dimension")
    q_lora = get("q_lora_rank", None)
    shared = int(get("n_shared_experts", 0) or 0)
    if shared < 1:
        refuse("n_shared_experts", shared, "transformers builds a shared expert of "
               "n_shared_experts x moe_intermediate_size in every MoE layer")
    moe_ffn = int(get("moe_intermediate_size"))
    common = dict(common, head_dim=common["hidden_size"] // heads, num_query_groups=heads)
    return ModelDescription(
        **common, num_experts=experts, topk=topk, moe_ffn_hidden_size=moe_ffn,
        ffn_hidden_size=int(get("intermediate_size")),
        norm_epsilon=float(get("rms_norm_eps", 1e-6)),
        shared_expert_ffn=shared * moe_ffn or None, first_dense_layers=dense,
        mtp_layers=int(get("num_nextn_predict_layers", 0) or 0),
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(get("kv_lora_rank")), qk_nope_head_dim=int(get("qk_nope_head_dim")),
        qk_rope_head_dim=rope_dim, v_head_dim=int(get("v_head_dim")),
        rope_interleave=bool(get("rope_interleave", True)) if family == "deepseek_v3" else True,
        latent_norm_epsilon=LATENT_NORM_EPS,
        **rope, **router)


def _softmax_router(get, refuse, experts: int, topk: int) -> dict:
    if get("norm_topk_prob", False):
        refuse("norm_topk_prob", True, "transformers' DeepSeek-V2 router ignores it (DeepSeek's "
               "own code renormalises): the reference is ambiguous")
    method = get("topk_method", "greedy") or "greedy"
    groups, group_topk = None, None
    if method == "group_limited_greedy":
        for key in ("n_group", "topk_group"):
            if get(key, None) is None:
                refuse(key, None, "group_limited_greedy needs n_group and topk_group")
        groups, group_topk = int(get("n_group")), int(get("topk_group"))
        if experts % groups or not 1 <= group_topk <= groups:
            refuse("n_group", groups, f"{experts} experts in equal groups, topk_group "
                   f"{group_topk} of them")
        if topk // group_topk != 1:
            refuse("topk_group", group_topk, f"transformers ranks groups by their best expert, "
                   f"Megatron by their top-(num_experts_per_tok / topk_group) = top-"
                   f"{topk // group_topk}")
        if group_topk == groups:
            groups, group_topk = None, None
    elif method != "greedy":
        refuse("topk_method", method, "DeepSeek-V2 routes with greedy or group_limited_greedy")
    scaling = float(get("routed_scaling_factor", 1.0) or 1.0)
    return dict(norm_topk_prob=False, router_num_groups=groups, router_group_topk=group_topk,
                router_scaling=scaling if scaling != 1.0 else None)


def _rope(get, refuse) -> dict:
    """rope_type / YaRN fields; see the module docstring."""
    params = get("rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") or "default"
    if rope_type == "default":
        return dict(rope_type="rope")
    if rope_type != "yarn":
        refuse("rope_parameters.rope_type", rope_type, "MLA converts plain RoPE and YaRN only")
    for key, value in YARN_FIXED.items():
        got = params.get(key) or value
        if float(got) != value:
            refuse(f"rope_parameters.{key}", got, f"Megatron-LM's MLA YaRN uses {value} and has "
                   f"no flag to change it")
    if params.get("truncate", True) is False:
        refuse("rope_parameters.truncate", False, "Megatron rounds the YaRN correction range")
    if params.get("attention_factor") is not None:
        refuse("rope_parameters.attention_factor", params["attention_factor"],
               "Megatron derives it from mscale / mscale_all_dim")
    factor = params.get("factor")
    if factor is None:
        factor = get("max_position_embeddings") / YARN_FIXED["original_max_position_embeddings"]
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if mscale_all and not mscale:
        refuse("rope_parameters.mscale_all_dim", mscale_all, "transformers' cos/sin factor "
               "without mscale is not Megatron's mscale / mscale_all_dim ratio")
    return dict(rope_type="yarn", rope_scaling_factor=float(factor),
                mscale=float(mscale) if mscale and mscale_all else 1.0,
                mscale_all_dim=float(mscale_all or 0.0))
