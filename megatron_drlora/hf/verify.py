"""Logits of an HF model (plain, merged or with a PEFT adapter) next to the Megatron model they
came from: `tools/export_to_hf.py --verify` and the check behind every conversion and export
test.

The Megatron side is built from the flags a run would use: the converter's `model.args` goes
through Megatron-LM's parser (plus DR-LoRA's flags), the base is loaded with
`load_base_checkpoint`, DR-LoRA adapters (config, rank map and, when trained, the router) come
from the adapter checkpoint through `load_adapters`. Compare in fp32.

`verify_export` is `--verify`: a few seeded random sequences through the Megatron model with the
adapters (built in fp32, then freed) and through the export loaded with transformers (+ peft) in
fp32. The error of a position is max |diff| over the vocabulary / max |Megatron logit|. PEFT and
fp32 merged exports must agree at every position (max rel diff <= 1e-3). A merged export stored
in bf16 / fp16 rounds every merged weight, and the rounding can flip an expert choice at a few
positions (measured on tiny random models: max rel diff 1e-2 to 0.2, median 1e-3 in bf16; a
corrupted expert: median 0.2), so there the median over positions is held to the tolerance.
Failing, or a non-finite logit, raises `HFInteropError` with the max abs and rel differences.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch

from megatron_drlora.hf.common import HFInteropError

# Accepted error (see the module docstring): the max over positions for PEFT adapters (fp32
# factors on the HF base upcast to fp32) and fp32 merged exports, which only differ by summation
# order; the median over positions for merged weights rounded to bf16 (8 mantissa bits) / fp16.
TOLERANCES = {"peft": 1e-3, "float32": 1e-3, "bfloat16": 1e-2, "float16": 2e-3}
CRITERIA = {"peft": "max", "float32": "max", "bfloat16": "median", "float16": "median"}
VERIFY_SEQUENCES = 4
VERIFY_SEQ_LENGTH = 32


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
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    logits = chunks[0](tokens, position_ids, None)
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float().cpu()


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


def base_args_file(base: str) -> str:
    """The converter's model.args of a base (a save root or one of its iter_* directories)."""
    from megatron_drlora.hf.importer import ARGS_FILE

    root = os.path.abspath(base)
    for candidate in (root, os.path.dirname(root)):
        path = os.path.join(candidate, ARGS_FILE)
        if os.path.isfile(path):
            return path
    raise HFInteropError(f"--pretrained-checkpoint {base}: no {ARGS_FILE} (the model flags "
                         f"tools/convert_hf_to_megatron.py writes next to the base); --verify "
                         f"builds the Megatron model from it")


def verify_tokens(vocab_size: int, max_positions: int, sequences: int = VERIFY_SEQUENCES,
                  seq_length: int = VERIFY_SEQ_LENGTH, seed: int = 1234) -> torch.Tensor:
    length = max(1, min(seq_length, max_positions))
    return torch.randint(0, vocab_size, (sequences, length),
                         generator=torch.Generator().manual_seed(seed))


def verify_export(save: str, fmt: str, load: str, base: str, hf_path: str, desc,
                  dtype: Optional[str] = None, tolerance: Optional[float] = None,
                  log=print) -> Dict:
    """Compare the export in `save` with the Megatron model (base `base` + adapters `load`);
    returns {'max_abs_diff', 'max_rel_diff', 'tolerance', 'sequences', 'seq_length'} or raises
    HFInteropError (see the module docstring). `dtype`: the merged export's weight dtype."""
    import gc

    from megatron_drlora.hf.importer import _init_parallel

    args_file = base_args_file(base)
    kind = "peft" if fmt == "peft" else (dtype or "float32")
    criterion = CRITERIA[kind]
    if tolerance is None:
        tolerance = TOLERANCES[kind]
    tokens = verify_tokens(desc.vocab_size, desc.max_position_embeddings)
    _init_parallel(1, 1, 1, None)
    margs = model_args_from_file(args_file, tokens.shape[1])
    chunks, _ = build_megatron(margs, base, load)
    reference = megatron_logits(chunks, tokens, desc.vocab_size)
    del chunks
    gc.collect()  # one model in memory at a time
    if fmt == "merged":
        got = hf_logits(save, tokens)
    else:
        got = hf_logits(hf_path, tokens, adapter=save)
    if got.shape != reference.shape:
        raise HFInteropError(f"--verify failed: the export gives logits of shape "
                             f"{tuple(got.shape)}, the Megatron model {tuple(reference.shape)}")
    diff = (got - reference).abs()
    scale = float(reference.abs().max())
    max_abs = float(diff.max())
    per_position = diff.amax(-1).flatten() / scale if scale > 0 else diff.amax(-1).flatten()
    rel = float(per_position.max()) if scale > 0 else float("inf")
    median = float(per_position.median()) if scale > 0 else float("inf")
    result = {"max_abs_diff": max_abs, "max_rel_diff": rel, "median_rel_diff": median,
              "criterion": criterion, "tolerance": float(tolerance),
              "sequences": int(tokens.shape[0]), "seq_length": int(tokens.shape[1])}
    summary = (f"{fmt} export {save} ({kind}) vs the Megatron model with the adapters on "
               f"{tokens.shape[0]} sequences x {tokens.shape[1]} tokens: max abs diff "
               f"{max_abs:.3g}, max rel diff {rel:.3g}, median rel diff {median:.3g} (rel: "
               f"/ max |logit| {scale:.3g}; the {criterion} must be <= {tolerance:.3g})")
    checked = rel if criterion == "max" else median
    if not torch.isfinite(got).all() or not checked <= tolerance:
        seq, rest = divmod(int(diff.flatten().argmax()), diff.shape[1] * diff.shape[2])
        pos, vocab = divmod(rest, diff.shape[2])
        raise HFInteropError(f"--verify FAILED: {summary}; worst at sequence {seq}, position "
                             f"{pos}, token id {vocab}; the export does not reproduce the "
                             f"trained model")
    log(f"> verified: {summary}")
    return result
