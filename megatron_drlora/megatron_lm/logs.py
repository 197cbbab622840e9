"""DR-LoRA's own records of a run, beside Megatron-LM's log line and writers (rank 0 only):

- `drlora_ranks.jsonl`: the full rank map at the start and at every growth event (with the
  saliency that decided it); `tools/plot_ranks.py` and the end of a run draw it as PNGs;
- `drlora_steps.jsonl`: one line per optimizer step: whether Megatron applied it, the global
  gradient norm it computed, the average rank and the seconds DR-LoRA spent. Exact floats, so
  runs can be compared bitwise (layouts, nodes, resume).
A resumed run appends to both, after dropping what the run did past the checkpoint it
resumes from (a crash or a kill after the last save: those iterations run again); a fresh run
(iteration 0) starts them anew.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class _JsonLines:
    def __init__(self, path: str, fresh: bool):
        self.path = path
        if _is_rank0():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if fresh and os.path.exists(path):
                os.remove(path)

    def write(self, record: Dict) -> None:
        if _is_rank0():
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def keep_only(self, keep: Callable[[Dict], bool]) -> int:
        """Rewrite the file with the records `keep` accepts (crash-safe: temporary file,
        fsync, rename); returns how many were dropped."""
        if not _is_rank0() or not os.path.isfile(self.path):
            return 0
        with open(self.path) as fh:
            lines = [line for line in fh if line.strip()]
        kept = [line for line in lines if keep(json.loads(line))]
        if len(kept) == len(lines):
            return 0
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(lines) - len(kept)


class RankLog(_JsonLines):
    """drlora_ranks.jsonl: one JSON object per rank-map change."""

    def __init__(self, directory: str, projections: List[str], moe_layer_numbers: List[int],
                 fresh: bool):
        super().__init__(os.path.join(directory, "drlora_ranks.jsonl"), fresh)
        self.projections = projections
        self.moe_layer_numbers = moe_layer_numbers

    def rank_map(self, iteration: int, rank_map: torch.Tensor, kind: str = "event",
                 saliency: Optional[list] = None) -> None:
        record = {"iteration": iteration, "kind": kind, "time": time.time(),
                  "projections": self.projections, "layers": self.moe_layer_numbers,
                  "average_rank": float(rank_map.double().mean()),
                  "rank_map": rank_map.tolist()}
        if saliency is not None:
            record["saliency"] = saliency
        self.write(record)

    def resume_at(self, iteration: int) -> int:
        """Drop the records of events after `iteration` (an event's `iteration` is the
        optimizer step that applied it, counted from 0, so it belongs to iteration + 1)."""
        return self.keep_only(lambda r: r["kind"] != "event" or r["iteration"] < iteration)


class StepLog(_JsonLines):
    """drlora_steps.jsonl: one JSON object per optimizer step."""

    def __init__(self, directory: str, fresh: bool):
        super().__init__(os.path.join(directory, "drlora_steps.jsonl"), fresh)

    def step(self, iteration: int, stepped: bool, grad_norm, average_rank: float,
             seconds: float, event: bool, dropped: str) -> None:
        record = {"iteration": iteration, "stepped": stepped,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "average_rank": average_rank, "drlora_seconds": seconds}
        if event:
            record["event"] = True
        if dropped:
            record["statistics_dropped"] = dropped
        self.write(record)

    def resume_at(self, iteration: int) -> int:
        """Drop the records of iterations after `iteration` (counted from 1)."""
        return self.keep_only(lambda r: r["iteration"] <= iteration)
