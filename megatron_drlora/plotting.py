"""Pictures of where DR-LoRA put its ranks: a layers x experts heatmap of the final (or any)
rank map, one panel per projection, and the rank growth over training. Reads the
drlora_ranks.jsonl a training run writes; needs matplotlib (the `plot` extra)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional


def read_rank_log(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no rank log (a DR-LoRA run writes drlora_ranks.jsonl "
                                f"into --drlora-log-dir, else --save)")
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
    if not records:
        raise ValueError(f"{path}: empty rank log")
    return records


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'megatron-drlora[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(record: Dict, path: str, title: Optional[str] = None) -> str:
    """Heatmap(s) of one rank map: rows = MoE layers, columns = experts, one panel per
    projection and one for the expert's mean rank."""
    import numpy as np

    plt = _pyplot()
    ranks = np.array(record["rank_map"], dtype=float)  # [L, E, M]
    projections = record.get("projections", [f"m{j}" for j in range(ranks.shape[2])])
    panels = [(f"{p} rank", ranks[:, :, j]) for j, p in enumerate(projections)]
    panels.append(("mean rank per expert", ranks.mean(axis=2)))
    L, E = ranks.shape[:2]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.18 * E + 2),
                                                      len(panels) * max(1.6, 0.35 * L + 1)))
    vmin, vmax = ranks.min(), ranks.max()
    layers = record.get("layers", list(range(L)))
    for ax, (name, data) in zip(axes, panels):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(L))
        ax.set_yticklabels([str(l) for l in layers], fontsize=7)
        ax.set_xlabel("expert")
        step = 1 if E <= 32 else 8
        ax.set_xticks(range(0, E, step))
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    fig.suptitle(title or f"DR-LoRA ranks after step {record['iteration']} (average "
                 f"{record['average_rank']:.2f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_growth(records: List[Dict], path: str) -> str:
    """Average, min and max rank per MoE layer against the iteration."""
    import numpy as np

    plt = _pyplot()
    steps = [r["iteration"] for r in records]
    maps = [np.array(r["rank_map"], dtype=float) for r in records]
    L = maps[0].shape[0]
    layers = records[0].get("layers", list(range(L)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for l in range(L):
        mean = [m[l].mean() for m in maps]
        line, = ax.plot(steps, mean, marker=".", label=f"layer {layers[l]}")
        ax.fill_between(steps, [m[l].min() for m in maps], [m[l].max() for m in maps],
                        color=line.get_color(), alpha=0.12)
    ax.plot(steps, [m.mean() for m in maps], color="black", linewidth=2, label="all layers")
    ax.set_xlabel("iteration")
    ax.set_ylabel("rank (mean; band = min..max over experts)")
    ax.set_title("DR-LoRA rank growth")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(rank_log: str, out_dir: Optional[str] = None) -> Dict[str, str]:
    """Both pictures for a run's rank log; returns their paths."""
    records = read_rank_log(rank_log)
    out_dir = out_dir or os.path.dirname(os.path.abspath(rank_log))
    os.makedirs(out_dir, exist_ok=True)
    return {"heatmap": plot_heatmap(records[-1], os.path.join(out_dir, "drlora_rank_heatmap.png")),
            "growth": plot_growth(records, os.path.join(out_dir, "drlora_rank_growth.png"))}
