"""What a training run tells its user: Megatron-style log lines, the rank-map JSONL written at
every growth event, optional tensorboard scalars, and the final summary."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Dict, List, Optional

import torch

from megatron_drlora import comm


def log0(message: str) -> None:
    """Print on global rank 0 only, flushed (several ranks share one terminal)."""
    if comm.world_rank() == 0:
        print(message, flush=True)


def iteration_line(iteration: int, train_iters: int, consumed: int, ms_per_iter: float,
                   lr: float, global_batch: int, loss: float, grad_norm: Optional[float],
                   tokens_per_s: float, ranks: str) -> str:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
    return (f" [{stamp}] iteration {iteration:8d}/{train_iters:8d} | consumed samples: "
            f"{consumed:12d} | elapsed time per iteration (ms): {ms_per_iter:.1f} | learning "
            f"rate: {lr:.6E} | global batch size: {global_batch:5d} | lm loss: {loss:.6E} | "
            f"grad norm: {gn} | tokens/s: {tokens_per_s:.0f} | {ranks}")


class RankLog:
    """Appends one JSON object per growth event (the full rank map) to drlora_ranks.jsonl."""

    def __init__(self, directory: str, projections: List[str], moe_layer_numbers: List[int]):
        self.path = os.path.join(directory, "drlora_ranks.jsonl")
        self.projections = projections
        self.moe_layer_numbers = moe_layer_numbers
        if comm.world_rank() == 0:
            os.makedirs(directory, exist_ok=True)

    def write(self, iteration: int, rank_map: torch.Tensor, kind: str = "event",
              saliency=None) -> None:
        if comm.world_rank() != 0:
            return
        record = {"iteration": iteration, "kind": kind, "time": time.time(),
                  "projections": self.projections, "layers": self.moe_layer_numbers,
                  "average_rank": float(rank_map.double().mean()),
                  "rank_map": rank_map.tolist()}
        if saliency is not None:
            record["saliency"] = saliency
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class Scalars:
    """Tensorboard scalars on rank 0 when --tensorboard-dir is given (tensorboard optional)."""

    def __init__(self, directory: Optional[str]):
        self.writer = None
        if directory and comm.world_rank() == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"--tensorboard-dir needs the tensorboard package "
                                   f"(pip install tensorboard): {e}") from e
            self.writer = SummaryWriter(log_dir=directory)

    def add(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class MetricsLog:
    """One JSON line per iteration on rank 0 (train_metrics.jsonl): full-precision loss, grad
    norm, learning rate and timings, for plots, benchmarks and exact resume comparisons."""

    def __init__(self, directory: str, append: bool):
        self.path = os.path.join(directory, "train_metrics.jsonl")
        if comm.world_rank() == 0:
            os.makedirs(directory, exist_ok=True)
            if not append and os.path.exists(self.path):
                os.remove(self.path)

    def write(self, record: Dict) -> None:
        if comm.world_rank() == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
