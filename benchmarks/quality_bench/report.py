"""The benchmark's summary (tables, paired differences, verdicts) and allocation pictures."""

from __future__ import annotations

import os
from typing import Dict, List

from benchmarks.quality_bench.runs import DRLORA_FAMILY, VARIANTS
from benchmarks.quality_bench.statistics import mean_std, paired, prompt_sampling_se, verdict

CONTROLS = ("uniform_r_target", "uniform_flops", "static_frequency", "uniform_r_max")


def _by_seed(runs: List[Dict], variant: str, get) -> Dict[int, float]:
    return {r["seed"]: get(r) for r in runs if r["variant"] == variant}


def summarize(results: Dict) -> Dict:
    s, runs = results["settings"], results["runs"]
    frequent, rare = s["frequent_domain"], s["rare_domain"]
    table = {}
    for variant in s["variants"]:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        row = {"label": VARIANTS[variant], "seeds": len(mine),
               "lora_params": mean_std([r["lora_params"] for r in mine])[0],
               "lora_flops_ratio": mean_std([r["lora_flops_ratio"] for r in mine]),
               "valid_loss": mean_std([r["valid_loss"] for r in mine]),
               "seconds_per_iteration": mean_std([r["seconds_per_iteration"] for r in mine]),
               "seconds": mean_std([r["seconds"] for r in mine])}
        for domain in (rare, frequent):
            for key in ("accuracy", "loss"):
                row[f"{domain}_{key}"] = mean_std([r["scores"][domain][key] for r in mine])
        alloc = [r["allocation"] for r in mine if r.get("allocation")]
        if alloc:
            row["allocation"] = {k: mean_std([a[k] for a in alloc]) for k in alloc[0]}
        table[variant] = row
    comparisons = {}
    if "drlora" in s["variants"]:
        for other in s["variants"]:
            if other == "drlora" or not any(r["variant"] == other for r in runs):
                continue
            entry = {}
            for domain in (rare, frequent):
                for key, better_high in (("accuracy", True), ("loss", False)):
                    diff = paired(_by_seed(runs, "drlora", lambda r: r["scores"][domain][key]),
                                  _by_seed(runs, other, lambda r: r["scores"][domain][key]))
                    diff["verdict"] = verdict(diff, higher_is_better=better_high)
                    if key == "accuracy":
                        diff["prompt_sampling_se"] = prompt_sampling_se(
                            _by_seed(runs, "drlora", lambda r: r["scores"][domain]["outcomes"]),
                            _by_seed(runs, other, lambda r: r["scores"][domain]["outcomes"]))
                    entry[f"{domain}_{key}"] = diff
            comparisons[other] = entry
    return {"table": table, "comparisons": comparisons}


def _fmt(pair, scale=1.0, digits=3) -> str:
    mean, std = pair
    return "-" if mean is None else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _interval(diff: Dict, scale=1.0, digits=1) -> str:
    if diff["mean"] is None:
        return "-"
    if diff["low"] is None:
        return f"{diff['mean'] * scale:+.{digits}f} (1 seed)"
    return (f"{diff['mean'] * scale:+.{digits}f} [{diff['low'] * scale:+.{digits}f}, "
            f"{diff['high'] * scale:+.{digits}f}]")


