"""The expert-TP sum of replicated factors' gradients (comm.sum_replicated_gradients) in real
gloo processes: summed within each expert-TP group, one all-reduce per bank, views written
back in place, missing gradients and size-1 groups skipped. The whole path under Megatron
(DDP main_grad, distributed optimizer, overlapped reduction, one reduction per MoE layer per
step) is proven by tests/test_parallel_parity.py."""

import re

import pytest

from tests.dist_harness import run_torchrun

pytestmark = pytest.mark.slow


def test_sum_replicated_gradients_in_expert_tp_groups():
    out = run_torchrun("replicated_grad_worker.py", 4, [], timeout=120)
    # ranks share one stdout pipe, so their lines can interleave: match the markers, not lines
    assert sorted(re.findall(r"RANK\d+ REPLICATED_OK", out)) == [
        f"RANK{r} REPLICATED_OK" for r in range(4)], out[-3000:]
