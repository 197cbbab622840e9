"""The model provider Megatron-LM's `pretrain` calls, once per model chunk.

It builds a Megatron-Core GPTModel from Megatron's own args (the shape of Megatron-LM's
`pretrain_gpt.py` provider), optionally initialises it layout-independently
(`--init-from-identity`), and with DR-LoRA active loads the frozen base from
`--pretrained-checkpoint` and hands the chunk to the run (`run.DRLoRARun.adapt`), which applies
DR-LoRA once every chunk of this rank exists.
"""

from __future__ import annotations

import warnings

import torch

from megatron_drlora.compat import cpu
from megatron_drlora.compat.megatron import have_transformer_engine


def _use_transformer_engine(args) -> bool:
    if args.transformer_impl != "transformer_engine":
        return False
    if have_transformer_engine():
        return True
    if cpu.cuda_missing():  # the CPU box: the local spec is the only one that runs
        return False
    raise RuntimeError("--transformer-impl transformer_engine (Megatron's default) needs "
                       "Transformer Engine, which is not importable here; install it or pass "
                       "--transformer-impl local")


def layer_spec(args, config, vp_stage):
    """Megatron-Core's GPT decoder block spec for these args (TE or local), with OLMoE's
    projection-wide q/k norm when `--qk-layernorm-scope projection`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed" on every call without apex
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=_use_transformer_engine(
            args), normalization=args.normalization, vp_stage=vp_stage)
    if args.qk_layernorm and args.qk_layernorm_scope == "projection":
        from megatron_drlora.projection_qk_norm import use_projection_qk_norm

        spec = use_projection_qk_norm(spec)
    from megatron_drlora.model_features import adjust_spec

    return adjust_spec(spec, args)  # --moe-router-type, --add-attention-output-bias


def build_gpt_model(args, pre_process: bool, post_process: bool, vp_stage=None,
                    pg_collection=None):
    """A GPTModel chunk from Megatron-LM's args."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    cpu.adjust_model_config(config)
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(args, config, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
    )
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    from megatron_drlora.model_features import adjust_model

    model = GPTModel(**kwargs)
    adjust_model(model, args)  # --add-output-layer-bias
    return model


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None,
                   config=None, pg_collection=None):
    """Megatron-LM's model provider with DR-LoRA (see the module docstring)."""
    from megatron.training import get_args

    from megatron_drlora.megatron_lm.run import current_run

    args = get_args()
    if args.num_experts and args.moe_grouped_gemm and not _use_transformer_engine(args):
        raise RuntimeError("--moe-grouped-gemm needs Transformer Engine here; drop the flag "
                           "to use SequentialMLP experts")
    model = build_gpt_model(args, pre_process, post_process, vp_stage, pg_collection)
    if args.init_from_identity:
        from megatron_drlora.modeling import init_from_global_identity

        init_from_global_identity([model], seed=args.seed, std=args.init_method_std)
    run = current_run()
    if run is not None:
        run.adapt(model, args)
    elif torch.distributed.get_rank() == 0 and args.pretrained_checkpoint:
        print(f"> no --drlora-* flag: the whole model trains (Megatron-LM semantics of "
              f"--pretrained-checkpoint {args.pretrained_checkpoint})", flush=True)
    return model
