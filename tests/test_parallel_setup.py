"""initialize_megatron_parallel called again in one process (the quality benchmark evaluates
every run in its own process this way) reuses the groups instead of leaking them."""

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_single")


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_same_layout_again_reuses_groups_and_reseeds():
    from megatron.core import parallel_state as ps

    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    group = ps.get_tensor_model_parallel_group()
    before = _threads()
    for seed in range(5):
        initialize_megatron_parallel(ParallelSizes(), seed=seed)
    # before the fix every call made new gloo groups, each with its own threads
    assert _threads() <= before
    assert ps.get_tensor_model_parallel_group() is group
    initialize_megatron_parallel(ParallelSizes(), seed=3)
    first = torch.rand(4)
    initialize_megatron_parallel(ParallelSizes(), seed=3)
    assert torch.equal(torch.rand(4), first)  # the seed is applied again
