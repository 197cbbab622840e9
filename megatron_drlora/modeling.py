"""Build Megatron-Core GPT MoE models from plain settings (entry point, tests, benchmarks).

`MoEModelArgs` mirrors the Megatron-LM flags that shape a model; `build_gpt_moe` returns the
model chunks of this pipeline rank built with Megatron-Core's own specs (Transformer Engine
layers when TE is installed, else the local spec with SequentialMLP experts).
`init_from_global_identity` gives a model the same weights under every parallel layout (each
tensor drawn in full from a seed derived from its checkpoint key, then sliced), which the
layout-parity tests and the demo base rely on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_drlora.compat import cpu


@dataclass
class MoEModelArgs:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    num_experts: int = 4
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_layer_freq: object = 1  # int, or a list of 0 (dense) / 1 (MoE) per layer
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    qk_layernorm: bool = False
    # "head": Megatron's per-head q/k norm (Qwen3-MoE); "projection": one norm over the whole
    # q/k projection (OLMoE), see projection_qk_norm.py.
    qk_layernorm_scope: str = "head"
    add_qkv_bias: bool = False
    kv_channels: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    swiglu: bool = True
    normalization: str = "RMSNorm"
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    vocab_size: int = 128
    seq_length: int = 32
    untie_embeddings_and_output_weights: bool = True
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    bf16: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    # Features beyond Megatron-LM's flags (megatron_drlora.model_features).
    moe_router_type: str = "topk"
    moe_sparsemixer_jitter_eps: float = 0.01
    add_attention_output_bias: bool = False
    add_output_layer_bias: bool = False
    window_size: Optional[tuple] = None  # Megatron's (left, right) sliding attention window
    moe_layer_input_jitter_eps: float = 0.0
    # Multi-latent attention (DeepSeek-V2/V3): Megatron's MLATransformerConfig fields. On CPU
    # its core attention is megatron_drlora.compat.mla_attention.
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 32
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: Optional[str] = None  # MLA: "rope" or "yarn" (Megatron's MLA default: yarn)
    rotary_scaling_factor: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    mla_latent_norm_epsilon: Optional[float] = None  # model_features

    @classmethod
    def from_megatron_args(cls, args, vocab_size: int) -> "MoEModelArgs":
        """The model settings of a Megatron-LM argument namespace (see
        megatron_lm.arguments.parse_megatron_args), with `vocab_size` already padded."""
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", True) else None,
            num_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_router_topk=args.moe_router_topk, moe_layer_freq=args.moe_layer_freq,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_num_groups=args.moe_router_num_groups,
            moe_router_group_topk=args.moe_router_group_topk,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            qk_layernorm=args.qk_layernorm, qk_layernorm_scope=args.qk_layernorm_scope,
            add_qkv_bias=args.add_qkv_bias, kv_channels=args.kv_channels,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate, swiglu=args.swiglu,
            normalization=args.normalization, layernorm_epsilon=args.layernorm_epsilon,
            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
            rotary_percent=args.rotary_percent, vocab_size=vocab_size,
            seq_length=args.max_position_embeddings or args.seq_length,
            untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            sequence_parallel=args.sequence_parallel, bf16=args.bf16,
            init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            moe_router_type=getattr(args, "moe_router_type", "topk"),
            moe_sparsemixer_jitter_eps=getattr(args, "moe_sparsemixer_jitter_eps", 0.01),
            add_attention_output_bias=getattr(args, "add_attention_output_bias", False),
            add_output_layer_bias=getattr(args, "add_output_layer_bias", False),
            window_size=getattr(args, "window_size", None),
            moe_layer_input_jitter_eps=getattr(args, "moe_layer_input_jitter_eps", 0.0),
            mla_latent_norm_epsilon=getattr(args, "mla_latent_norm_epsilon", None),
            **{k: getattr(args, k) for k in MLA_FIELDS if hasattr(args, k)})


MLA_FIELDS = ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
              "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor",
              "mscale", "mscale_all_dim")


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """The converter's vocabulary padding: a multiple of lcm(divisible_by, TP), the same for
    every TP that divides `divisible_by`. (Megatron-LM pads to divisible_by x TP; the base
    loader moves the padding rows either way.)"""
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab / multiple) * multiple)


def transformer_config(args: MoEModelArgs):
    """The Megatron TransformerConfig for these settings (CPU-safe fusions off without CUDA)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = args.tensor_model_parallel_size
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_layer_freq=args.moe_layer_freq,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        qk_layernorm=args.qk_layernorm,
        add_qkv_bias=args.add_qkv_bias,
        kv_channels=args.kv_channels,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        add_bias_linear=False,  # the expert bias path fails autograd in megatron-core 0.16
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        # MoELayer refuses TP > 1 training without sequence parallelism.
        sequence_parallel=args.sequence_parallel or tp > 1,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        init_method_std=args.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=False,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu and args.swiglu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        window_size=args.window_size,
    )
    config_class = TransformerConfig
    if args.multi_latent_attention:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class = MLATransformerConfig
        kwargs.update({k: getattr(args, k) for k in MLA_FIELDS})
        kwargs.update(rope_type=args.rope_type or "yarn", rotary_base=args.rotary_base,
                      rotary_percent=args.rotary_percent)
    config = config_class(**kwargs)
    cpu.adjust_model_config(config)
    return config


