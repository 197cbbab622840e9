"""HF MoE checkpoint -> Megatron-Core base checkpoint + model flags (tools/convert_hf_to_megatron.py).

The Megatron model is built at the requested parallel layout (one process per rank, launched
with torchrun like training), every tensor of its sharded_state_dict is filled from the HF
tensors it maps to (only this rank's slice is kept), and the model is saved with
`megatron_drlora.checkpoint.save_base_checkpoint` as a full-model checkpoint at iteration 0
(`SAVE/iter_0000000/` + tracker). dist_checkpointing checkpoints are layout independent, so a
base converted at EP2 loads at EP1 and vice versa. The vocabulary is padded with zero rows like
`pretrain_gpt.py` pads it (a multiple of lcm(--make-vocab-size-divisible-by, TP), the same size
for every TP dividing 128), so the base also moves between TP sizes.

Next to the checkpoint go `model.args` (the model flags; `examples/pretrain_gpt.py
@SAVE/model.args ...`) and `hf_source.json` (family, vocabulary, source path) that the
exporter checks against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch

from megatron_drlora.hf.checkpoint_io import HFCheckpoint
from megatron_drlora.hf.common import HFInteropError, ensure_single_process_group
from megatron_drlora.hf.families import HFNames, describe, detect_style, family_of
from megatron_drlora.hf import mapping

ARGS_FILE = "model.args"
SOURCE_FILE = "hf_source.json"


def check_names(hf: HFCheckpoint, names: HFNames) -> None:
    """Every tensor the mapping needs is there, and nothing in the checkpoint is left out."""
    expected = names.all_names()
    have = set(hf.names())
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
def fill_from_hf(chunks, hf: HFCheckpoint, names: HFNames, padded_vocab: int) -> int:
    """Copy this rank's slice of every Megatron tensor from the HF checkpoint; returns the count."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_drlora.modeling import _flatten, _sharded_tensors

    experts = mapping.HFExpertReader(hf.get, hf.get_rows, names)
    cache: Dict = {}
    count = 0
    for chunk in chunks:
        for _, item in _flatten(chunk.sharded_state_dict()):
            for sh in _sharded_tensors(item, ShardedTensor, ShardedTensorFactory):
                if not torch.is_tensor(sh.data):
                    continue
                stacked, index = _local_index(sh)
                layer = sh.global_offset[0] if mapping.is_layer_key(sh.key) and stacked else None
                expert = sh.global_offset[1] if mapping.is_expert_key(sh.key) else None
                ident = (sh.key, layer, expert)
                if ident not in cache:
                    cache.clear()  # one tensor at a time (fc1 halves share one entry)
                    cache[ident] = mapping.megatron_tensor(sh.key, layer, expert, hf.get,
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
            make_vocab_size_divisible_by: int = 128, log=print) -> Dict:
    """Convert; returns {'save', 'args_file', 'flags', 'family', 'padded_vocab_size'}."""
    import torch.distributed as dist

    from megatron_drlora.checkpoint import save_base_checkpoint
    from megatron_drlora.modeling import (MoEModelArgs, build_gpt_moe, padded_vocab_size,
                                          transformer_config)

    hf = HFCheckpoint(hf_path, need_weights=False)
    family_of(hf.config_dict, hf_path)
    desc = describe(hf.hf_config(), hf_path)
    hf.require_weights()
    names = HFNames(desc, detect_style(hf.names(), desc))
    check_names(hf, names)
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
    chunks = build_gpt_moe(args, config)
    count = fill_from_hf(chunks, hf, names, padded)
    if dist.get_rank() == 0:
        log(f"> {desc.family}: {desc.num_layers} layers x {desc.num_experts} experts (top-"
            f"{desc.topk}), {names.style} HF tensors; TP {tp} EP {ep} PP {pp}; vocabulary "
            f"{desc.vocab_size} padded to {padded}")
    log(f"> rank {dist.get_rank()}: filled {count} tensor shards from {hf_path}")
    save_base_checkpoint(save, chunks)
    flags = desc.flags()
    if make_vocab_size_divisible_by != 128:
        flags.append(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}")
    args_file = os.path.join(save, ARGS_FILE)
    if dist.get_rank() == 0:
        _write_args_file(args_file, flags, hf_path, desc, tp, ep, pp, padded)
        with open(os.path.join(save, SOURCE_FILE), "w") as fh:
            json.dump({"hf_path": os.path.abspath(hf_path), "family": desc.family,
                       "architectures": hf.config_dict.get("architectures"),
                       "vocab_size": desc.vocab_size, "padded_vocab_size": padded,
                       "layout": {"tp": tp, "ep": ep, "pp": pp}, "hf_style": names.style,
                       "flags": flags}, fh, indent=2)
        log("> model flags (saved to " + args_file + "):\n  " + "\n  ".join(flags))
    if dist.is_initialized():
        dist.barrier()
    return {"save": save, "args_file": args_file, "flags": flags, "family": desc.family,
            "padded_vocab_size": padded}


def _write_args_file(path, flags, hf_path, desc, tp, ep, pp, padded) -> None:
    lines = [f"# Model flags of {desc.family} converted from {os.path.abspath(hf_path)}",
             f"# by tools/convert_hf_to_megatron.py (written from TP {tp} EP {ep} PP {pp}).",
             f"# Use: examples/pretrain_gpt.py @{path} --pretrained-checkpoint "
             f"{os.path.dirname(os.path.abspath(path))} <training flags>",
             f"# The vocabulary ({desc.vocab_size}) is padded with zero rows to {padded}."]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines + flags) + "\n")
    os.replace(tmp, path)


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
                    "OLMoE; safetensors + config.json) into a Megatron-Core base checkpoint for "
                    "examples/pretrain_gpt.py --pretrained-checkpoint, plus its model flags "
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
                args.expert_tensor_parallel_size, args.make_vocab_size_divisible_by)
    except HFInteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_drlora.parallel_setup import shutdown

        import torch.distributed as dist

        if dist.is_initialized():
            shutdown()
    return 0
