"""Every rank applies the same rank map, and the controller refuses to miscount gradients.

- the exact (integer) agreement check catches a map that differs by one entry on one rank and
  names the MoE layer; the broadcast hands every rank global rank 0's map (real gloo processes,
  tests/workers/agreement_worker.py; the end-to-end case with a perturbed allocator is
  tests/test_parallel_parity.py::test_perturbed_rank_applies_rank0_map);
- a controller whose adapters are wrapped by Megatron DDP but which was given no DDP models
  stops in collect() instead of counting expert-DP rank 0's whole main_grad.
"""

import pytest
import torch

from megatron_drlora import DRLoRAConfig, comm
from megatron_drlora.controller import DRLoRAController
from tests.dist_harness import run_torchrun
from tests.tiny import build, tiny_args


@pytest.mark.slow
def test_exact_check_catches_one_entry_and_broadcast_gives_rank0_map():
    out = run_torchrun("agreement_worker.py", 2, [], timeout=120)
    for rank in (0, 1):
        assert f"RANK{rank} EQUAL_OK" in out, out[-3000:]
        assert f"RANK{rank} MISSED" not in out and f"RANK{rank} SWAP_MISSED" not in out, \
            out[-3000:]
        assert f"RANK{rank} BROADCAST_OK" in out, out[-3000:]
    assert out.count("rank maps differ between ranks after the growth event at step 7: "
                     "MoE layer(s) [2]") == 2, out[-3000:]
    assert out.count("after the growth event at step 8: MoE layer(s) [0]") == 2, out[-3000:]
    assert "at [layer, expert, module] [2, 1, 0]" in out, out[-3000:]


def test_single_process_broadcast_and_check_are_no_ops():
    m = torch.arange(6).view(1, 3, 2).to(torch.int32)
    got = comm.broadcast_rank_map(m)
    assert got.dtype == torch.int64 and torch.equal(got, m.long())
    comm.check_rank_map_agreement(got, step=0)


@pytest.mark.usefixtures("megatron_single")
def test_collect_refuses_ddp_wrapped_adapters_without_ddp_models():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks, handle = build(tiny_args(), DRLoRAConfig(budget=8, grow_interval=1, grow_buffer=0,
                                                     warmup_iters=0))
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=True)
    model = [DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_cfg, module=c)
             for c in chunks]
    assert all(hasattr(p, "main_grad") for p in handle.lora_parameters())
    controller = DRLoRAController(handle, train_iters=10, warmup_iters=0)
    with pytest.raises(RuntimeError, match=r"ddp_models=.*attach_ddp_models"):
        controller.collect(0)
    controller.attach_ddp_models(model)
    controller.collect(0)  # now it knows the shard this rank owns
    assert controller._grad_masks, "distributed-optimizer shard masks were not built"
    controller.finish(0, stepped=True)