def layer_spec(config, args: MoEModelArgs, vp_stage: Optional[int] = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_drlora.compat.megatron import have_transformer_engine

    use_te = have_transformer_engine() and torch.cuda.is_available()
    try:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                          normalization=args.normalization, vp_stage=vp_stage)
    except TypeError:  # older signature without vp_stage
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te)
    if args.qk_layernorm and args.qk_layernorm_scope == "projection":
        from megatron_drlora.projection_qk_norm import use_projection_qk_norm

        spec = use_projection_qk_norm(spec)
    elif args.qk_layernorm_scope not in ("head", "projection"):
        raise ValueError(f"qk_layernorm_scope must be 'head' or 'projection', "
                         f"got {args.qk_layernorm_scope!r}")
    from megatron_drlora.model_features import adjust_spec

    return adjust_spec(spec, args)


def build_gpt_moe(args: MoEModelArgs, config=None) -> List[torch.nn.Module]:
    """Model chunks of this pipeline rank (one chunk unless virtual pipeline is on)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(args)
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage) if vpp else \
            ps.is_pipeline_first_stage()
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage) if vpp else \
            ps.is_pipeline_last_stage()
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, args, stage),
            vocab_size=args.vocab_size,
            max_sequence_length=args.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            rotary_percent=args.rotary_percent,
            vp_stage=stage,
        )
        from megatron_drlora.model_features import adjust_model

        adjust_model(model, args)
        chunks.append(model)
    return chunks


def _seed_for(key: str, seed: int) -> int:
    digest = hashlib.sha256(f"base/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_from_global_identity(chunks, seed: int = 0, std: float = 0.02) -> int:
    """Give every base tensor values that depend only on (seed, checkpoint key, global index).

    Each ShardedTensor of the model's sharded_state_dict is drawn in full (global shape) from a
    generator seeded by its key, and this rank's slice is copied into the parameter. Norm
    weights get 1 + noise so they stay near identity. Returns the number of tensors set.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    count = 0
    for chunk in chunks:
        for key, item in _flatten(chunk.sharded_state_dict()):
            for sh in _sharded_tensors(item, ShardedTensor, ShardedTensorFactory):
                if not torch.is_tensor(sh.data) or not sh.data.is_floating_point():
                    continue
                gen = torch.Generator().manual_seed(_seed_for(sh.key, seed))
                full = torch.randn(tuple(sh.global_shape), generator=gen, dtype=torch.float64)
                is_norm = "norm" in sh.key and len(sh.global_shape) - len(sh.local_shape) <= 1 \
                    and sh.data.dim() == 1
                full = 1.0 + 0.1 * full if is_norm else full * std
                index = tuple(slice(o, o + n) for o, n in
                              zip(sh.global_offset, _padded_local_shape(sh)))
                piece = full[index].reshape(sh.data.shape)
                sh.data.copy_(piece.to(sh.data.dtype))
                count += 1
    return count


def _padded_local_shape(sh):
    """Local shape aligned with global_offset (prepended singleton dims for expert offsets)."""
    extra = len(sh.global_shape) - len(sh.local_shape)
    return (1,) * extra + tuple(sh.local_shape)


def _flatten(sd, prefix=""):
    if isinstance(sd, dict):
        for k, v in sd.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], sd


def sharded_tensors(state_dict, build_factories: bool = True):
    """Every ShardedTensor of a (nested) sharded state dict; factories are built (their
    tensors yielded) or, with `build_factories=False`, skipped."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    factory = ShardedTensorFactory if build_factories else type(None)
    for _, item in _flatten(state_dict):
        yield from _sharded_tensors(item, ShardedTensor, factory)


def _sharded_tensors(item, ShardedTensor, ShardedTensorFactory):
    if isinstance(item, ShardedTensor):
        yield item
    elif isinstance(item, ShardedTensorFactory):
        built = item.build()
        for _, sub in _flatten(built):
            yield from _sharded_tensors(sub, ShardedTensor, ShardedTensorFactory)
