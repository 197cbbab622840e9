"""Megatron-Core's parallel-layout arithmetic, checked in the batch shell.

A TP/PP/CP/EP/ETP combination that does not divide the world size fails minutes into a job,
after every node has started; `check_parallel_layout` (and `python -m
megatron_drlora.launch.slurm --check-parallel -- FLAGS`) says so before the job starts, naming
the flag to change. No torch, no Megatron.
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence


class ParallelLayoutError(ValueError):
    """TP/PP/CP/EP/ETP sizes do not fit the world size (Megatron would refuse them later)."""


def check_parallel_layout(world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1,
                          ep: int = 1, etp: Optional[int] = None,
                          num_experts: Optional[int] = None,
                          micro_batch_size: Optional[int] = None,
                          global_batch_size: Optional[int] = None) -> Dict[str, int]:
    """Check Megatron-Core's divisibility rules before the job spends minutes starting up.

    Dense part: world = TP * PP * CP * DP. Expert part (MoE layers): world = ETP * EP * PP *
    EDP, where ETP defaults to TP. Returns the derived ``dp`` and ``edp``; raises
    `ParallelLayoutError` naming the flag to change.
    """
    etp = tp if etp is None else etp
    for name, v in (("world_size", world_size), ("tensor-model-parallel-size", tp),
                    ("pipeline-model-parallel-size", pp), ("context-parallel-size", cp),
                    ("expert-model-parallel-size", ep), ("expert-tensor-parallel-size", etp)):
        if not isinstance(v, int) or v < 1:
            raise ParallelLayoutError(f"--{name} must be a positive integer, got {v!r}")
    dense = tp * pp * cp
    if world_size % dense:
        raise ParallelLayoutError(
            f"world size {world_size} (nodes x GPUs per node) is not divisible by TP*PP*CP = "
            f"{tp}*{pp}*{cp} = {dense}; change --tensor/--pipeline/--context-parallel-size or "
            f"the node count")
    expert = etp * ep * pp
    if world_size % expert:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by ETP*EP*PP = {etp}*{ep}*{pp} = {expert} "
            f"(Megatron lays experts out as world = PP*ETP*EP*EDP); change "
            f"--expert-model-parallel-size / --expert-tensor-parallel-size")
    dp, edp = world_size // dense, world_size // expert
    if num_experts is not None and num_experts % ep:
        raise ParallelLayoutError(f"--num-experts {num_experts} is not divisible by "
                                  f"--expert-model-parallel-size {ep}")
    if micro_batch_size is not None and global_batch_size is not None:
        if global_batch_size % (micro_batch_size * dp):
            raise ParallelLayoutError(
                f"--global-batch-size {global_batch_size} is not divisible by "
                f"--micro-batch-size {micro_batch_size} x data-parallel size {dp}")
    return {"world_size": world_size, "tp": tp, "pp": pp, "cp": cp, "dp": dp,
            "ep": ep, "etp": etp, "edp": edp}


def layout_from_args(argv: Sequence[str], world_size: int) -> Dict[str, int]:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--context-parallel-size", "--expert-model-parallel-size",
                 "--expert-tensor-parallel-size", "--num-experts", "--micro-batch-size",
                 "--global-batch-size"):
        p.add_argument(flag, type=int, default=None)
    a, _ = p.parse_known_args(list(argv))
    return check_parallel_layout(
        world_size, tp=a.tensor_model_parallel_size or 1, pp=a.pipeline_model_parallel_size or 1,
        cp=a.context_parallel_size or 1, ep=a.expert_model_parallel_size or 1,
        etp=a.expert_tensor_parallel_size, num_experts=a.num_experts,
        micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size)
