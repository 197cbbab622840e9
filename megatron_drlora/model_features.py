"""Architecture features of HF MoE families that Megatron-LM's flags cannot express, as flags of
ours, applied to Megatron-Core's own GPT layer spec and model (the same code for the training
entry, the converter and the exporter's check, so all three build the same model).

- `--moe-router-type sparsemixer` + `--moe-sparsemixer-jitter-eps` (Phi-MoE's router,
  `megatron_drlora.routers.sparsemixer`): installed as the MoE layers' router class.
- `--add-attention-output-bias`: a bias on the attention output projection only. Megatron's
  `--add-bias-linear` would also give every expert fc1/fc2 a bias, which the HF model does not
  have (and Megatron's expert bias path is not supported by DR-LoRA's expert hooks).
- `--add-output-layer-bias`: a bias on the output layer (HF `lm_head.bias`); GPTModel builds
  its output layer without one. Vocabulary-parallel like the output weight, zero on padding rows.
- `--moe-layer-input-jitter-eps`: transformers' Phi-MoE `input_jitter_noise`. In training the MoE
  layer's input (what the router and the experts see) is multiplied by uniform noise in
  [1 - eps, 1 + eps] twice, as transformers does (its MoE block and its router each scale the
  same tensor in place). Megatron's own `--moe-input-jitter-eps` scales the router's input only.
- `--multi-latent-attention` on the local spec (no Transformer Engine): Megatron's local
  `DotProductAttention` cannot take MLA's separate q/k and v head sizes, so the spec's core
  attention becomes `compat.mla_attention.MLACoreAttention` (CPU builds only: never with CUDA
  or TE present); with TE it stays TE's.
- MLA without `--q-lora-rank` but with `--qk-layernorm` (the kv latent norm): megatron-core
  0.19 then gives the plain q projection a norm of its own (a fused norm+linear with TE; with
  the local spec it refuses to build), which DeepSeek's q_proj does not have. The attention
  class is given a plain q projection (`_plain_q_mla`), the kv latent norm as the spec has it
  (standalone, or fused into linear_kv_up_proj with TE). Tested with the local spec only.
- `--mla-latent-norm-epsilon`: the epsilon of MLA's q/kv latent RMSNorms when it is not
  `--norm-epsilon` (transformers' DeepSeek-V2/V3 build them with 1e-6 whatever
  `rms_norm_eps` says, e.g. Moonlight's 1e-5). Exact with the local spec's standalone norms;
  Transformer Engine fuses them into the up projections with `--norm-epsilon` (a warning says
  so; the difference is of the order of eps / the latent's mean square).
"""

from __future__ import annotations

import copy

import torch

from megatron_drlora.routers import ROUTER_TYPES, router_builder


def add_arguments(parser) -> None:
    group = parser.add_argument_group("model features (HF families)")
    group.add_argument("--moe-router-type", default="topk", choices=list(ROUTER_TYPES),
                       help="topk: Megatron's TopKRouter; sparsemixer: SparseMixer top-2 "
                            "(Phi-3.5-MoE / Phi-mini-MoE).")
    group.add_argument("--moe-sparsemixer-jitter-eps", type=float, default=0.01,
                       help="SparseMixer's relative logit window (HF router_jitter_noise).")
    group.add_argument("--add-attention-output-bias", action="store_true",
                       help="Bias on the attention output projection only (HF o_proj.bias).")
    group.add_argument("--add-output-layer-bias", action="store_true",
                       help="Bias on the output layer (HF lm_head.bias).")
    group.add_argument("--moe-layer-input-jitter-eps", type=float, default=0.0,
                       help="Training only: scale the MoE layer input (router and experts) by "
                            "U(1-eps, 1+eps) twice (HF Phi-MoE input_jitter_noise).")
    group.add_argument("--mla-latent-norm-epsilon", type=float, default=None,
                       help="Epsilon of the MLA q/kv latent RMSNorms (default: --norm-epsilon; "
                            "HF DeepSeek-V2/V3: 1e-6).")


def _get(args, name, default):
    return getattr(args, name, default)


def adjust_spec(block_spec, args):
    """A copy of a GPT decoder block spec with the router and attention-output bias the flags
    ask for (the spec itself when none applies)."""
    router = router_builder(_get(args, "moe_router_type", "topk"),
                            _get(args, "moe_sparsemixer_jitter_eps", 0.01))
    proj_bias = _get(args, "add_attention_output_bias", False)
    mla = _get(args, "multi_latent_attention", False)
    latent_eps = _get(args, "mla_latent_norm_epsilon", None) if mla else None
    if router is None and not proj_bias and not mla:
        return block_spec
    block_spec = copy.deepcopy(block_spec)
    for layer_spec in getattr(block_spec, "layer_specs", None) or [block_spec]:
        sub = _submodules(layer_spec)
        if mla:
            _mla(sub.self_attention, _get(args, "q_lora_rank", None), latent_eps)
        if proj_bias:
            attn = _submodules(sub.self_attention)
            attn.linear_proj = _with_bias(attn.linear_proj)
        mlp_sub = _submodules(sub.mlp)
        if router is not None and hasattr(mlp_sub, "router"):
            mlp_sub.router = router
    return block_spec


