"""HF MoE checkpoint -> Megatron-Core base checkpoint + model flags (tools/convert_hf_to_megatron.py).

The Megatron model is built at the requested parallel layout (one process per rank, launched
with torchrun like training), every tensor of its sharded_state_dict is filled from the HF
tensors it maps to (only this rank's slice is kept), and the model is saved with
`megatron_drlora.checkpoint.save_base_checkpoint` as a full-model checkpoint at iteration 0
(`SAVE/iter_0000000/` + tracker). dist_checkpointing checkpoints are layout independent, so a
base converted at EP2 loads at EP1 and vice versa. The vocabulary is padded with zero rows like
`pretrain_gpt.py` pads it (a multiple of lcm(--make-vocab-size-divisible-by, TP), the same size
for every TP dividing 128), so the base also moves between TP sizes.

Weights keep the HF checkpoint's dtype (bf16 safetensors give a bf16 base) unless `dtype`
(`--dtype fp32|bf16|fp16`) says otherwise: the model is built in that dtype and every HF tensor
is cast once, on its way into this rank's slice. Memory: this rank's share of the model in that
dtype (what the target layout holds) plus one Megatron tensor built from the HF tensors (one
expert's fc1, one layer's qkv, or the embedding) and the HF tensors it is made of; safetensors
are read one tensor (or one expert's rows of a fused tensor) at a time with plain file reads
(no memory map of the shards). `peak_rss_bytes` is logged at the end.

Next to the checkpoint go `model.args` (the model flags, plus `--tokenizer-type
HuggingFaceTokenizer --tokenizer-model HF_DIR` when the HF directory has a tokenizer;
`examples/pretrain_gpt.py @SAVE/model.args ...`) and `hf_source.json` (family, vocabulary,
dtype, source path, hub id), each written atomically before the checkpoint, whose tracker file
(written last by save_base_checkpoint) marks the conversion complete. An existing checkpoint in
SAVE is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import torch

from megatron_drlora.hf.checkpoint_io import HFCheckpoint
from megatron_drlora.hf.common import (HFInteropError, atomic_write_text,
                                       ensure_single_process_group)
from megatron_drlora.hf.families import HFNames, describe, detect_style, family_of
from megatron_drlora.hf import mapping

ARGS_FILE = "model.args"
SOURCE_FILE = "hf_source.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def source_dtype(hf: HFCheckpoint, names: HFNames) -> str:
    """The dtype of the HF checkpoint's floating-point weights ('fp32', 'bf16' or 'fp16'),
    from the safetensors headers (no tensor is read). Mixed checkpoints (e.g. bf16 matrices
    with fp32 norms) give the dtype holding the most parameters."""
    import math

    counts: Dict[str, int] = {}
    for name in names.all_names():
        if not hf.has(name):
            continue
        kind = SAFETENSORS_DTYPES.get(hf.dtype(name))
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + math.prod(hf.shape(name))
    if not counts:
        raise HFInteropError(f"{hf.flag} {hf.path}: no floating-point weights (fp32, bf16, "
                             f"fp16) to convert")
    return max(sorted(counts), key=lambda k: counts[k])


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tokenizer_flags(hf_path: str, vocab_size: int, log=print) -> List[str]:
    """`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR` when the HF directory has a
    tokenizer transformers can load (what Megatron-LM's HuggingFaceTokenizer does), else [].
    A tokenizer with more tokens than the model's embedding rows is refused."""
    if not any(os.path.isfile(os.path.join(hf_path, f)) for f in TOKENIZER_FILES):
        return []
    path = os.path.abspath(hf_path)
    if "#" in path:
        log(f"> warning: {path} contains '#', which starts a comment in an args file; "
            f"model.args names no tokenizer (add --tokenizer-type HuggingFaceTokenizer "
            f"--tokenizer-model DIR yourself)")
        return []
    try:
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(path))
    except Exception as e:  # noqa: BLE001 - any loader failure: no tokenizer flags, said so
        log(f"> warning: --hf-path {hf_path} has tokenizer files but transformers cannot load "
            f"them ({type(e).__name__}: {e}); model.args names no tokenizer")
        return []
    if size > vocab_size:
        raise HFInteropError(f"--hf-path {hf_path}: the tokenizer has {size} tokens, the model's "
                             f"embedding {vocab_size} rows (config.json vocab_size): token ids "
                             f"past {vocab_size - 1} would have no trained embedding")
    return ["--tokenizer-type HuggingFaceTokenizer", f"--tokenizer-model {shlex.quote(path)}"]


