"""tools/export_to_hf.py: a DR-LoRA checkpoint (saved at any parallel layout) -> HF.

Runs as one CPU process without GPUs or torchrun (a world-size-1 gloo group is created for
dist_checkpointing). Before anything is written, the adapter checkpoint, the Megatron base and
the HF model are checked against each other (layers, experts, hidden and expert sizes), so a
wrong --hf-path or --pretrained-checkpoint is an error naming both, not a broken export.

Crash safety: everything is written into a hidden sibling of --save (`.NAME.tmp-PID`), every
file fsynced, and the directory renamed to --save at the end (`common.StagedDirectory`): --save
holds a complete export or nothing. With --verify the staged export is compared with the
Megatron model first (`verify.verify_export`); a failed check leaves it at `SAVE.unverified`
and exits non-zero.

`base_model_name_or_path` (PEFT) and the card's `base_model` are the base's hub id: --hf-model-id,
else config.json's `_name_or_path` when it is a hub id; never a local path (omitted with a
warning). Both formats get their own README.md model card (`model_card`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

from megatron_drlora.hf.checkpoint_io import HFCheckpoint, parse_size
from megatron_drlora.hf.common import HFInteropError, StagedDirectory, looks_like_hub_id
from megatron_drlora.hf.families import HFNames, describe, detect_style, family_of


def resolve_hub_id(config_dict: Dict, hf_model_id: Optional[str], log=print) -> Optional[str]:
    """The base model's hub id: `hf_model_id` (--hf-model-id) if given, else config.json's
    `_name_or_path` when it is a hub id ('org/name'); None (with a warning) when neither is,
    so no machine-local path ever lands in an export."""
    if hf_model_id is not None:
        if not looks_like_hub_id(hf_model_id):
            raise HFInteropError(f"--hf-model-id {hf_model_id!r}: not a Hugging Face hub id "
                                 f"('org/name'; a local path is never written into an export)")
        return hf_model_id
    name = config_dict.get("_name_or_path")
    if looks_like_hub_id(name):
        return name
    log(f"> warning: the base's hub id is unknown (config.json _name_or_path is "
        f"{'a local path' if name else 'missing'}): base_model_name_or_path / base_model are "
        f"left out of the export; pass --hf-model-id ORG/NAME to record it")
    return None


def export(load: str, hf_path: str, fmt: str, save: str,
           pretrained_checkpoint: Optional[str] = None, peft_layout: str = "fused",
           iteration: Optional[int] = None, dtype: str = "auto",
           max_shard_size: Optional[str] = None, hf_model_id: Optional[str] = None,
           verify: bool = False, verify_tolerance: Optional[float] = None, log=print) -> Dict:
    """Export (see the module docstring); returns the format's summary plus 'save', 'hub_id'
    and, with `verify`, 'verified' (the differences)."""
    from megatron_drlora.hf.export_merged import export_merged
    from megatron_drlora.hf.export_peft import export_peft
    from megatron_drlora.hf.megatron_reader import (AdapterCheckpoint, DistCheckpoint,
                                                    check_base_against)
    from megatron_drlora.hf.model_card import CARD_FILE, model_card

    if fmt not in ("merged", "peft"):
        raise HFInteropError(f"--format {fmt!r}: choose merged or peft")
    if os.path.isdir(save) and os.listdir(save):
        raise HFInteropError(f"--save {save}: directory exists and is not empty")
    if verify_tolerance is not None and not verify_tolerance > 0:
        raise HFInteropError(f"--verify-tolerance {verify_tolerance}: must be positive")
    hf = HFCheckpoint(hf_path, need_weights=False)
    family_of(hf.config_dict, hf_path)
    desc = describe(hf.hf_config(), hf_path)
    if fmt == "merged" and pretrained_checkpoint is None:
        hf.require_weights()  # the base weights come from the HF model then
    if verify:
        from megatron_drlora.hf.verify import base_args_file

        if pretrained_checkpoint is None:
            raise HFInteropError("--verify needs --pretrained-checkpoint (the Megatron base the "
                                 "adapters were trained on, with its model.args)")
        base_args_file(pretrained_checkpoint)
        if fmt == "peft":
            hf.require_weights()  # the adapter is checked on the HF base
            if peft_layout == "per-expert":
                import transformers

                if int(transformers.__version__.split(".")[0]) >= 5:
                    raise HFInteropError(
                        f"--verify --peft-layout per-expert: the per-expert layout loads on "
                        f"transformers 4 only (this is {transformers.__version__}, which fuses "
                        f"experts); verify the fused layout, or export and check it where "
                        f"transformers 4 is installed")
    hub_id = resolve_hub_id(hf.config_dict, hf_model_id, log)
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
    max_shard_bytes = parse_size(max_shard_size)
    with StagedDirectory(save) as stage:
        final, outer_log = os.path.abspath(save), log

        def log(message):  # noqa: F811 - messages name --save, not the staging directory
            outer_log(str(message).replace(stage.path, final))

        if fmt == "merged":
            style = detect_style(hf.names(), desc) if hf.weight_map else "per_expert"
            result = export_merged(adapters, hf, desc, HFNames(desc, style), stage.path,
                                   base=base, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                   log=log)
        else:
            result = export_peft(adapters, hf_path, desc, stage.path, layout=peft_layout,
                                 hub_id=hub_id, log=log)
        verified = None
        if verify:
            from megatron_drlora.hf.verify import verify_export

            try:
                verified = verify_export(stage.path, fmt, load, pretrained_checkpoint, hf_path,
                                         desc, dtype=result.get("dtype"),
                                         tolerance=verify_tolerance, log=log)
            except HFInteropError as e:
                kept = _keep_unverified(stage, save)
                raise HFInteropError(f"{e}\n  nothing was written to --save {save}"
                                     + (f"; the unverified export is in {kept}" if kept else "")
                                     ) from None
        card = model_card(adapters, desc, fmt, hub_id, dtype=result.get("dtype"),
                          layout=peft_layout if fmt == "peft" else None, verified=verified)
        with open(os.path.join(stage.path, CARD_FILE), "w") as fh:
            fh.write(card)
        stage.commit()
    log(f"> wrote {save}" + (" (verified)" if verified else ""))
    return dict(result, save=save, hub_id=hub_id, verified=verified)


def _keep_unverified(stage: StagedDirectory, save: str) -> Optional[str]:
    """Move a staged export that failed --verify to SAVE.unverified (if that name is free)."""
    target = os.path.abspath(save) + ".unverified"
    if os.path.exists(target):
        return None
    os.rename(stage.path, target)
    return target


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
    p.add_argument("--hf-model-id", default=None,
                   help="Hub id of the base (org/name) for PEFT's base_model_name_or_path and "
                        "the model card (default: config.json's _name_or_path when it is a hub "
                        "id; a local path is never written).")
    p.add_argument("--verify", action="store_true",
                   help="Before publishing --save, compare the export's logits (transformers, "
                        "+ peft) with the Megatron model with the adapters on a few sequences; "
                        "exit non-zero with the max abs/rel differences if they disagree. Needs "
                        "--pretrained-checkpoint (with its model.args); builds both models in "
                        "fp32, one after the other.")
    p.add_argument("--verify-tolerance", type=float, default=None,
                   help="Largest accepted error, max |diff| / max |logit| per position: its max "
                        "over positions for PEFT and fp32 merged weights (default 1e-3), its "
                        "median for bf16 (1e-2) and fp16 (2e-3) merged weights.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: tools/export_to_hf.py runs as one process (reads checkpoints saved at any "
              "layout); start it with python, not torchrun", file=sys.stderr)
        return 2
    import torch.distributed as dist

    owns_group = not dist.is_initialized()  # in-process callers keep theirs
    try:
        export(args.load, args.hf_path, args.format, args.save, args.pretrained_checkpoint,
               args.peft_layout, args.iteration, args.dtype, args.max_shard_size,
               args.hf_model_id, args.verify, args.verify_tolerance)
    except HFInteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_group and dist.is_initialized():
            from megatron_drlora.parallel_setup import shutdown

            shutdown()
    return 0
