"""The model card (README.md) of an export: what it is, what it came from, how it was trained.

A merged export gets its own card, never a copy of the base's README (which describes another
model): the base (hub id, when known), the method, the DR-LoRA settings from the checkpoint,
the rank map summarised per layer and projection, and the --verify result when it ran. PEFT
exports get the same card with `library_name: peft`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_drlora.hf.families import ARCHITECTURES, ModelDescription

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2601.04823"


def rank_summary(adapters) -> List[Dict]:
    """One row per adapted layer and projection: min / mean / max rank, total rank, experts
    at r_max, experts at rank 0."""
    rows = []
    for layer in adapters.layers:
        for proj in adapters.projections:
            ranks = adapters.ranks(layer, proj)
            rows.append({"layer": layer, "projection": proj, "min": min(ranks),
                         "mean": sum(ranks) / len(ranks), "max": max(ranks),
                         "total": sum(ranks),
                         "at_r_max": sum(r == adapters.r_max for r in ranks),
                         "zero": sum(r == 0 for r in ranks)})
    return rows


def _settings(adapters) -> List[tuple]:
    c = adapters.config
    return [("method", c.method), ("budget (r_target)", c.budget),
            ("r_init", c.rank_init), ("r_max", c.rank_max), ("alpha", f"{c.lora_alpha:g}"),
            ("scale (alpha / r_max)", f"{c.scale:g}"), ("targets", ", ".join(c.targets)),
            ("p_grow", c.p_grow), ("gamma", c.gamma), ("beta", c.beta),
            ("grow interval", c.grow_interval), ("grow buffer", c.grow_buffer),
            ("warm-up iterations", c.warmup_iters if c.warmup_iters is not None
             else "Megatron's LR warm-up"),
            ("allocation", c.allocation), ("saliency", c.saliency),
            ("frequency", c.frequency), ("router", c.router), ("dropout", c.dropout),
            ("seed", c.seed), ("shared experts", c.shared_experts)]


def model_card(adapters, desc: ModelDescription, fmt: str, hub_id: Optional[str],
               dtype: Optional[str] = None, layout: Optional[str] = None,
               verified: Optional[Dict] = None) -> str:
    """The README.md text of an export (`fmt` 'merged' or 'peft')."""
    base = hub_id or f"a local {ARCHITECTURES.get(desc.family, desc.family)} model"
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += [f"library_name: {'transformers' if fmt == 'merged' else 'peft'}",
              "tags:", "- dr-lora", "- lora", "- mixture-of-experts", f"- {desc.family}"]
    lines += ["- merged" if fmt == "merged" else "- peft", "---", ""]
    kind = ("the adapters merged into the base weights" if fmt == "merged"
            else f"a PEFT LoRA adapter ({layout} layout) for the base")
    link = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else base
    lines += [f"# DR-LoRA fine-tune of {hub_id or desc.family}", "",
              f"Base model: {link} ({desc.family}: {desc.num_layers} layers, "
              f"{desc.num_experts} experts, top-{desc.topk}). This directory holds {kind}"
              + (f", weights in {dtype}" if dtype else "") + ".", "",
              "## Method", "",
              f"DR-LoRA (Dynamic Rank LoRA, [arXiv 2601.04823]({PAPER})): every routed expert "
              f"has LoRA adapters on its {', '.join(adapters.projections)} projection(s), "
              f"started at rank r_init; during training an expert-saliency score (routing "
              f"frequency x LoRA rank importance, with a rank penalty) grows the ranks of the "
              f"experts that need them, within the parameter budget of uniform LoRA at "
              f"r_target. Trained with Megatron-LM and megatron-drlora, exported with "
              f"tools/export_to_hf.py"
              + (", the router trained with the adapters" if adapters.router_trained
                 else ", the router frozen") + ".", "",
              f"Checkpoint iteration: {int(adapters.common.get('iteration', -1))}.", "",
              "## DR-LoRA settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings(adapters)]
    lines += ["", "## Rank map", "",
              f"Active LoRA rank per expert after training (r_max {adapters.r_max}); the exact "
              f"per-expert ranks are in drlora_rank_map.json"
              + (" (merged into the weights here)" if fmt == "merged" else "") + ".", "",
              "| layer | projection | min | mean | max | total | experts at r_max | "
              "experts at 0 |", "|---|---|---|---|---|---|---|---|"]
    for r in rank_summary(adapters):
        lines.append(f"| {r['layer']} | {r['projection']} | {r['min']} | {r['mean']:.2f} | "
                     f"{r['max']} | {r['total']} | {r['at_r_max']} | {r['zero']} |")
    if verified:
        lines += ["", "## Verification", "",
                  f"`tools/export_to_hf.py --verify`: transformers"
                  f"{' + peft' if fmt == 'peft' else ''} logits of this export against the "
                  f"Megatron model with the adapters on {verified['sequences']} random "
                  f"sequences of {verified['seq_length']} tokens: max abs diff "
                  f"{verified['max_abs_diff']:.3g}; per position, max |diff| / max |logit|: "
                  f"max {verified['max_rel_diff']:.3g}, median {verified['median_rel_diff']:.3g}"
                  f" (the {verified['criterion']} must be <= {verified['tolerance']:.3g})."]
    if not hub_id:
        lines += ["", "The base model's hub id is unknown (its config.json named a local path "
                      "and no --hf-model-id was given)."]
    return "\n".join(lines) + "\n"
