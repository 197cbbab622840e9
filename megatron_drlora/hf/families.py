"""Supported Hugging Face MoE families: what their configs mean for Megatron-Core, what is
refused, and their tensor names.

`describe(config)` reads a transformers config into a `ModelDescription` (one place for every
dimension and feature the conversion depends on) and refuses, naming the config key, anything the
Megatron model built by `megatron_drlora.modeling` cannot reproduce exactly: sliding-window
attention and output-projection biases (except Phi-MoE's, `megatron_drlora.hf.phimoe`), RoPE
scaling, partial rotary embeddings and dense layers between MoE layers (except GLM-4.5's,
`megatron_drlora.hf.glm4_moe`), q/k/v clipping, activations other than SiLU. DeepSeek-V2/V3
(multi-latent attention, YaRN, their routers) are described in `megatron_drlora.hf.deepseek`.

Router semantics. HF routers take a softmax over all experts, then the top-k. Mixtral always
renormalises the top-k probabilities (and Qwen3-MoE by default, `norm_topk_prob`): the same as
Megatron's default (top-k of the logits, softmax over those k). Qwen2-MoE and OLMoE use the raw
top-k probabilities (`norm_topk_prob: false`): Megatron's `--moe-router-pre-softmax`.

Tensor names (`HFNames`). On disk (what `save_pretrained` writes, transformers 4 and 5 alike) each
expert has its own tensors: `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, for
Mixtral `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (w1 = gate, w3 = up,
w2 = down). transformers 5 fuses them in memory into `mlp.experts.gate_up_proj` [E, 2I, H]
(gate rows first) and `mlp.experts.down_proj` [E, H, I]; checkpoints in that fused style are read
too and an export keeps the style of its base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_drlora.hf.common import HFInteropError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "glm4_moe", "deepseek_v2",
            "deepseek_v3")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "phimoe": "PhimoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")  # megatron_drlora.hf.deepseek


@dataclass
class ModelDescription:
    """Everything about an HF MoE model that the Megatron model and the tensor mapping need."""

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    num_experts: int
    topk: int
    moe_ffn_hidden_size: int
    ffn_hidden_size: int
    norm_topk_prob: bool
    norm_epsilon: float
    rope_theta: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: str = "none"              # none / head (Qwen3-MoE) / projection (OLMoE)
    shared_expert_ffn: Optional[int] = None
    shared_expert_gate: bool = False
    # Phi-MoE (megatron_drlora.hf.phimoe): LayerNorm with bias, o_proj and lm_head biases,
    # sparsemixer routing, sliding-window attention.
    normalization: str = "RMSNorm"
    attention_output_bias: bool = False
    lm_head_bias: bool = False
    router_type: str = "topk"
    router_jitter_eps: float = 0.0
    input_jitter_eps: float = 0.0  # training only: the MoE input scaled by uniform noise
    sliding_window: Optional[int] = None
    # GLM-4.5 (megatron_drlora.hf.glm4_moe): partial RoPE, first dense layers, sigmoid router
    # with expert bias, group-limited top-k, scaled weights, MTP layers skipped.
    rotary_percent: float = 1.0
    first_dense_layers: int = 0
    router_score: str = "softmax"
    router_expert_bias: bool = False
    router_num_groups: Optional[int] = None
    router_group_topk: Optional[int] = None
    router_scaling: Optional[float] = None
    mtp_layers: int = 0
    # DeepSeek-V2/V3 (megatron_drlora.hf.deepseek): multi-latent attention, YaRN.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None  # set: MLA
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    rope_type: str = "rope"
    rope_scaling_factor: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    latent_norm_epsilon: Optional[float] = None  # MLA's q/kv latent norms (transformers: 1e-6)
    # Dropout as transformers trains the model: on the attention probabilities only (config
    # `attention_dropout`), none on the residual stream. Megatron's defaults are 0.1 for both,
    # so model.args states them.
    attention_dropout: float = 0.0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    @property
    def moe_layer_freq(self):
        if not self.first_dense_layers:
            return 1
        return [0] * self.first_dense_layers + [1] * (self.num_layers - self.first_dense_layers)

    @property
    def router_pre_softmax(self) -> bool:
        return not self.norm_topk_prob and self.router_type == "topk"

    @property
    def window_size(self):
        """Megatron's (left, right) window for HF's sliding_window W (W positions, self
        included), None without one."""
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)

    def model_kwargs(self, padded_vocab: int) -> Dict:
        """MoEModelArgs fields (without the parallel layout)."""
        default_head = self.hidden_size // self.num_attention_heads
        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, num_experts=self.num_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size, moe_router_topk=self.topk,
            moe_router_pre_softmax=self.router_pre_softmax,
            qk_layernorm=self.qk_norm != "none" or self.mla,
            qk_layernorm_scope="projection" if self.qk_norm == "projection" else "head",
            add_qkv_bias=self.qkv_bias,
            kv_channels=None if self.head_dim == default_head else self.head_dim,
            moe_shared_expert_intermediate_size=self.shared_expert_ffn,
            moe_shared_expert_gate=self.shared_expert_gate,
            moe_router_type=self.router_type, moe_sparsemixer_jitter_eps=self.router_jitter_eps,
            add_attention_output_bias=self.attention_output_bias,
            add_output_layer_bias=self.lm_head_bias, window_size=self.window_size,
            moe_layer_input_jitter_eps=self.input_jitter_eps,
            rotary_percent=self.rotary_percent, moe_layer_freq=self.moe_layer_freq,
            moe_router_score_function=self.router_score,
            moe_router_enable_expert_bias=self.router_expert_bias,
            moe_router_num_groups=self.router_num_groups,
            moe_router_group_topk=self.router_group_topk,
            moe_router_topk_scaling_factor=self.router_scaling,
            swiglu=True, normalization=self.normalization, layernorm_epsilon=self.norm_epsilon,
            position_embedding_type="rope", rotary_base=self.rope_theta,
            vocab_size=padded_vocab, seq_length=self.max_position_embeddings,
            untie_embeddings_and_output_weights=not self.tie_word_embeddings,
            **self._mla_kwargs())

    def _mla_kwargs(self) -> Dict:
        if not self.mla:
            return {}
        return dict(multi_latent_attention=True, q_lora_rank=self.q_lora_rank,
                    kv_lora_rank=self.kv_lora_rank, qk_head_dim=self.qk_nope_head_dim,
                    qk_pos_emb_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                    rope_type=self.rope_type, rotary_scaling_factor=self.rope_scaling_factor,
                    mscale=self.mscale, mscale_all_dim=self.mscale_all_dim,
                    mla_latent_norm_epsilon=self._latent_eps())

    def _latent_eps(self) -> Optional[float]:
        eps = self.latent_norm_epsilon
        return None if eps is None or eps == self.norm_epsilon else eps

    def _mla_flags(self) -> List[str]:
        if not self.mla:
            return []
        f = ["--multi-latent-attention", "--qk-layernorm"]
        if self.q_lora_rank is not None:
            f.append(f"--q-lora-rank {self.q_lora_rank}")
        f += [f"--kv-lora-rank {self.kv_lora_rank}", f"--qk-head-dim {self.qk_nope_head_dim}",
              f"--qk-pos-emb-head-dim {self.qk_rope_head_dim}", f"--v-head-dim {self.v_head_dim}",
              f"--rope-type {self.rope_type}"]
        if self.rope_type == "yarn":
            f += [f"--rotary-scaling-factor {self.rope_scaling_factor!r}",
                  f"--mscale {self.mscale!r}", f"--mscale-all-dim {self.mscale_all_dim!r}"]
        if self._latent_eps() is not None:
            f.append(f"--mla-latent-norm-epsilon {self._latent_eps()!r}")
        return f

    def flags(self) -> List[str]:
        """The examples/pretrain_gpt.py model flags, one flag (with its value) per entry."""
        f = [f"--num-layers {self.num_layers}", f"--hidden-size {self.hidden_size}",
             f"--num-attention-heads {self.num_attention_heads}"]
        if self.num_query_groups != self.num_attention_heads:
            f += ["--group-query-attention", f"--num-query-groups {self.num_query_groups}"]
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            f.append(f"--kv-channels {self.head_dim}")
        if self.qkv_bias:
            f.append("--add-qkv-bias")
        f += self._mla_flags()
        if self.qk_norm != "none":
            f.append("--qk-layernorm")
            if self.qk_norm == "projection":
                f.append("--qk-layernorm-scope projection")
        f += [f"--ffn-hidden-size {self.ffn_hidden_size}", f"--num-experts {self.num_experts}",
              f"--moe-router-topk {self.topk}", f"--moe-ffn-hidden-size {self.moe_ffn_hidden_size}"]
        if self.router_pre_softmax and self.router_score == "softmax":
            f.append("--moe-router-pre-softmax")
        if self.first_dense_layers:
            f.append(f"--moe-layer-freq [0]*{self.first_dense_layers}+[1]*"
                     f"{self.num_layers - self.first_dense_layers}")
        if self.router_score != "softmax":
            f.append(f"--moe-router-score-function {self.router_score}")
        if self.router_expert_bias:
            f.append("--moe-router-enable-expert-bias")
        if self.router_num_groups:
            f += [f"--moe-router-num-groups {self.router_num_groups}",
                  f"--moe-router-group-topk {self.router_group_topk}"]
        if self.router_scaling:
            f.append(f"--moe-router-topk-scaling-factor {self.router_scaling!r}")
        if self.family in ("glm4_moe",) + MLA_FAMILIES:  # transformers routes these in fp32
            f.append("--moe-router-dtype fp32")
        if self.router_type != "topk":
            f += [f"--moe-router-type {self.router_type}",
                  f"--moe-sparsemixer-jitter-eps {self.router_jitter_eps!r}"]
        if self.input_jitter_eps:
            f.append(f"--moe-layer-input-jitter-eps {self.input_jitter_eps!r}")
        if self.shared_expert_ffn:
            f.append(f"--moe-shared-expert-intermediate-size {self.shared_expert_ffn}")
            if self.shared_expert_gate:
                f.append("--moe-shared-expert-gate")
        f += ["--swiglu", f"--normalization {self.normalization}",
              f"--norm-epsilon {self.norm_epsilon!r}",
              "--position-embedding-type rope", f"--rotary-base {self.rope_theta}",
              *([f"--rotary-percent {self.rotary_percent!r}"] if self.rotary_percent != 1.0
                else []),
              f"--max-position-embeddings {self.max_position_embeddings}",
              "--disable-bias-linear", f"--vocab-size {self.vocab_size}",
              f"--attention-dropout {self.attention_dropout!r}", "--hidden-dropout 0.0"]
        if not self.tie_word_embeddings:
            f.append("--untie-embeddings-and-output-weights")
        if self.attention_output_bias:
            f.append("--add-attention-output-bias")
        if self.lm_head_bias:
            f.append("--add-output-layer-bias")
        if self.window_size is not None:
            f.append(f"--window-size {self.window_size[0]},{self.window_size[1]}")
        return f


def family_of(config_dict: Dict, path: str = "") -> str:
    """The family name of a config.json dict; unknown families are refused by name."""
    model_type = config_dict.get("model_type")
    if model_type in FAMILIES:
        return model_type
    archs = config_dict.get("architectures") or []
    supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
    raise HFInteropError(f"{path}/config.json: unsupported model family model_type={model_type!r} "
                         f"architectures={archs}; supported: {supported}")


def describe(config, path: str = "") -> ModelDescription:
    """Read and check a transformers config; see the module docstring."""
    desc = _describe_family(config, path)
    dropout = getattr(config, "attention_dropout", 0.0)
    desc.attention_dropout = float(dropout or 0.0)
    if not 0.0 <= desc.attention_dropout < 1.0:
        raise HFInteropError(f"{path + '/' if path else ''}config.json: attention_dropout="
                             f"{dropout!r} is not a probability in [0, 1)")
    return desc


def _describe_family(config, path: str) -> ModelDescription:
    family = family_of(config.to_dict() if hasattr(config, "to_dict") else dict(config), path)
    where = f"{path}/config.json" if path else "config.json"

    def get(name, default=None):
        return getattr(config, name, default)

    def refuse(key, value, why):
        raise HFInteropError(f"{where}: {key}={value!r} is not supported ({why}); "
                             f"family {family}")

    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", get("hidden_act"), "the experts must be SwiGLU (silu)")
    if family not in MLA_FAMILIES:  # megatron_drlora.hf.deepseek reads its own RoPE
        _check_rope(get, refuse, partial_ok=family == "glm4_moe")
    _check_attention_window(family, get, refuse)
    num_layers = int(get("num_hidden_layers"))
    if family in ("qwen2_moe", "qwen3_moe"):
        if list(get("mlp_only_layers", []) or []):
            refuse("mlp_only_layers", get("mlp_only_layers"),
                   "dense MLP layers between MoE layers")
        if int(get("decoder_sparse_step", 1) or 1) != 1:
            refuse("decoder_sparse_step", get("decoder_sparse_step"),
                   "only every layer being an MoE layer is supported")
    if family == "olmoe" and get("clip_qkv") is not None:
        refuse("clip_qkv", get("clip_qkv"), "q/k/v clipping")
    if family in ("qwen3_moe", "olmoe") and get("attention_bias", False):
        refuse("attention_bias", True, "biases on the attention output projection")

    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    groups = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim", None) or hidden // heads)
    if family == "olmoe" and head_dim * heads != hidden:
        refuse("head_dim", head_dim, "OLMoE's q/k norm sizes assume hidden_size / heads")
    if family == "mixtral":
        experts, moe_ffn = int(get("num_local_experts")), int(get("intermediate_size"))
        dense_ffn = moe_ffn
        norm_topk = True
    elif family in ("olmoe", "phimoe"):
        experts = int(get("num_experts", None) or get("num_local_experts"))
        moe_ffn = int(get("intermediate_size"))
        dense_ffn = moe_ffn
        norm_topk = bool(get("norm_topk_prob", False))
    else:
        experts = int(get("num_experts", None) or get("num_local_experts"))
        moe_ffn = int(get("moe_intermediate_size"))
        dense_ffn = int(get("intermediate_size", moe_ffn) or moe_ffn)
        norm_topk = bool(get("norm_topk_prob", False))
    shared_ffn = None
    if family == "qwen2_moe":
        shared_ffn = int(get("shared_expert_intermediate_size", 0) or 0) or None
        if shared_ffn is None:
            refuse("shared_expert_intermediate_size", 0, "Qwen2-MoE without a shared expert")
    params = get("rope_parameters", None) or {}
    theta = params.get("rope_theta", get("rope_theta", 10000.0))
    if float(theta) != int(float(theta)):
        refuse("rope_theta", theta, "--rotary-base takes an integer")
    common = None
    if family in ("phimoe", "glm4_moe") + MLA_FAMILIES:
        common = dict(
            family=family, num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=groups, head_dim=head_dim, vocab_size=int(get("vocab_size")),
            rope_theta=int(float(theta)),
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)))
    if family == "phimoe":
        from megatron_drlora.hf.phimoe import describe_phimoe

        return describe_phimoe(get, refuse, common)
    if family == "glm4_moe":
        from megatron_drlora.hf.glm4_moe import describe_glm4_moe

        return describe_glm4_moe(get, refuse, common)
    if family in MLA_FAMILIES:
        from megatron_drlora.hf.deepseek import describe_deepseek

        return describe_deepseek(family, get, refuse, common)
    return ModelDescription(
        family=family, num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, head_dim=head_dim, vocab_size=int(get("vocab_size")),
        num_experts=experts, topk=int(get("num_experts_per_tok")), moe_ffn_hidden_size=moe_ffn,
        ffn_hidden_size=dense_ffn, norm_topk_prob=norm_topk,
        norm_epsilon=float(get("rms_norm_eps", 1e-6)), rope_theta=int(float(theta)),
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=bool(get("qkv_bias", True)) if family == "qwen2_moe" else False,
        qk_norm={"qwen3_moe": "head", "olmoe": "projection"}.get(family, "none"),
        shared_expert_ffn=shared_ffn, shared_expert_gate=family == "qwen2_moe")


def _check_rope(get, refuse, partial_ok: bool = False) -> None:
    params = get("rope_parameters", None) or {}
    scaling = get("rope_scaling", None) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        refuse("rope_parameters", params, "per-layer-type RoPE parameters")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    if rope_type != "default":
        refuse("rope_parameters.rope_type", rope_type, "only plain RoPE is converted; scaled "
               "RoPE (linear, dynamic, yarn, llama3, ...) is not implemented in this Megatron "
               "model")
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0) and not partial_ok:
        refuse("partial_rotary_factor", partial, "partial rotary embeddings")


def _check_attention_window(family, get, refuse) -> None:
    if family == "phimoe":
        return  # sliding_window is supported (megatron_drlora.hf.phimoe)
    if family == "mixtral":
        if get("sliding_window") is not None:
            refuse("sliding_window", get("sliding_window"), "sliding-window attention")
        return
    if get("use_sliding_window", False):
        refuse("use_sliding_window", True, "sliding-window attention")
    types = get("layer_types", None) or []
    if any(t != "full_attention" for t in types):
        refuse("layer_types", sorted(set(types)), "sliding-window attention layers")
    if family == "olmoe" and get("sliding_window") is not None:
        refuse("sliding_window", get("sliding_window"), "sliding-window attention")


class HFNames:
    """HF tensor names of one model in one storage style ('per_expert' or 'fused')."""

    def __init__(self, desc: ModelDescription, style: str = "per_expert"):
        if style not in ("per_expert", "fused"):
            raise ValueError(f"unknown HF naming style {style!r}")
        self.desc = desc
        self.style = style
        mixtral = desc.family in ("mixtral", "phimoe")  # Phi-MoE names experts like Mixtral
        self.block = "block_sparse_moe" if mixtral and style == "per_expert" else "mlp"
        self.proj = ({"gate": "w1", "up": "w3", "down": "w2"} if mixtral else
                     {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
        # transformers 5 renames Phi-MoE's router module to mlp.router in memory
        fused_phi = desc.family == "phimoe" and style == "fused"
        self.router_module = "mlp.router" if fused_phi else f"{self.block}.gate"

    embed = "model.embed_tokens.weight"
    lm_head = "lm_head.weight"
    lm_head_bias = "lm_head.bias"
    final_norm = "model.norm.weight"
    final_norm_bias = "model.norm.bias"

    @staticmethod
    def layer(layer: int, suffix: str) -> str:
        return f"model.layers.{layer}.{suffix}"

    def attn(self, layer: int, which: str, kind: str = "weight") -> str:
        return self.layer(layer, f"self_attn.{which}.{kind}")

    def router(self, layer: int) -> str:
        return self.layer(layer, f"{self.router_module}.weight")

    def expert(self, layer: int, expert: int, proj: str) -> str:
        return self.layer(layer, f"{self.block}.experts.{expert}.{self.proj[proj]}.weight")

    def fused(self, layer: int, which: str) -> str:
        return self.layer(layer, f"mlp.experts.{which}")  # gate_up_proj / down_proj

    def shared(self, layer: int, proj: str) -> str:
        module = ("shared_experts" if self.desc.family in ("glm4_moe",) + MLA_FAMILIES
                  else "shared_expert")
        return self.layer(layer, f"mlp.{module}.{proj}_proj.weight")

    def dense(self, layer: int, proj: str) -> str:
        return self.layer(layer, f"mlp.{proj}_proj.weight")

    def expert_bias(self, layer: int) -> str:
        return self.layer(layer, f"{self.router_module}.e_score_correction_bias")

    def mla_attention(self) -> List[str]:
        """The attention modules of multi-latent attention (DeepSeek-V2/V3)."""
        q = ["q_proj"] if self.desc.q_lora_rank is None else \
            ["q_a_proj", "q_a_layernorm", "q_b_proj"]
        return q + ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]

    def shared_gate(self, layer: int) -> str:
        return self.layer(layer, "mlp.shared_expert_gate.weight")

    def layer_names(self, layer: int) -> List[str]:
        """Every HF tensor name of one decoder layer."""
        d = self.desc
        norms = ("input_layernorm", "post_attention_layernorm")
        names = [self.layer(layer, f"{n}.weight") for n in norms]
        if d.normalization == "LayerNorm":
            names += [self.layer(layer, f"{n}.bias") for n in norms]
        if d.mla:
            names += [self.attn(layer, p) for p in self.mla_attention()]
        else:
            names += [self.attn(layer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if d.qkv_bias:
            names += [self.attn(layer, p, "bias") for p in ("q_proj", "k_proj", "v_proj")]
        if d.attention_output_bias:
            names.append(self.attn(layer, "o_proj", "bias"))
        if d.qk_norm != "none":
            names += [self.attn(layer, "q_norm"), self.attn(layer, "k_norm")]
        if not d.is_moe_layer(layer):
            return names + [self.dense(layer, p) for p in ("gate", "up", "down")]
        names.append(self.router(layer))
        if d.router_expert_bias:
            names.append(self.expert_bias(layer))
        if self.style == "fused":
            names += [self.fused(layer, "gate_up_proj"), self.fused(layer, "down_proj")]
        else:
            names += [self.expert(layer, e, p) for e in range(d.num_experts)
                      for p in ("gate", "up", "down")]
        if d.shared_expert_ffn:
            names += [self.shared(layer, p) for p in ("gate", "up", "down")]
            if d.shared_expert_gate:
                names.append(self.shared_gate(layer))
        return names

    def global_names(self) -> List[str]:
        """The HF tensors outside the decoder layers."""
        names = [self.embed, self.final_norm]
        if self.desc.normalization == "LayerNorm":
            names.append(self.final_norm_bias)
        if not self.desc.tie_word_embeddings:
            names.append(self.lm_head)
        if self.desc.lm_head_bias:
            names.append(self.lm_head_bias)
        return names

    def mtp_names(self, have) -> set:
        """The names of `have` in the multi-token-prediction layers (GLM-4.5 stores them as
        layers L .. L+n-1 after the L decoder layers)."""
        d = self.desc
        prefixes = tuple(f"model.layers.{d.num_layers + i}." for i in range(d.mtp_layers))
        return {n for n in have if prefixes and n.startswith(prefixes)}

    def all_names(self) -> List[str]:
        names = self.global_names()
        for layer in range(self.desc.num_layers):
            names += self.layer_names(layer)
        return names


def detect_style(names, desc: ModelDescription) -> str:
    """'fused' when the checkpoint stores transformers-5 fused expert tensors, else
    'per_expert'."""
    fused = HFNames(desc, "fused").fused(desc.first_dense_layers, "gate_up_proj")
    return "fused" if fused in set(names) else "per_expert"