def hub_id_of(config_dict: Dict) -> Optional[str]:
    """The hub id in config.json's `_name_or_path` ('org/name'), or None when it is missing or
    a local path."""
    from megatron_drlora.hf.common import looks_like_hub_id

    name = config_dict.get("_name_or_path")
    return name if looks_like_hub_id(name) else None


def check_names(hf: HFCheckpoint, names: HFNames, log=print) -> None:
    """Every tensor the mapping needs is there, and nothing in the checkpoint is left out
    (except multi-token-prediction layers, which transformers does not run either)."""
    expected = names.all_names()
    have = set(hf.names())
    mtp = names.mtp_names(have)
    if mtp:
        log(f"> note: skipping {names.desc.mtp_layers} multi-token-prediction layer(s) "
            f"(num_nextn_predict_layers, {len(mtp)} tensors from model.layers."
            f"{names.desc.num_layers}.*): not part of the causal LM; not converted or exported")
        have -= mtp
    missing = [n for n in expected if n not in have]
    ignorable = ("rotary_emb.inv_freq",)
    extra = sorted(n for n in have - set(expected) if not n.endswith(ignorable))
    if names.desc.tie_word_embeddings:
        extra = [n for n in extra if n != names.lm_head]
    if missing:
        raise HFInteropError(f"{hf.flag} {hf.path}: {len(missing)} tensors the {names.desc.family} "
                             f"config implies are missing, e.g. {missing[:4]}")
    if extra:
        raise HFInteropError(f"{hf.flag} {hf.path}: {len(extra)} tensors would not be converted "
                             f"(an unsupported feature?), e.g. {extra[:4]}")


def _local_index(sh) -> tuple:
    """Slices of the global tensor (without stacked dims) that this ShardedTensor holds."""
    stacked = len(sh.global_shape) - len(sh.local_shape)
    offsets = sh.global_offset[stacked:]
    return stacked, tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape))


@torch.no_grad()
def fill_from_hf(state: Dict, hf: HFCheckpoint, names: HFNames, padded_vocab: int) -> int:
    """Copy this rank's slice of every tensor of a sharded state dict (see `writer_ready_state`;
    factories applied) from the HF checkpoint; returns the count."""
    from megatron_drlora.modeling import sharded_tensors

    experts = mapping.HFExpertReader(hf.get, hf.get_rows, names)
    cache: Dict = {}
    count = 0
    for sh in sharded_tensors(state, build_factories=False):
        if not torch.is_tensor(sh.data):
            continue
        stacked, index = _local_index(sh)
        key, layer, expert = mapping.locate(sh.key, sh.global_offset, stacked)
        ident = (key, layer, expert)
        if ident not in cache:
            cache.clear()  # one tensor at a time (fc1 halves share one entry)
            cache[ident] = mapping.megatron_tensor(key, layer, expert, hf.get,
                                                   experts, names, padded_vocab)
        full = cache[ident]
        want = tuple(sh.global_shape[stacked:])
        if tuple(full.shape) != want:
            raise HFInteropError(
                f"{hf.flag} {hf.path}: the HF tensors for Megatron's {sh.key} (layer "
                f"{layer}, expert {expert}) have shape {tuple(full.shape)}, the model "
                f"built from config.json expects {want}")
        sh.data.copy_(full[index].reshape(sh.data.shape).to(sh.data.dtype))
        count += 1
    return count


