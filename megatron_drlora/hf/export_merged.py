"""DR-LoRA checkpoint -> full HF checkpoint with the adapters merged (`--format merged`).

Every expert weight becomes W + s * B[:, :r] A[:r] with the expert's own active rank r and the
constant DR-LoRA scale s, computed in fp32: the up adapter goes to the up projection (Megatron's
fc1 is [gate; up], the adapter writes the second half), down to down_proj, gate (if targeted) to
the gate projection; the shared expert's uniform LoRA (`--drlora-shared-experts uniform`) goes
to its projections the same way. A router trained during fine-tuning (saved with the adapters) replaces the
base router. Everything else comes from the base: the Megatron `--pretrained-checkpoint` when
given (so a base trained or changed in Megatron exports too), else the HF model's own weights.

The exact rank map goes to `drlora_rank_map.json`; the base's README.md is not copied (the
exporter writes this model's card). Layer by layer: one layer of the base and one layer of
adapters are in memory at a time, and the safetensors shards are written as they fill
(`--max-shard-size`). Tensor names follow the
HF base (per-expert names, what save_pretrained writes, unless the base stores fused experts).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from megatron_drlora.hf import mapping
from megatron_drlora.hf.checkpoint_io import HFCheckpoint, ShardWriter, copy_side_files
from megatron_drlora.hf.common import HFInteropError
from megatron_drlora.hf.families import HFNames, ModelDescription
from megatron_drlora.hf.megatron_reader import AdapterCheckpoint, DistCheckpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MegatronBaseSource:
    """HF-named base tensors read from a Megatron full-model checkpoint."""

    def __init__(self, ckpt: DistCheckpoint, names: HFNames):
        self.ckpt, self.names = ckpt, names
        self.layer_keys = [k for k in ckpt.keys() if mapping.is_layer_key(k)]
        self.other_keys = [k for k in ckpt.keys() if not mapping.is_layer_key(k)]

    def global_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for key, t in self.ckpt.load(self.other_keys).items():
            out.update(mapping.hf_tensors(key, t, None, self.names))
        return out

    def layer(self, layer: int) -> Dict[str, torch.Tensor]:
        out = {}
        stacked = [k for k in self.layer_keys if mapping.numbered_layer(k) is None]
        for key, t in self.ckpt.load(stacked, layer=layer).items():
            out.update(mapping.hf_tensors(key, t, layer, self.names))
        own = [k for k in self.layer_keys if mapping.numbered_layer(k) == layer]
        for key, t in self.ckpt.load(own).items():  # per-layer keys (dense first layers)
            out.update(mapping.hf_tensors(mapping.canonical(key), t, layer, self.names))
        return out


class HFBaseSource:
    """Base tensors straight from the HF model's safetensors."""

    def __init__(self, hf: HFCheckpoint, names: HFNames):
        self.hf, self.names = hf, names

    def global_tensors(self) -> Dict[str, torch.Tensor]:
        return {name: self.hf.get(name) for name in self.names.global_names()}

    def layer(self, layer: int) -> Dict[str, torch.Tensor]:
        return {name: self.hf.get(name) for name in self.names.layer_names(layer)}


@torch.no_grad()
def merge_layer(tensors: Dict[str, torch.Tensor], names: HFNames, layer: int,
                adapters: AdapterCheckpoint) -> None:
    """Add s * B[:, :r] A[:r] of every adapted expert projection of `layer` (in fp32), and
    s * B A of the shared expert's projections when they were adapted."""
    inter = names.desc.moe_ffn_hidden_size
    scale = adapters.scale
    factors = adapters.factors(layer)
    for proj in adapters.projections:
        a, b = factors[proj]["A"], factors[proj]["B"]
        for expert, r in enumerate(adapters.ranks(layer, proj)):
            if r == 0:
                continue
            delta = scale * (b[expert, :, :r] @ a[expert, :r])
            if names.style == "per_expert":
                name = names.expert(layer, expert, proj)
                tensors[name] = tensors[name].float() + delta
                continue
            which = "down_proj" if proj == "down" else "gate_up_proj"
            name = names.fused(layer, which)
            fused = tensors[name] = tensors[name].float()
            rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter),
                    "down": slice(None)}[proj]
            fused[expert, rows] += delta
    for proj, f in adapters.shared_factors(layer).items():  # uniform LoRA, whole rank
        name = names.shared(layer, proj)
        tensors[name] = tensors[name].float() + scale * (f["B"] @ f["A"])