def markdown(results: Dict) -> str:
    s, summary, plan = results["settings"], results["summary"], results["plan"]
    frequent, rare = s["frequent_domain"], s["rare_domain"]
    base = results["base"]["scores"]
    lines = [
        f"DR-LoRA quality benchmark: fine-tuning mix {100 * (1 - s['rare_share']):.0f}% "
        f"`{frequent}` (frequent) + {100 * s['rare_share']:.0f}% `{rare}` (rare); "
        f"{s['num_layers']} layers x {s['num_experts']} experts (top-{s['topk']}), hidden "
        f"{s['hidden_size']}, expert ffn {s['moe_ffn_hidden_size']}; ranks r_init "
        f"{s['r_init']} / r_target {s['r_target']} / r_max {s['r_max']}; base "
        f"{s['base_iters']} iterations, fine-tune {s['finetune_iters']} iterations x "
        f"{s['batch_size']} sequences of 64 tokens; {len(s['seeds'])} seed(s); held-out "
        f"prompts: {s['eval_prompts_rare']} `{rare}`, {s['eval_prompts_frequent']} "
        f"`{frequent}`; wall time {results['wall_seconds'] / 60:.1f} min "
        f"({s['jobs']} training run(s) at a time), CPU time "
        f"{results.get('cpu_seconds', 0) / 60:.1f} min.", "",
        f"Growth plan (`{plan['command']}`): {plan['num_event_steps']} events, steps "
        f"{plan['first_event_step']}..{plan['last_event_step']}; the budget is reached at step "
        f"{plan['target_reached_step']} of {s['finetune_iters']} "
        f"({100 * (1 - plan['target_reached_step'] / s['finetune_iters']):.0f}% of the run at "
        f"full budget).", ""]
    fm = results.get("flops_match") or {}
    if fm:
        lines += [f"FLOPs-matched uniform rank: r_target x mean over DR-LoRA seeds of (LoRA FLOPs "
                  f"per target token / uniform r_target's) = {fm['exact']:.2f} -> "
                  f"{fm['rank']} ({fm['rounding']}; its FLOPs are "
                  f"{fm['flops_of_rank_vs_drlora']:.2f}x DR-LoRA's).", ""]
    lines += [f"| variant | LoRA params | LoRA FLOPs/target token (x r_target) | `{rare}` "
              f"accuracy % | `{rare}` loss | `{frequent}` accuracy % | `{frequent}` loss | "
              f"s/iteration |", "|---|---|---|---|---|---|---|---|",
              f"| base model, no fine-tuning | 0 | - | {100 * base[rare]['accuracy']:.1f} | "
              f"{base[rare]['loss']:.3f} | {100 * base[frequent]['accuracy']:.1f} | "
              f"{base[frequent]['loss']:.3f} | - |"]
    for variant, row in summary["table"].items():
        lines.append(
            f"| {row['label']} | {row['lora_params']:,.0f} | "
            f"{_fmt(row['lora_flops_ratio'], 1, 2)} | {_fmt(row[f'{rare}_accuracy'], 100, 1)} | "
            f"{_fmt(row[f'{rare}_loss'])} | {_fmt(row[f'{frequent}_accuracy'], 100, 1)} | "
            f"{_fmt(row[f'{frequent}_loss'])} | {_fmt(row['seconds_per_iteration'], 1, 2)} |")
    if summary["comparisons"]:
        lines += ["", "Paired per-seed differences, DR-LoRA minus each other variant: mean "
                  "[95% t-interval]; held-out sampling SE of the accuracy difference in "
                  "parentheses.", "",
                  f"| DR-LoRA vs | `{rare}` accuracy (points) | `{rare}` loss | "
                  f"`{frequent}` accuracy (points) | verdict (`{rare}` accuracy) | "
                  f"verdict (`{rare}` loss) |", "|---|---|---|---|---|---|"]
        for other, entry in summary["comparisons"].items():
            ra, rl, fa = entry[f"{rare}_accuracy"], entry[f"{rare}_loss"], \
                entry[f"{frequent}_accuracy"]
            se = ra.get("prompt_sampling_se")
            lines.append(
                f"| {VARIANTS[other]} | {_interval(ra, 100)}"
                f"{f' ({100 * se:.1f})' if se is not None else ''} | {_interval(rl, 1, 4)} | "
                f"{_interval(fa, 100)} | {ra['verdict']} | {rl['verdict']} |")
    alloc = [(v, r) for v, r in summary["table"].items() if r.get("allocation")]
    if alloc:
        lines += ["", "Where the ranks went (against the base model's routing on the target "
                  "mix; mean ± std over seeds; 'rare quarter': the quarter of experts with the "
                  f"largest `{rare}` share of their traffic):", "",
                  "| variant | Spearman(rank, mix frequency) | Spearman(rank, rare frequency) "
                  "| grown ranks in busiest quarter | grown ranks in rare quarter |",
                  "|---|---|---|---|---|"]
        for v, r in alloc:
            a = r["allocation"]
            lines.append(f"| {r['label']} | {_fmt(a['spearman_rank_vs_mix_frequency'], 1, 2)} | "
                         f"{_fmt(a['spearman_rank_vs_rare_frequency'], 1, 2)} | "
                         f"{_fmt(a['grown_share_busiest_quarter'], 1, 2)} | "
                         f"{_fmt(a['grown_share_rare_quarter'], 1, 2)} |")
    return "\n".join(lines)


def pictures(results: Dict, out: str) -> Dict[str, str]:
    """allocation.png: the base's routing on the mix, the rare domain's share of each
    expert's traffic, and each allocating variant's final expert rank (mean over seeds),
    experts sorted per layer by mix routing frequency. Nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return {}
    s, routing = results["settings"], results["base"]["routing"]
    counts = np.array(routing["counts"], dtype=float)  # [L, E]
    rare = np.array(routing["counts_by_domain"][s["rare_domain"]], dtype=float)
    L, E = counts.shape
    freq = counts / counts.sum(axis=1, keepdims=True) * E  # x an even share
    rare_share = np.divide(rare, counts, out=np.zeros_like(rare), where=counts > 0)
    order = np.argsort(-counts, axis=1, kind="stable")
    panels = [("target-mix routing (x even share)", freq, "magma"),
              (f"`{s['rare_domain']}` share of the expert's traffic", rare_share, "cividis")]
    for variant in ("static_frequency",) + DRLORA_FAMILY:
        maps = [r["rank_map"] for r in results["runs"] if r["variant"] == variant]
        if maps:
            ranks = np.array(maps, dtype=float).mean(axis=(0, 3))  # seeds, projections
            panels.append((f"{VARIANTS[variant]}: final expert rank (mean over seeds)", ranks,
                           "viridis"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 0.12 * E + 3),
                                                      len(panels) * (0.3 * L + 1.1)))
    for ax, (title, data, cmap) in zip(np.atleast_1d(axes), panels):
        sorted_data = np.take_along_axis(data, order, axis=1)
        im = ax.imshow(sorted_data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_yticks(range(L))
        ax.set_xticks([])
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    np.atleast_1d(axes)[-1].set_xlabel("experts, per layer sorted by target-mix routing "
                                       "(busiest left)", fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "allocation.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"allocation": path}
