"""Tests that need a CUDA GPU (and Transformer Engine for grouped experts). Skipped on CPU;
they run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch

from megatron_drlora import DRLoRAConfig
from megatron_drlora.compat.megatron import have_transformer_engine
from tests.test_adapters import grouped_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def megatron_gpu():
    from tests.conftest import free_port
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    initialize_megatron_parallel(ParallelSizes(), seed=1234)
    yield


@pytest.mark.te
@pytest.mark.skipif(not have_transformer_engine(), reason="needs Transformer Engine")
def test_te_grouped_experts_match_dense_reference(megatron_gpu):
    from tests.tiny import build, grown_rank_map, randomize_adapters, tiny_args

    args = tiny_args(moe_grouped_gemm=True)
    chunks, handle = build(args, DRLoRAConfig(budget=8))
    chunks[0].cuda()
    layer = handle.layers[0]
    assert layer.kind == "te_grouped"
    randomize_adapters(handle)
    handle.set_rank_map(grown_rank_map(handle))
    fc1, fc2 = layer.experts.linear_fc1, layer.experts.linear_fc2
    w1s = [getattr(fc1, f"weight{e}") for e in range(4)]
    w2s = [getattr(fc2, f"weight{e}") for e in range(4)]
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, args.hidden_size, device="cuda")
    probs = torch.rand(10, device="cuda")
    with torch.no_grad():
        out, _ = layer.experts(x, counts.cuda(), probs)
    ref = grouped_reference(w1s, w2s, layer.bank, x, counts.tolist(), probs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_sequential_experts_train_on_gpu(megatron_gpu):
    from tests.tiny import batch, build, tiny_args

    args = tiny_args(bf16=True)
    chunks, handle = build(args, DRLoRAConfig(budget=8))
    model = chunks[0].cuda()
    tokens, pos, labels = (t.cuda() for t in batch(args))
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = [p.grad for p in handle.lora_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    assert any(torch.count_nonzero(g) for g in grads)


@pytest.mark.parametrize("rank_pool", [False, True], ids=["dense", "rank_pool"])
def test_drlora_hot_path_makes_no_cuda_sync(megatron_gpu, rank_pool):
    """DR-LoRA's per-step work under torch.cuda.set_sync_debug_mode("error"): the routing
    hook, the grouped LoRA forward/backward (an expert without tokens included), collect()
    and finish() at a non-event step. Megatron's own dispatcher syncs stay outside: the full
    model step runs first without the debug mode (tests/test_host_syncs.py covers it on CPU)."""
    from megatron_drlora.adapters.lora_math import grouped_lora_delta
    from megatron_drlora.controller import DRLoRAController
    from tests.tiny import batch, build, randomize_adapters, tiny_args

    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, grow_interval=3, grow_buffer=0,
                                              warmup_iters=2, rank_pool=rank_pool))
    model = chunks[0].cuda()
    randomize_adapters(handle)
    controller = DRLoRAController(handle, train_iters=12, warmup_iters=None)
    assert 1 not in controller.schedule.event_steps()

    def forward_backward(step):
        for p in model.parameters():
            p.grad = None
        tokens, pos, labels = (t.cuda() for t in batch(args, batch_size=4, seed=step))
        model(tokens, pos, None, labels=labels).float().mean().backward()

    forward_backward(0)  # step 0 does the one-time moves (EMAs and rank map to the GPU)
    controller.collect(0)
    controller.finish(0, stepped=True)
    forward_backward(1)
    bank = handle.layers[0].bank
    router = handle.layers[0].moe_layer.router
    x = torch.randn(10, args.hidden_size, device="cuda")
    probs = torch.rand(10, args.num_experts, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        controller.routing._hook(0)(router, (x,), (probs, probs > 0.5))
        a, b = bank.lora_factors("up", bank.r_max)  # a pooled bank gathers on the device
        delta = grouped_lora_delta(x, [3, 0, 5, 2], a, b, bank.ranks_of("up"), bank.scale,
                                   0.1, True)
        delta.sum().backward()
        controller.collect(1)
        report = controller.finish(1, stepped=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not report.event and report.dropped == ""
    assert controller.saliency.frequency.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in controller.saliency.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_pool_equals_the_dense_bank_on_gpu(megatron_gpu, dtype):
    """The pooled bank's gathers on the device give the dense bank's loss and gradients
    (TE grouped experts when Transformer Engine is there, SequentialMLP otherwise)."""
    from tests.test_rank_pool import RANKS
    from tests.tiny import dense_grads
    from tests.tiny import batch, build, randomize_adapters, tiny_args

    args = tiny_args(bf16=dtype == torch.bfloat16, moe_grouped_gemm=have_transformer_engine())
    results = []
    for pool in (False, True):
        chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=pool))
        handle.set_rank_map(torch.tensor(RANKS))
        randomize_adapters(handle)
        model = chunks[0].cuda()
        tokens, pos, labels = (t.cuda() for t in batch(args, batch_size=4))
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        results.append((loss.detach(), [dense_grads(l.bank) for l in handle.layers]))
    (loss_d, grads_d), (loss_p, grads_p) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(float(loss_p) - float(loss_d)) <= tol * abs(float(loss_d))
    for gd, gp in zip(grads_d, grads_p):
        for key in gd:
            scale = gd[key].float().abs().max()
            assert (gp[key].float() - gd[key].float()).abs().max() <= 10 * tol * scale, key