def convert(hf_path: str, save: str, tensor_model_parallel_size: int = 1,
            expert_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
            expert_tensor_parallel_size: Optional[int] = None,
            make_vocab_size_divisible_by: int = 128, dtype: Optional[str] = None,
            log=print) -> Dict:
    """Convert; `dtype` 'fp32' | 'bf16' | 'fp16' | None (the checkpoint's own). Returns
    {'save', 'args_file', 'flags', 'family', 'padded_vocab_size', 'dtype', 'source_dtype',
    'peak_rss_bytes', 'rss_before_build_bytes'}."""
    import torch.distributed as dist

    from megatron_drlora.checkpoint import save_base_checkpoint
    from megatron_drlora.modeling import (MoEModelArgs, build_gpt_moe, padded_vocab_size,
                                          transformer_config)

    hf = HFCheckpoint(hf_path, need_weights=False)
    family_of(hf.config_dict, hf_path)
    desc = describe(hf.hf_config(), hf_path)
    hf.require_weights()
    names = HFNames(desc, detect_style(hf.names(), desc))
    check_names(hf, names, log)
    if dtype is not None and dtype not in DTYPES:
        raise HFInteropError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    from megatron_drlora.checkpoint import TRACKER, iteration_dir

    if os.path.exists(iteration_dir(save, 0)) or os.path.exists(os.path.join(save, TRACKER)):
        raise HFInteropError(f"--save {save}: holds a checkpoint already; convert into a new "
                             f"directory")
    src_dtype = source_dtype(hf, names)
    out_dtype = dtype or src_dtype
    tok_flags = tokenizer_flags(hf_path, desc.vocab_size, log)
    tp, ep, pp = tensor_model_parallel_size, expert_model_parallel_size, \
        pipeline_model_parallel_size
    if desc.num_experts % ep:
        raise HFInteropError(f"--expert-model-parallel-size {ep} does not divide the "
                             f"{desc.num_experts} experts")
    if desc.num_layers % pp:
        raise HFInteropError(f"--pipeline-model-parallel-size {pp} does not divide the "
                             f"{desc.num_layers} layers")
    _init_parallel(tp, ep, pp, expert_tensor_parallel_size)
    padded = padded_vocab_size(desc.vocab_size, tp, make_vocab_size_divisible_by)
    args = MoEModelArgs(**desc.model_kwargs(padded), tensor_model_parallel_size=tp,
                        pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                        expert_tensor_parallel_size=expert_tensor_parallel_size)
    config = transformer_config(args)
    config.perform_initialization = False  # every tensor is overwritten from HF
    config.params_dtype = DTYPES[out_dtype]  # built in the output dtype: no fp32 copy
    rss_before = current_rss_bytes()
    chunks = build_gpt_moe(args, config)
    _cast_parameters(chunks, DTYPES[out_dtype])
    state = writer_ready_state(chunks)  # parameters are not touched yet: nothing is resident
    del chunks
    count = fill_from_hf(state, hf, names, padded)
    if dist.get_rank() == 0:
        log(f"> {desc.family}: {desc.num_layers} layers x {desc.num_experts} experts (top-"
            f"{desc.topk}), {names.style} HF tensors; TP {tp} EP {ep} PP {pp}; vocabulary "
            f"{desc.vocab_size} padded to {padded}; {src_dtype} checkpoint -> {out_dtype} base")
    log(f"> rank {dist.get_rank()}: filled {count} tensor shards from {hf_path}")
    flags = desc.flags()
    if make_vocab_size_divisible_by != 128:
        flags.append(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}")
    flags += tok_flags
    args_file = os.path.join(save, ARGS_FILE)
    if dist.get_rank() == 0:  # before the checkpoint: its tracker, written last, commits all
        os.makedirs(save, exist_ok=True)
        _write_args_file(args_file, flags, hf_path, desc, tp, ep, pp, padded, out_dtype)
        source = {"hf_path": os.path.abspath(hf_path), "hub_id": hub_id_of(hf.config_dict),
                  "family": desc.family, "architectures": hf.config_dict.get("architectures"),
                  "vocab_size": desc.vocab_size, "padded_vocab_size": padded,
                  "dtype": out_dtype, "source_dtype": src_dtype,
                  "layout": {"tp": tp, "ep": ep, "pp": pp}, "hf_style": names.style,
                  "flags": flags}
        atomic_write_text(os.path.join(save, SOURCE_FILE), json.dumps(source, indent=2) + "\n")
        log("> model flags (saved to " + args_file + "):\n  " + "\n  ".join(flags))
    save_base_checkpoint(save, [_PreparedState(state)])
    del state
    peak = peak_rss_bytes()
    log(f"> rank {dist.get_rank()}: resident memory {rss_before / 2 ** 20:.1f} MiB before the "
        f"model was built, peak {peak / 2 ** 20:.1f} MiB (+{(peak - rss_before) / 2 ** 20:.1f} "
        f"MiB for the conversion)")
    if dist.is_initialized():
        dist.barrier()
    return {"save": save, "args_file": args_file, "flags": flags, "family": desc.family,
            "padded_vocab_size": padded, "dtype": out_dtype, "source_dtype": src_dtype,
            "peak_rss_bytes": peak, "rss_before_build_bytes": rss_before}


class _PreparedState:
    """A stand-in model chunk for save_base_checkpoint whose sharded state dict is prepared."""

    def __init__(self, state: Dict):
        self._state = state

    def sharded_state_dict(self) -> Dict:
        return self._state


