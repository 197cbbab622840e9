"""DR-LoRA checkpoint -> PEFT LoRA adapter with per-expert ranks (`--format peft`).

Two layouts (verified against transformers and PEFT, see docs/hf_interop.md):

fused (transformers 5; default). Experts are 3-D parameters `mlp.experts.gate_up_proj` [E, 2I, H]
and `mlp.experts.down_proj` [E, H, I], targeted through `target_parameters`, one rank per
parameter. So:
- gate and up adapters of expert e fuse into one adapter of rank r_gate + r_up with a
  block-diagonal B (B's gate rows take the gate adapter, its up rows the up adapter);
- every expert is zero-padded to the layer's largest rank R of that parameter (exact);
- alpha exists per parameter only: the DR-LoRA scale s is folded into B and alpha = R (PEFT's
  scaling alpha / r = 1), exact for any per-expert scale;
- lora_A row e*R + k is expert e, rank k (expert-major); lora_B column k*E + e (rank-major);
- `rank_pattern` / `alpha_pattern` per parameter, keyed by the escaped parameter path;
- with both parameters targeted, PEFT nests the wrappers: gate_up_proj's factors are
  `...mlp.experts.base_layer.lora_{A,B}.weight`, down_proj's `...mlp.experts.lora_{A,B}.weight`.

per-expert (transformers 4). Every expert projection is a module (`mlp.experts.3.up_proj`,
Mixtral `block_sparse_moe.experts.3.w3`) with its exact rank: `target_modules` is one regex,
`rank_pattern` and `alpha_pattern` have one alternation-regex key per distinct rank (PEFT's
lookup is linear in the number of keys), alpha = r with s folded into B. A rank-0 module gets
one zero rank.

Shared experts (only when trained with `--drlora-shared-experts uniform`) are plain modules in
both layouts (`mlp.shared_expert.{gate,up,down}_proj`, DeepSeek/GLM `mlp.shared_experts.*`) at
rank r_target with s folded into B: `target_modules` next to the fused `target_parameters`, or
one more alternation in the per-expert regex.

`base_model_name_or_path` is the base's hub id (see exporter.resolve_hub_id) or absent, never
a local path. A router trained with the adapters is saved as a `modules_to_save` module.
`lora_dropout` is 0 (PEFT refuses dropout on parameter targets). The exact rank map is written next to the adapter
(`drlora_rank_map.json`), and `check_adapter_dir` re-reads the directory and fails if the config
claims a rank its tensors do not have.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from megatron_drlora.hf.common import HFInteropError
from megatron_drlora.hf.families import HFNames, ModelDescription
from megatron_drlora.hf.megatron_reader import AdapterCheckpoint

RANK_MAP_FILE = "drlora_rank_map.json"
PREFIX = "base_model.model."
LAYOUTS = ("fused", "per-expert")


def _fused_gate_up(adapters: AdapterCheckpoint, layer: int, factors, desc: ModelDescription
                   ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """lora_A [E*R, H], lora_B [2I, R*E] of gate_up_proj; see the module docstring."""
    E, H, I = desc.num_experts, desc.hidden_size, desc.moe_ffn_hidden_size
    s = adapters.scale
    parts = [p for p in ("gate", "up") if p in adapters.projections]
    ranks = {p: adapters.ranks(layer, p) for p in parts}
    R = max(sum(ranks[p][e] for p in parts) for e in range(E))
    a = torch.zeros(E, R, H)
    b = torch.zeros(E, 2 * I, R)
    for e in range(E):
        k = 0
        for p in parts:
            r = ranks[p][e]
            rows = slice(0, I) if p == "gate" else slice(I, 2 * I)
            a[e, k:k + r] = factors[p]["A"][e, :r]
            b[e, rows, k:k + r] = s * factors[p]["B"][e, :, :r]
            k += r
    return _pack(a, b) + (R,)


def _fused_down(adapters: AdapterCheckpoint, layer: int, factors, desc: ModelDescription):
    E, H, I = desc.num_experts, desc.hidden_size, desc.moe_ffn_hidden_size
    ranks = adapters.ranks(layer, "down")
    R = max(ranks)
    a = torch.zeros(E, R, I)
    b = torch.zeros(E, H, R)
    for e, r in enumerate(ranks):
        a[e, :r] = factors["down"]["A"][e, :r]
        b[e, :, :r] = adapters.scale * factors["down"]["B"][e, :, :r]
    return _pack(a, b) + (R,)


def _pack(a: torch.Tensor, b: torch.Tensor):
    """[E, R, k], [E, d, R] -> PEFT's lora_A [E*R, k] (expert-major), lora_B [d, R*E]
    (rank-major: column k*E + e)."""
    E, R, k = a.shape
    lora_a = a.reshape(E * R, k)
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], R * E)
    return lora_a.contiguous(), lora_b.contiguous()


def _fused(adapters: AdapterCheckpoint, desc: ModelDescription):
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    targets: List[str] = []
    ranks: Dict[str, int] = {}
    up_side = [p for p in ("gate", "up") if p in adapters.projections]
    down = "down" in adapters.projections
    for layer in adapters.layers:
        factors = adapters.factors(layer)
        base = f"model.layers.{layer}.mlp.experts"
        params = []
        if up_side:
            params.append(("gate_up_proj",) + _fused_gate_up(adapters, layer, factors, desc))
        if down:
            params.append(("down_proj",) + _fused_down(adapters, layer, factors, desc))
        for name, lora_a, lora_b, R in params:
            if R == 0:
                continue  # no active rank in this parameter: leave it untargeted
            nested = name == "gate_up_proj" and down and any(p[0] == "down_proj" and p[3] > 0
                                                            for p in params)
            module = f"{PREFIX}{base}{'.base_layer' if nested else ''}"
            tensors[f"{module}.lora_A.weight"] = lora_a
            tensors[f"{module}.lora_B.weight"] = lora_b
            targets.append(f"{base}.{name}")
            ranks[f"{base}.{name}"] = R
    return tensors, targets, ranks


def _per_expert(adapters: AdapterCheckpoint, names: HFNames):
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    by_rank: Dict[int, List[str]] = {}
    for layer in adapters.layers:
        factors = adapters.factors(layer)
        for proj in adapters.projections:
            for e, r in enumerate(adapters.ranks(layer, proj)):
                module = names.expert(layer, e, proj)[:-len(".weight")]
                a, b = factors[proj]["A"][e, :r], adapters.scale * factors[proj]["B"][e, :, :r]
                if r == 0:  # one zero rank: an adapter that changes nothing
                    a, b, r = torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1), 1
                tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
                tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
                by_rank.setdefault(r, []).append(module)
    projs = "|".join(re.escape(names.proj[p]) for p in adapters.projections)
    target_regex = rf"model\.layers\.\d+\.{re.escape(names.block)}\.experts\.\d+\.(?:{projs})"
    patterns = {_alternation(modules): r for r, modules in sorted(by_rank.items())}
    return tensors, target_regex, patterns


def _shared(adapters: AdapterCheckpoint, names: HFNames):
    """The shared experts' uniform LoRA (only when they were adapted): one plain module per
    projection (`mlp.shared_expert.up_proj`, DeepSeek/GLM `mlp.shared_experts.up_proj`) at
    rank r_target, s folded into B."""
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    modules: List[str] = []
    for layer in adapters.layers:
        for proj, f in adapters.shared_factors(layer).items():
            module = names.shared(layer, proj)[:-len(".weight")]
            tensors[f"{PREFIX}{module}.lora_A.weight"] = f["A"].contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = (adapters.scale * f["B"]).contiguous()
            modules.append(module)
    return tensors, modules


def _alternation(modules: List[str]) -> str:
    """One regex matching exactly these module paths, grouped by layer to stay short."""
    groups: Dict[str, List[str]] = OrderedDict()
    for m in modules:
        head, tail = m.split(".experts.", 1)
        groups.setdefault(head, []).append(tail)
    alts = [f"{re.escape(head)}\\.experts\\.(?:{'|'.join(re.escape(t) for t in tails)})"
            for head, tails in groups.items()]
    return alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"


def export_peft(adapters: AdapterCheckpoint, hf_path: str, desc: ModelDescription, save: str,
                layout: str = "fused", hub_id: Optional[str] = None, log=print) -> Dict:
    """Write the adapter into `save`; `hub_id` becomes base_model_name_or_path (None: left
    out; never a local path)."""
    try:
        from peft import LoraConfig
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - the hf extra is missing
        raise HFInteropError("--format peft needs peft and safetensors: pip install -e '.[hf]'") \
            from e
    if layout not in LAYOUTS:
        raise HFInteropError(f"--peft-layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    os.makedirs(save, exist_ok=True)
    common = dict(lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False,
                  inference_mode=True,
                  base_model_name_or_path=hub_id, task_type="CAUSAL_LM")
    shared_rank = adapters.config.budget
    if layout == "fused":
        names = HFNames(desc, "fused")
        tensors, targets, ranks = _fused(adapters, desc)
        if not targets:
            raise HFInteropError("every adapter has rank 0: nothing to export")
        shared_tensors, shared_modules = _shared(adapters, names)
        tensors.update(shared_tensors)
        pattern = {re.escape(t): r for t, r in ranks.items()}
        pattern.update({re.escape(m): shared_rank for m in shared_modules})
        first = next(iter(ranks.values()))
        config = LoraConfig(r=first, lora_alpha=first, target_modules=shared_modules,
                            target_parameters=targets, rank_pattern=pattern,
                            alpha_pattern=dict(pattern), **common)
    else:
        names = HFNames(desc, "per_expert")
        tensors, target_regex, pattern = _per_expert(adapters, names)
        shared_tensors, shared_modules = _shared(adapters, names)
        if shared_modules:
            tensors.update(shared_tensors)
            shared_regex = "|".join(re.escape(m) for m in shared_modules)
            target_regex = f"(?:{target_regex}|{shared_regex})"
            pattern[f"(?:{shared_regex})"] = shared_rank
        first = next(iter(pattern.values()))
        config = LoraConfig(r=first, lora_alpha=first, target_modules=target_regex,
                            rank_pattern=pattern, alpha_pattern=dict(pattern), **common)
    if adapters.router_trained or desc.router_expert_bias:
        _save_routers(adapters, hf_path, desc, names, config, tensors)
    save_file(dict(tensors), os.path.join(save, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(save)
    write_rank_map(adapters, desc, os.path.join(save, RANK_MAP_FILE), layout)
    summary = check_adapter_dir(save, desc)
    log(f"> PEFT adapter ({layout} layout) in {save}: {summary['targets']} targets, ranks "
        f"{summary['min_rank']}..{summary['max_rank']}"
        f"{f', shared experts at rank {shared_rank}' if adapters.shared_adapted else ''}"
        f"{', trained router in modules_to_save' if adapters.router_trained else ''}; exact "
        f"per-expert ranks in {RANK_MAP_FILE}")
    return summary


def _save_routers(adapters, hf_path, desc, names, config, tensors) -> None:
    """The router modules as `modules_to_save`: a trained router's weight and (GLM-4.5) the
    expert bias as training left it, with the base's router weight where it was frozen."""
    from megatron_drlora.hf.checkpoint_io import HFCheckpoint

    module = names.router_module  # mlp.gate; Phi-MoE: mlp.router (transformers 5)
    config.modules_to_save = [module]
    hf = None if adapters.router_trained else HFCheckpoint(hf_path)
    for layer in range(desc.num_layers):
        if not desc.is_moe_layer(layer):
            continue
        prefix = f"{PREFIX}model.layers.{layer}.{module}"
        router = adapters.router(layer) if hf is None else hf.get(names.router(layer))
        tensors[f"{prefix}.weight"] = router.float()
        bias = adapters.expert_bias(layer) if desc.router_expert_bias else None
        if bias is None and desc.router_expert_bias:
            bias = (hf or HFCheckpoint(hf_path)).get(names.expert_bias(layer))
        if bias is not None:
            tensors[f"{prefix}.e_score_correction_bias"] = bias.float()