def _mla(attn_spec, q_lora_rank, latent_eps) -> None:
    """MLA layers (see the module docstring): the CPU core attention on the local spec; without
    a q LoRA a plain q projection; the latent norms with `latent_eps` when given."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    attn = _submodules(attn_spec)
    local = getattr(attn, "core_attention", None) is DotProductAttention  # no TE
    if local and not torch.cuda.is_available():  # the CPU build only (compat)
        from megatron_drlora.compat.mla_attention import MLACoreAttention

        attn.core_attention = MLACoreAttention
    if q_lora_rank is None and getattr(attn_spec, "module", None) is MLASelfAttention:
        attn.q_layernorm = IdentityOp
        attn_spec.module = _plain_q_mla()
    if latent_eps is None:
        return
    fixed = False
    for slot in ("q_layernorm", "kv_layernorm"):
        norm = getattr(attn, slot, None)
        if norm not in (None, IdentityOp):
            setattr(attn, slot, _with_eps(norm, latent_eps))
            fixed = True
    if not fixed:
        import warnings

        warnings.warn(f"--mla-latent-norm-epsilon {latent_eps}: this layer spec fuses the MLA "
                      f"latent norms into the up projections, which use --norm-epsilon")


_PLAIN_Q_MLA = []


def _plain_q_mla():
    """MLASelfAttention whose q projection (no q LoRA) is the spec's plain linear, not a
    norm+linear; the kv latent norm and up projection as the spec gives them."""
    if _PLAIN_Q_MLA:
        return _PLAIN_Q_MLA[0]
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class PlainQMLASelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            if self.config.q_lora_rank is not None or not self.config.qk_layernorm:
                return super()._resolve_qk_norm_config(submodules)
            return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                        linear_kv_up_proj=submodules.linear_kv_up_proj,
                        q_layernorm=IdentityOp, kv_layernorm=submodules.kv_layernorm or IdentityOp)

    _PLAIN_Q_MLA.append(PlainQMLASelfAttention)
    return PlainQMLASelfAttention


def _with_eps(norm, eps: float):
    """A norm builder (called as norm(hidden_size=..., config=..., eps=...)) with `eps` fixed."""
    def build(*args, **kwargs):
        kwargs["eps"] = eps
        return norm(*args, **kwargs)

    return build


def _submodules(spec):
    """The submodules of a ModuleSpec or of a functools.partial(cls, submodules=...) (the
    form megatron-core 0.19 uses for MoE layers)."""
    if hasattr(spec, "submodules"):
        return spec.submodules
    return getattr(spec, "keywords", {}).get("submodules")


def _with_bias(cls):
    """`cls` (a Megatron linear) always built with a bias, whatever add_bias_linear says."""
    if getattr(cls, "_drlora_forced_bias", False):
        return cls

    def __init__(self, *args, bias=False, **kwargs):
        cls.__init__(self, *args, bias=True, **kwargs)

    return type(f"Biased{cls.__name__}", (cls,), {"__init__": __init__,
                                                   "_drlora_forced_bias": True})


def adjust_model(model, args) -> None:
    """Add the output-layer bias and the MoE input jitter the flags ask for (in place)."""
    eps = float(_get(args, "moe_layer_input_jitter_eps", 0.0) or 0.0)
    if eps < 0:
        raise ValueError(f"--moe-layer-input-jitter-eps {eps}: must be >= 0")
    if eps > 0:
        decoder = getattr(model, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            if hasattr(getattr(layer, "mlp", None), "router"):
                layer.mlp.register_forward_pre_hook(_input_jitter(eps))
    if _get(args, "add_output_layer_bias", False):
        _add_output_layer_bias(model)


def _input_jitter(eps: float):
    """Forward pre-hook of an MoE layer: x * u1 * u2, u ~ U(1-eps, 1+eps), in training only
    (drawn from torch's default generator like transformers, which Megatron restores for
    activation recompute)."""
    def hook(module, args):
        if not module.training:
            return None
        x = args[0]
        for _ in range(2):
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return (x,) + tuple(args[1:])

    return hook


def _add_output_layer_bias(model) -> None:
    layer = getattr(model, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        return
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if layer.bias is not None:
        return
    ref = next(model.parameters())
    dtype = model.config.params_dtype
    bias = torch.nn.Parameter(torch.zeros(layer.output_size_per_partition, dtype=dtype,
                                          device=ref.device))
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    bias.allreduce = True
    layer.bias = bias
