"""Logits of an HF model (plain, merged or with a PEFT adapter) next to the Megatron model they
came from: the check behind every conversion and export test.

The Megatron side is built from the flags a run would use: the converter's `model.args` goes
through Megatron-LM's parser (plus DR-LoRA's flags), the base is loaded with
`load_base_checkpoint`, DR-LoRA adapters (config, rank map and, when trained, the router) come
from the adapter checkpoint through `load_adapters`. Compare in fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def model_args_from_file(args_file: str, seq_length: int, tensor_model_parallel_size: int = 1,
                         expert_model_parallel_size: int = 1, extra: Sequence[str] = ()):
    """MoEModelArgs from a converter args file, parsed by Megatron-LM's parser."""
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs, padded_vocab_size

    args = parse_megatron_args([f"@{args_file}", "--seq-length", str(seq_length),
                                "--tensor-model-parallel-size", str(tensor_model_parallel_size),
                                "--expert-model-parallel-size", str(expert_model_parallel_size)]
                               + list(extra))
    if tensor_model_parallel_size > 1:
        args.sequence_parallel = True  # Megatron-Core's MoE layer needs it with TP > 1
    return MoEModelArgs.from_megatron_args(
        args, padded_vocab_size(args.vocab_size, tensor_model_parallel_size,
                                args.make_vocab_size_divisible_by))


def build_megatron(model_args, base: str, adapters: Optional[str] = None):
    """Chunks with the base loaded and, if given, the DR-LoRA adapters of `adapters` (a save
    root or iter_* directory) with their rank map; returns (chunks, handle)."""
    from megatron.core import dist_checkpointing

    from megatron_drlora.checkpoint import drlora_state, load_adapters, load_base_checkpoint
    from megatron_drlora.config import DRLoRAConfig
    from megatron_drlora.hf.common import resolve_iteration_dir
    from megatron_drlora.inject import apply_drlora
    from megatron_drlora.modeling import build_gpt_moe, transformer_config

    config = transformer_config(model_args)
    config.perform_initialization = False
    chunks = build_gpt_moe(model_args, config)
    load_base_checkpoint(base, chunks)
    handle = None
    if adapters is not None:
        path = resolve_iteration_dir(adapters, "--load")
        state = drlora_state(dist_checkpointing.load_common_state_dict(path))
        handle = apply_drlora(chunks, DRLoRAConfig.from_dict(state["config"]), log=lambda s: None)
        load_adapters(path, chunks, handle)
    for chunk in chunks:
        chunk.eval()
    return chunks, handle


@torch.no_grad()
def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, seq, vocab_size] logits of a single-stage model (vocab gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if len(chunks) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("megatron_logits needs a single pipeline stage")
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = chunks[0](tokens, position_ids, None)
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(model_or_path, tokens: torch.Tensor, adapter: Optional[str] = None
              ) -> torch.Tensor:
    """Logits of an HF model directory (optionally with a PEFT adapter directory) in fp32."""
    from transformers import AutoModelForCausalLM

    model = model_or_path
    if isinstance(model_or_path, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model(input_ids=tokens).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())
