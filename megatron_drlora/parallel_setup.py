"""Start torch.distributed and Megatron's model-parallel groups on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_drlora.compat import cpu


@dataclass
class ParallelSizes:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1


def init_distributed(timeout_s: int = 300) -> None:
    """env:// init from torchrun's variables, SLURM's (srun one task per GPU), or a single
    local process; an inconsistent launch environment is a clear error, not a world of 1."""
    if dist.is_initialized():
        return
    from megatron_drlora.launch.slurm import apply_to_environ, settings_from_env

    apply_to_environ(settings_from_env())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def initialize_megatron_parallel(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Megatron-Core process groups + RNG trackers; CPU workarounds applied when CUDA is absent."""
    cpu.preimport()
    from megatron.core import parallel_state as ps

    cpu.enable_cpu_support()
    init_distributed()
    world = dist.get_world_size()
    model_size = (sizes.tensor_model_parallel_size * sizes.pipeline_model_parallel_size
                  * sizes.context_parallel_size)
    if world % model_size:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {model_size} "
            f"(--tensor-model-parallel-size {sizes.tensor_model_parallel_size}, "
            f"--pipeline-model-parallel-size {sizes.pipeline_model_parallel_size})")
    global _INITIALIZED
    layout = (sizes, world)
    if ps.model_parallel_is_initialized():
        live = (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_context_parallel_world_size())
        wanted = (sizes.tensor_model_parallel_size, sizes.pipeline_model_parallel_size,
                  sizes.expert_model_parallel_size, sizes.context_parallel_size)
        if _INITIALIZED == layout and live == wanted:
            # The same groups again (an evaluation per run in one process): reuse them.
            # destroy_model_parallel forgets Megatron's groups but does not free torch's, so
            # rebuilding leaked gloo groups and their threads (thousands over a benchmark).
            cpu.model_parallel_seed(seed)
            return
        ps.destroy_model_parallel()
    _INITIALIZED = None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        expert_tensor_parallel_size=sizes.expert_tensor_parallel_size,
    )
    _INITIALIZED = layout
    cpu.model_parallel_seed(seed)


# (ParallelSizes, world size) of the groups initialize_megatron_parallel made last
_INITIALIZED = None


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