def write_rank_map(adapters: AdapterCheckpoint, desc: ModelDescription, path: str,
                   layout: str) -> None:
    data = {"family": desc.family, "layout": layout, "projections": adapters.projections,
            "moe_layers": adapters.layers, "num_experts": adapters.num_experts,
            "r_max": adapters.r_max, "scale": adapters.scale,
            "iteration": int(adapters.common.get("iteration", -1)),
            "rank_map": adapters.rank_map.tolist(),
            "shared_experts": {"mode": adapters.config.shared_experts,
                               "rank": adapters.config.budget if adapters.shared_adapted else 0},
            "note": "rank_map[moe_layer][expert][projection]; the PEFT tensors hold these ranks "
                    "(the fused layout zero-pads each layer to its largest rank)"}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def check_adapter_dir(path: str, desc: ModelDescription) -> Dict:
    """Re-read adapter_config.json and the tensors; every rank the config claims must be the
    rank of its tensors (and the rank map's per-expert ranks must fit in them)."""
    from safetensors import safe_open

    with open(os.path.join(path, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    if cfg.get("lora_dropout", 0) != 0:
        raise HFInteropError(f"{path}: lora_dropout must be 0")
    pattern = cfg.get("rank_pattern") or {}
    alpha = cfg.get("alpha_pattern") or {}
    if set(pattern) != set(alpha) or any(alpha[k] != pattern[k] for k in pattern):
        raise HFInteropError(f"{path}: alpha_pattern must equal rank_pattern (scale folded "
                             f"into B)")
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    ranks = []
    E = desc.num_experts
    if cfg.get("target_parameters"):
        for target in cfg["target_parameters"]:
            key = re.escape(target)
            if key not in pattern:
                raise HFInteropError(f"{path}: no rank_pattern entry for {target}")
            R = pattern[key]
            base = target.rsplit(".", 1)[0]
            nested = (target.endswith("gate_up_proj")
                      and f"{base}.down_proj" in cfg["target_parameters"])
            module = f"{PREFIX}{base}{'.base_layer' if nested else ''}"
            a = shapes.get(f"{module}.lora_A.weight")
            b = shapes.get(f"{module}.lora_B.weight")
            if a is None or b is None or a[0] != R * E or b[1] != R * E:
                raise HFInteropError(f"{path}: {target} claims rank {R} ({R * E} rows for {E} "
                                     f"experts) but its tensors are A {a}, B {b}")
            ranks.append(R)
        for module in cfg.get("target_modules") or []:  # shared experts: plain modules
            R = pattern.get(re.escape(module))
            a = shapes.get(f"{PREFIX}{module}.lora_A.weight")
            b = shapes.get(f"{PREFIX}{module}.lora_B.weight")
            if R is None or a is None or b is None or a[0] != R or b[1] != R:
                raise HFInteropError(f"{path}: {module} claims rank {R} but its tensors are "
                                     f"A {a}, B {b}")
            ranks.append(R)
    else:
        compiled = [(re.compile(rf"(.*\.)?({k})$"), r) for k, r in pattern.items()]
        for name, shape in shapes.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name[len(PREFIX):-len(".lora_A.weight")]
            claimed = [r for rx, r in compiled if rx.match(module)]
            b = shapes.get(f"{PREFIX}{module}.lora_B.weight")
            if not claimed or claimed[0] != shape[0] or b is None or b[1] != shape[0]:
                raise HFInteropError(f"{path}: {module} claims rank "
                                     f"{claimed[0] if claimed else cfg.get('r')} but its "
                                     f"tensors are A {shape}, B {b}")
            ranks.append(shape[0])
    if not ranks:
        raise HFInteropError(f"{path}: the adapter has no LoRA tensors")
    return {"targets": len(ranks), "min_rank": min(ranks), "max_rank": max(ranks),
            "tensors": len(shapes)}