@torch.no_grad()
def writer_ready_state(chunks) -> Dict:
    """The chunks' sharded state dict (factories applied) with no tensor a view of a larger
    storage, to be filled and saved.

    Megatron's torch_dist writer clones every tensor that views part of a storage before it
    writes anything; with SwiGLU every expert's fc1 is saved as two halves (gate, up), so the
    save would copy 2/3 of all expert weights at once. Here each such view gets its own
    (uninitialised, not yet resident) tensor and the parameter's storage is released, before
    anything is filled: every weight is held once. The chunks are unusable afterwards (those
    parameters are emptied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_drlora.checkpoint import model_sharded_state_dict

    state = model_sharded_state_dict(chunks)
    apply_factories(state)
    params: Dict[int, list] = {}
    for chunk in chunks:
        for p in chunk.parameters():
            params.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    groups: Dict[int, list] = {}
    views = set()
    for item in nested_values(state):
        if isinstance(item, ShardedTensor) and torch.is_tensor(item.data):
            ptr = item.data.untyped_storage().data_ptr()
            groups.setdefault(ptr, []).append(item)
            if item.data.untyped_storage().nbytes() != item.data.numel() * item.data.itemsize:
                views.add(ptr)
    for ptr in views:
        for item in groups[ptr]:
            item.data = torch.empty(item.data.shape, dtype=item.data.dtype,
                                    device=item.data.device)
        for p in params.get(ptr, []):
            p.data = p.data.new_empty(0)
    return state


def _cast_parameters(chunks, dtype: torch.dtype) -> None:
    """Parameters Megatron creates in fp32 whatever params_dtype says (e.g. torch norms on
    CPU) into the output dtype, one at a time."""
    for chunk in chunks:
        for p in chunk.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def _write_args_file(path, flags, hf_path, desc, tp, ep, pp, padded, dtype) -> None:
    lines = [f"# Model flags of {desc.family} converted from {os.path.abspath(hf_path)}",
             f"# by tools/convert_hf_to_megatron.py (written from TP {tp} EP {ep} PP {pp}).",
             f"# Use: examples/pretrain_gpt.py @{path} --pretrained-checkpoint "
             f"{os.path.dirname(os.path.abspath(path))} <training flags>",
             f"# Weights are stored in {dtype} (training casts them to its own precision).",
             f"# The vocabulary ({desc.vocab_size}) is padded with zero rows to {padded}; "
             f"Megatron-LM pads the tokenizer's size to --make-vocab-size-divisible-by x TP and "
             f"the base loader moves the rows."]
    atomic_write_text(path, "\n".join(lines + flags) + "\n")


def _init_parallel(tp: int, ep: int, pp: int, etp: Optional[int]) -> None:
    from megatron.core import parallel_state as ps

    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    import torch.distributed as dist

    from megatron_drlora.parallel_setup import init_distributed

    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed()  # torchrun / SLURM
        else:
            ensure_single_process_group()

    world = dist.get_world_size()
    if world % (tp * pp) or world % (ep * (etp or tp) * pp):
        raise HFInteropError(
            f"{world} processes do not fit --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} (x --expert-model-parallel-size {ep} for the "
            f"experts); launch with torchrun --nproc_per_node N, N a multiple of both")
    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp
                and ps.get_expert_model_parallel_world_size() == ep)
        if same:
            return
    initialize_megatron_parallel(ParallelSizes(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a local Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, "
                    "OLMoE, Phi-MoE, GLM-4.5, DeepSeek-V2/V3 incl. Moonlight; safetensors + "
                    "config.json) into a Megatron-Core base "
                    "checkpoint for examples/pretrain_gpt.py --pretrained-checkpoint, plus its "
                    "model flags "
                    "(SAVE/model.args). Run with torchrun for a multi-process layout.")
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json, "
                                                    "*.safetensors).")
    p.add_argument("--save", required=True, help="Output save root (iter_0000000/ + tracker).")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Vocabulary padding, as in examples/pretrain_gpt.py.")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="Weight dtype of the Megatron base (default: the HF checkpoint's own, "
                        "e.g. bf16 safetensors give a bf16 base).")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("tensor_model_parallel_size", "expert_model_parallel_size",
                 "pipeline_model_parallel_size"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        convert(args.hf_path, args.save, args.tensor_model_parallel_size,
                args.expert_model_parallel_size, args.pipeline_model_parallel_size,
                args.expert_tensor_parallel_size, args.make_vocab_size_divisible_by,
                args.dtype)
    except HFInteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_drlora.parallel_setup import shutdown

        import torch.distributed as dist

        if dist.is_initialized():
            shutdown()
    return 0
