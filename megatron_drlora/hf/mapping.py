"""The tensor mapping between Megatron-Core's global checkpoint keys and HF tensor names.

Megatron's dist checkpoints store every decoder tensor stacked over layers under one key
(`decoder.layers.self_attention.linear_qkv.weight` has global shape [layers, ...]) and expert
tensors stacked over layers and experts (`decoder.layers.mlp.experts.experts.linear_fc1.weight`:
[layers, experts, 2I, H]). The functions here work on one layer (and for experts one expert, or
all experts of a layer) at a time, so neither direction ever holds more than a layer.

Layout facts this mapping encodes:
- fused qkv: per query group g, the group's query heads, then its key head, then its value head
  ([q_g0 .. q_g(n-1), k_g, v_g] for every g), the same for the qkv bias;
- fc1 of a gated expert (and of the shared expert) is [gate; up] (gate rows first);
- the shared expert's sigmoid gate is `mlp.shared_experts.gate_weight` [1, H];
- a dense layer's fc1 (GLM-4.5's first layers) is [gate; up] too; the sigmoid router's expert
  bias is `mlp.router.expert_bias` [E] (HF `e_score_correction_bias`);
- the vocabulary is padded with zero rows (as pretrain_gpt.py pads it), dropped on export;
- multi-latent attention (DeepSeek): HF's q / q_a / q_b / kv_a_proj_with_mqa / kv_b_proj are
  Megatron's linear_q_proj / q_down / q_up / kv_down / kv_up with the same row layout (rope
  rows reordered for `rope_interleave: false`, see mla_rope_rows), the latent norms
  q_layernorm / kv_layernorm;
- a layer norm fused into the next linear in Megatron's naming (`linear_qkv.layer_norm_weight`,
  `linear_fc1.layer_norm_weight`) is HF's input / post-attention layer norm; LayerNorm biases
  (Phi-MoE) likewise, and the output layer's bias is padded like its weight.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional

import torch

from megatron_drlora.hf.common import HFInteropError
from megatron_drlora.hf.families import HFNames, ModelDescription

LAYER_PREFIX = "decoder.layers."
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
ATTN_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
ATTN_NORM_BIAS = ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias")
PROJ = "self_attention.linear_proj.weight"
PROJ_BIAS = "self_attention.linear_proj.bias"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
MLP_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
MLP_NORM_BIAS = ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias")
ROUTER = "mlp.router.weight"
EXPERT_BIAS = "mlp.router.expert_bias"
DENSE_FC1 = "mlp.linear_fc1.weight"
DENSE_FC2 = "mlp.linear_fc2.weight"
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
SHARED_FC1 = "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "mlp.shared_experts.gate_weight"
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
OUTPUT_BIAS = "output_layer.bias"
FINAL_NORM = "decoder.final_layernorm.weight"
FINAL_NORM_BIAS = "decoder.final_layernorm.bias"
EXPERT_KEYS = (EXPERT_FC1, EXPERT_FC2)
# Multi-latent attention (DeepSeek-V2/V3). The latent norms are separate modules with the local
# spec and fused into the up projections with Transformer Engine.
MLA_LINEARS = {"self_attention.linear_q_proj.weight": "q_proj",
               "self_attention.linear_q_down_proj.weight": "q_a_proj",
               "self_attention.linear_q_up_proj.weight": "q_b_proj",
               "self_attention.linear_kv_down_proj.weight": "kv_a_proj_with_mqa",
               "self_attention.linear_kv_up_proj.weight": "kv_b_proj"}
MLA_NORMS = {"self_attention.q_layernorm.weight": "q_a_layernorm",
             "self_attention.linear_q_up_proj.layer_norm_weight": "q_a_layernorm",
             "self_attention.kv_layernorm.weight": "kv_a_layernorm",
             "self_attention.linear_kv_up_proj.layer_norm_weight": "kv_a_layernorm"}


def is_layer_key(key: str) -> bool:
    return key.startswith(LAYER_PREFIX)


def layer_suffix(key: str) -> str:
    return key[len(LAYER_PREFIX):]


def is_expert_key(key: str) -> bool:
    return is_layer_key(key) and layer_suffix(key) in EXPERT_KEYS


NUMBERED = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def numbered_layer(key: str) -> Optional[int]:
    """The layer of a per-layer key `decoder.layers.L.<suffix>` (what Megatron saves when the
    layers differ, e.g. `--moe-layer-freq` as a list), None for a layer-stacked key."""
    m = NUMBERED.match(key)
    return int(m.group(1)) if m else None


def canonical(key: str) -> str:
    """`decoder.layers.L.<suffix>` -> `decoder.layers.<suffix>`; other keys unchanged."""
    m = NUMBERED.match(key)
    return LAYER_PREFIX + m.group(2) if m else key


def locate(key: str, global_offset, stacked: int):
    """(canonical key, layer, expert) of a ShardedTensor with `stacked` prepended dims."""
    layer = numbered_layer(key)
    if layer is not None:
        key = canonical(key)
        expert = global_offset[0] if is_expert_key(key) and stacked else None
        return key, layer, expert
    layer = global_offset[0] if is_layer_key(key) and stacked else None
    expert = global_offset[1] if is_expert_key(key) else None
    return key, layer, expert


# --- qkv layout ---------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: ModelDescription):
    """HF q [heads*hd, ...], k/v [groups*hd, ...] -> Megatron's grouped qkv."""
    g, hd = d.num_query_groups, d.head_dim
    per = d.num_attention_heads // g
    rest = q.shape[1:]
    parts = [q.reshape(g, per * hd, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(g * (per + 2) * hd, *rest)


def split_qkv(qkv: torch.Tensor, d: ModelDescription):
    """Inverse of fuse_qkv."""
    g, hd = d.num_query_groups, d.head_dim
    per = d.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * hd, *rest)
    q, k, v = torch.split(grouped, [per * hd, hd, hd], dim=1)
    return (q.reshape(g * per * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest))


def mla_rope_rows(t: torch.Tensor, which: str, d: ModelDescription, inverse: bool = False):
    """HF -> Megatron row order of an MLA q or kv_a weight (inverse: back). Megatron rotates
    channel pairs (2i, 2i+1) of the rope part; with `rope_interleave: false` transformers
    rotates (i, i + d/2), so those rows are interleaved. Other rows and layouts are unchanged
    (per head [nope, rope] for q, [kv latent, rope] for kv_a, in both)."""
    if d.rope_interleave or which not in ("q_proj", "q_b_proj", "kv_a_proj_with_mqa"):
        return t
    r = d.qk_rope_head_dim
    lead = d.kv_lora_rank if which == "kv_a_proj_with_mqa" else d.qk_nope_head_dim
    perm = torch.stack([torch.arange(r // 2), torch.arange(r // 2) + r // 2], -1).flatten()
    if inverse:
        perm = torch.argsort(perm)
    blocks = t.reshape(-1, lead + r, *t.shape[1:])
    out = torch.cat([blocks[:, :lead], blocks[:, lead:][:, perm]], dim=1)
    return out.reshape(t.shape)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] > padded:
        raise HFInteropError(f"vocabulary {t.shape[0]} is larger than the padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


# --- HF -> Megatron -----------------------------------------------------------------------
class HFExpertReader:
    """gate / up / down [out, in] of one expert from per-expert or fused HF tensors."""

    def __init__(self, get: Callable[[str], torch.Tensor],
                 get_rows: Callable[[str, int], torch.Tensor], names: HFNames):
        self.get, self.get_rows, self.names = get, get_rows, names

    def __call__(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        n = self.names
        if n.style == "per_expert":
            return self.get(n.expert(layer, expert, proj))
        inter = n.desc.moe_ffn_hidden_size
        if proj == "down":
            return self.get_rows(n.fused(layer, "down_proj"), expert)
        gate_up = self.get_rows(n.fused(layer, "gate_up_proj"), expert)
        return gate_up[:inter] if proj == "gate" else gate_up[inter:]


def megatron_tensor(key: str, layer: Optional[int], expert: Optional[int],
                    get: Callable[[str], torch.Tensor], experts: HFExpertReader,
                    names: HFNames, padded_vocab: int) -> torch.Tensor:
    """The global Megatron tensor `key` (for one layer, one expert) built from HF tensors;
    shape = the checkpoint's global shape without the stacked layer / expert dims."""
    d = names.desc
    if key == EMBED:
        return pad_vocab(get(names.embed), padded_vocab)
    if key == OUTPUT:
        return pad_vocab(get(names.embed if d.tie_word_embeddings else names.lm_head),
                         padded_vocab)
    if key == FINAL_NORM:
        return get(names.final_norm)
    if key == FINAL_NORM_BIAS:
        return get(names.final_norm_bias)
    if key == OUTPUT_BIAS:
        return pad_vocab(get(names.lm_head_bias), padded_vocab)
    if not is_layer_key(key) or layer is None:
        raise HFInteropError(f"no Hugging Face source for Megatron tensor {key!r} "
                             f"(family {d.family})")
    s, n, L = layer_suffix(key), names, layer
    if s in ATTN_NORM:
        return get(n.layer(L, "input_layernorm.weight"))
    if s in MLP_NORM:
        return get(n.layer(L, "post_attention_layernorm.weight"))
    if s in ATTN_NORM_BIAS:
        return get(n.layer(L, "input_layernorm.bias"))
    if s in MLP_NORM_BIAS:
        return get(n.layer(L, "post_attention_layernorm.bias"))
    if s == PROJ_BIAS:
        return get(n.attn(L, "o_proj", "bias"))
    if s in MLA_LINEARS:
        return mla_rope_rows(get(n.attn(L, MLA_LINEARS[s])), MLA_LINEARS[s], d)
    if s in MLA_NORMS and d.mla:  # q_layernorm is Qwen3's / GLM's per-head q norm otherwise
        return get(n.attn(L, MLA_NORMS[s]))
    if s == QKV:
        return fuse_qkv(*(get(n.attn(L, p)) for p in ("q_proj", "k_proj", "v_proj")), d)
    if s == QKV_BIAS:
        return fuse_qkv(*(get(n.attn(L, p, "bias")) for p in ("q_proj", "k_proj", "v_proj")), d)
    if s == PROJ:
        return get(n.attn(L, "o_proj"))
    if s == Q_NORM:
        return get(n.attn(L, "q_norm"))
    if s == K_NORM:
        return get(n.attn(L, "k_norm"))
    if s == ROUTER:
        return get(n.router(L))
    if s == EXPERT_BIAS:
        return get(n.expert_bias(L))
    if s == DENSE_FC1:
        return torch.cat([get(n.dense(L, "gate")), get(n.dense(L, "up"))])
    if s == DENSE_FC2:
        return get(n.dense(L, "down"))
    if s == EXPERT_FC1:
        return torch.cat([experts(L, expert, "gate"), experts(L, expert, "up")])
    if s == EXPERT_FC2:
        return experts(L, expert, "down")
    if s == SHARED_FC1:
        return torch.cat([get(n.shared(L, "gate")), get(n.shared(L, "up"))])
    if s == SHARED_FC2:
        return get(n.shared(L, "down"))
    if s == SHARED_GATE:
        return get(n.shared_gate(L))
    raise HFInteropError(f"no Hugging Face source for Megatron tensor {key!r} (family "
                         f"{d.family}); the Megatron model has a tensor this converter does not "
                         f"know")


# --- Megatron -> HF -----------------------------------------------------------------------
def hf_tensors(key: str, tensor: torch.Tensor, layer: Optional[int], names: HFNames
               ) -> Dict[str, torch.Tensor]:
    """HF name -> tensor for one Megatron global tensor of one layer (expert tensors: all
    experts of the layer, [E, ...]). The vocabulary padding is dropped."""
    d = names.desc
    if key == EMBED:
        return {names.embed: tensor[:d.vocab_size]}
    if key == OUTPUT:
        return {} if d.tie_word_embeddings else {names.lm_head: tensor[:d.vocab_size]}
    if key == FINAL_NORM:
        return {names.final_norm: tensor}
    if key == FINAL_NORM_BIAS:
        return {names.final_norm_bias: tensor}
    if key == OUTPUT_BIAS:
        return {names.lm_head_bias: tensor[:d.vocab_size]}
    s, n, L = layer_suffix(key), names, layer
    if s in ATTN_NORM:
        return {n.layer(L, "input_layernorm.weight"): tensor}
    if s in MLP_NORM:
        return {n.layer(L, "post_attention_layernorm.weight"): tensor}
    if s in ATTN_NORM_BIAS:
        return {n.layer(L, "input_layernorm.bias"): tensor}
    if s in MLP_NORM_BIAS:
        return {n.layer(L, "post_attention_layernorm.bias"): tensor}
    if s == PROJ_BIAS:
        return {n.attn(L, "o_proj", "bias"): tensor}
    if s in MLA_LINEARS:
        return {n.attn(L, MLA_LINEARS[s]): mla_rope_rows(tensor, MLA_LINEARS[s], d, True)}
    if s in MLA_NORMS and d.mla:
        return {n.attn(L, MLA_NORMS[s]): tensor}
    if s in (QKV, QKV_BIAS):
        kind = "weight" if s == QKV else "bias"
        return {n.attn(L, p, kind): t for p, t in zip(("q_proj", "k_proj", "v_proj"),
                                                      split_qkv(tensor, d))}
    if s == PROJ:
        return {n.attn(L, "o_proj"): tensor}
    if s == Q_NORM:
        return {n.attn(L, "q_norm"): tensor}
    if s == K_NORM:
        return {n.attn(L, "k_norm"): tensor}
    if s == ROUTER:
        return {n.router(L): tensor}
    if s == EXPERT_BIAS:
        return {n.expert_bias(L): tensor}
    if s == DENSE_FC1:
        inter = d.ffn_hidden_size
        return {n.dense(L, "gate"): tensor[:inter], n.dense(L, "up"): tensor[inter:]}
    if s == DENSE_FC2:
        return {n.dense(L, "down"): tensor}
    if s == EXPERT_FC1:
        inter = d.moe_ffn_hidden_size
        if n.style == "fused":
            return {n.fused(L, "gate_up_proj"): tensor}
        out = {}
        for e in range(tensor.shape[0]):
            out[n.expert(L, e, "gate")] = tensor[e, :inter]
            out[n.expert(L, e, "up")] = tensor[e, inter:]
        return out
    if s == EXPERT_FC2:
        if n.style == "fused":
            return {n.fused(L, "down_proj"): tensor}
        return {n.expert(L, e, "down"): tensor[e] for e in range(tensor.shape[0])}
    if s == SHARED_FC1:
        inter = d.shared_expert_ffn
        return {n.shared(L, "gate"): tensor[:inter], n.shared(L, "up"): tensor[inter:]}
    if s == SHARED_FC2:
        return {n.shared(L, "down"): tensor}
    if s == SHARED_GATE:
        return {n.shared_gate(L): tensor}
    raise HFInteropError(f"Megatron tensor {key!r} has no Hugging Face counterpart in family "
                         f"{d.family}")


def order_hf_layer(names: HFNames, layer: int, tensors: Dict[str, torch.Tensor]
                   ) -> List[str]:
    """The HF names of one layer in a stable order (HF's own listing), checked complete."""
    expected = names.layer_names(layer)
    missing = [x for x in expected if x not in tensors]
    extra = [x for x in tensors if x not in set(expected)]
    if missing or extra:
        raise HFInteropError(f"layer {layer}: the Megatron checkpoint does not match the HF "
                             f"model: missing {missing[:4]}, unexpected {extra[:4]}")
    return expected