def export_merged(adapters: AdapterCheckpoint, hf: HFCheckpoint, desc: ModelDescription,
                  names: HFNames, save: str, base: Optional[DistCheckpoint] = None,
                  dtype: str = "auto", max_shard_bytes: int = 2 * 1024 ** 3, log=print) -> Dict:
    out_dtype = _output_dtype(dtype, hf)
    source = MegatronBaseSource(base, names) if base is not None else HFBaseSource(hf, names)
    os.makedirs(save, exist_ok=True)
    writer = ShardWriter(save, max_shard_bytes)
    check = _ShapeCheck(hf)
    globals_ = source.global_tensors()
    writer.add(names.embed, check(names.embed, globals_.pop(names.embed)).to(out_dtype))
    adapted = set(adapters.layers)
    for layer in range(desc.num_layers):
        tensors = source.layer(layer)
        router = adapters.router(layer)
        if router is not None:
            tensors[names.router(layer)] = router
        bias = adapters.expert_bias(layer)
        if bias is not None:
            tensors[names.expert_bias(layer)] = bias
        if layer in adapted:
            merge_layer(tensors, names, layer, adapters)
        for name in mapping.order_hf_layer(names, layer, tensors):
            # GLM-4.5's expert bias stays fp32 (as transformers and Megatron keep it): it
            # decides the routing, which a bf16 bias would change.
            keep = name.endswith("e_score_correction_bias")
            writer.add(name, check(name, tensors[name]).to(torch.float32 if keep else out_dtype))
        del tensors
    for name, t in globals_.items():
        writer.add(name, check(name, t).to(out_dtype))
    files = writer.close()
    config = dict(hf.config_dict)
    dtype_name = {v: k for k, v in DTYPES.items()}[out_dtype]
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype_name
    if "num_local_experts" in config and "num_experts" not in config \
            and desc.family == "qwen3_moe":
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts only; transformers
        # 4 reads num_experts (and would silently build 128 experts without it).
        config["num_experts"] = config["num_local_experts"]
    with open(os.path.join(save, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    # The base's README describes the base: the exporter writes this model's own card.
    copied = copy_side_files(hf.path, save, skip=("README.md",))
    from megatron_drlora.hf.export_peft import RANK_MAP_FILE, write_rank_map

    write_rank_map(adapters, desc, os.path.join(save, RANK_MAP_FILE), "merged")
    log(f"> merged {len(adapted)} adapted layers (ranks from the checkpoint, scale "
        f"{adapters.scale:g}{', trained router' if adapters.router_trained else ''}) into "
        f"{len(files)} shard(s) in {save} ({dtype_name}); copied {copied}")
    return {"files": files, "dtype": dtype_name}


class _ShapeCheck:
    """Every written tensor must have the HF base's shape (when the base has that tensor)."""

    def __init__(self, hf: HFCheckpoint):
        self.hf = hf

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.hf.has(name) and list(t.shape) != self.hf.shape(name):
            raise HFInteropError(f"{name}: the checkpoint gives shape {tuple(t.shape)}, the HF "
                                 f"model at {self.hf.path} has {tuple(self.hf.shape(name))}: the "
                                 f"base/adapters do not belong to this --hf-path")
        return t


def _output_dtype(dtype: str, hf: HFCheckpoint) -> torch.dtype:
    if dtype == "auto":
        dtype = hf.config_dict.get("dtype") or hf.config_dict.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise HFInteropError(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
