"""tools/export_to_hf.py: a DR-LoRA checkpoint (saved at any parallel layout) -> HF.

Runs as one CPU process without GPUs or torchrun (a world-size-1 gloo group is created for
dist_checkpointing). Before anything is written, the adapter checkpoint, the Megatron base and
the HF model are checked against each other (layers, experts, hidden and expert sizes), so a
wrong --hf-path or --pretrained-checkpoint is an error naming both, not a broken export.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

from megatron_drlora.hf.checkpoint_io import HFCheckpoint, parse_size
from megatron_drlora.hf.common import HFInteropError
from megatron_drlora.hf.families import HFNames, describe, detect_style, family_of


def export(load: str, hf_path: str, fmt: str, save: str,
           pretrained_checkpoint: Optional[str] = None, peft_layout: str = "fused",
           iteration: Optional[int] = None, dtype: str = "auto",
           max_shard_size: Optional[str] = None, log=print) -> Dict:
    from megatron_drlora.hf.export_merged import export_merged
    from megatron_drlora.hf.export_peft import export_peft
    from megatron_drlora.hf.megatron_reader import (AdapterCheckpoint, DistCheckpoint,
                                                    check_base_against)

    if fmt not in ("merged", "peft"):
        raise HFInteropError(f"--format {fmt!r}: choose merged or peft")
    if os.path.isdir(save) and os.listdir(save):
        raise HFInteropError(f"--save {save}: directory exists and is not empty")
    hf = HFCheckpoint(hf_path, need_weights=False)
    family_of(hf.config_dict, hf_path)
    desc = describe(hf.hf_config(), hf_path)
    if fmt == "merged" and pretrained_checkpoint is None:
        hf.require_weights()  # the base weights come from the HF model then
    adapters = AdapterCheckpoint(load, "--load", iteration)
    adapters.check_against(desc)
    base = None
    if pretrained_checkpoint is not None:
        base = DistCheckpoint(pretrained_checkpoint, "--pretrained-checkpoint")
        check_base_against(base, desc)
    log(f"> {desc.family}: adapters of {len(adapters.layers)} layers x {adapters.num_experts} "
        f"experts ({', '.join(adapters.projections)}), iteration "
        f"{adapters.common.get('iteration')}, ranks {int(adapters.rank_map.min())}.."
        f"{int(adapters.rank_map.max())} (r_max {adapters.r_max}, scale {adapters.scale:g})")
    if fmt == "merged":
        style = detect_style(hf.names(), desc) if hf.weight_map else "per_expert"
        return export_merged(adapters, hf, desc, HFNames(desc, style), save, base=base,
                             dtype=dtype, max_shard_bytes=parse_size(max_shard_size), log=log)
    return export_peft(adapters, hf_path, desc, save, layout=peft_layout, log=log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Export a DR-LoRA checkpoint to Hugging Face: a merged full model "
                    "(--format merged) or a PEFT LoRA adapter with per-expert ranks "
                    "(--format peft). CPU only; no torchrun needed.")
    p.add_argument("--load", required=True,
                   help="DR-LoRA checkpoint: a save root (latest iteration) or an iter_* dir.")
    p.add_argument("--iteration", type=int, default=None, help="Iteration under --load.")
    p.add_argument("--pretrained-checkpoint", default=None,
                   help="The Megatron base the adapters were trained on (merged: the weights "
                        "merged into; default: the HF model's own weights). Checked against "
                        "--hf-path.")
    p.add_argument("--hf-path", required=True,
                   help="HF model directory of the base (config.json, tokenizer, weights).")
    p.add_argument("--format", required=True, choices=["merged", "peft"])
    p.add_argument("--peft-layout", default="fused", choices=["fused", "per-expert"],
                   help="fused: transformers 5 (target_parameters); per-expert: transformers 4 "
                        "per-expert modules.")
    p.add_argument("--save", required=True, help="Output directory (new or empty).")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="merged: weight dtype (auto: the HF config's). Merging is in fp32.")
    p.add_argument("--max-shard-size", default="2GB", help="merged: safetensors shard size.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: tools/export_to_hf.py runs as one process (reads checkpoints saved at any "
              "layout); start it with python, not torchrun", file=sys.stderr)
        return 2
    try:
        export(args.load, args.hf_path, args.format, args.save, args.pretrained_checkpoint,
               args.peft_layout, args.iteration, args.dtype, args.max_shard_size)
    except HFInteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
