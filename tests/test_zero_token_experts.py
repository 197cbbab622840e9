"""Experts that receive no tokens in a micro-batch keep their adapters in the autograd graph:
exact zero gradients that still arrive, so Megatron DDP with overlap_grad_reduce (which waits
for every parameter's gradient hook) completes, and the legacy GroupedMLP's no-token branch
works with several local experts."""

import types

import pytest
import torch
import torch.nn.functional as F

from megatron_drlora import DRLoRAConfig
from megatron_drlora.adapters import experts as attach
from megatron_drlora.adapters.bank import ExpertLoRABank
from megatron_drlora.inject import projection_specs
from tests.tiny import batch, build, dense_grads, randomize_adapters, tiny_args

pytestmark = pytest.mark.usefixtures("megatron_single")


def _starve(router, experts):
    """Forward hook on a router: the listed experts win no token (their column of the routing
    map is cleared). Router weights alone cannot guarantee that for every normalized input."""
    def hook(module, args, output):
        probs, routing_map = output[0], output[1]
        keep = torch.ones(routing_map.shape[-1], dtype=torch.bool)
        keep[list(experts)] = False
        return (probs * keep, routing_map & keep) + tuple(output[2:])

    return router.register_forward_hook(hook)


@pytest.mark.parametrize("rank_pool", [True, False], ids=["pool", "dense"])
@pytest.mark.parametrize("starved", [[1], [0, 1, 2, 3]], ids=["one-expert", "all-local-experts"])
def test_zero_token_experts_get_exact_zero_main_grad_under_overlapped_ddp(starved, rank_pool):
    """[0,1,2,3]: every local expert of layer 0 starves, as on an EP rank that receives no
    token; before the fix its adapters got no gradient and DDP never issued the reduction."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    args = tiny_args(moe_token_dispatcher_type="allgather")
    chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=rank_pool))
    randomize_adapters(handle)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True)
    model = DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_cfg,
                                    module=chunks[0])
    layer = handle.layers[0]
    hook = None
    # Iteration 0 routes normally (DDP records which gradients arrive); iteration 1 starves.
    for it in range(2):
        if it == 1:
            hook = _starve(layer.moe_layer.router, starved)
        model.zero_grad_buffer()
        tokens, pos, labels = batch(args, batch_size=4, seed=it)
        model(tokens, pos, None, labels=labels).float().mean().backward()
        model.finish_grad_sync()
    hook.remove()
    grads = dense_grads(layer.bank, "main_grad")  # a pool's slots mapped to (expert, rank)
    for name in layer.bank.projection_names:
        for which in ("A", "B"):
            grad = grads[name, which]
            for e in range(4):
                if e in starved:
                    assert torch.count_nonzero(grad[e]) == 0, (name, which, e)
                else:
                    assert torch.count_nonzero(grad[e]) > 0, (name, which, e)
    assert torch.count_nonzero(dense_grads(handle.layers[1].bank, "main_grad")["up", "B"]) > 0


class _LegacyGroupedStandIn(torch.nn.Module):
    """What attach_to_legacy_grouped uses of megatron-core's legacy GroupedMLP (removed in
    0.19): config, num_local_experts, weight1 [H, E * 2F], weight2 [E * F, H], a gated
    activation with probs."""

    def __init__(self, num_experts, hidden, ffn):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.config = types.SimpleNamespace(hidden_size=hidden, moe_apply_probs_on_input=False)
        self.num_local_experts = num_experts
        self.weight1 = torch.nn.Parameter(torch.randn(hidden, num_experts * 2 * ffn, generator=g))
        self.weight2 = torch.nn.Parameter(torch.randn(num_experts * ffn, hidden, generator=g))

    def activation_func_with_probs(self, x, probs):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up * probs


def _ref_gmm(x, w, counts, trans_b=False):
    pieces = torch.split(x, [int(c) for c in counts])
    return torch.cat([p @ (w[e].T if trans_b else w[e]) for e, p in enumerate(pieces)])


@pytest.mark.parametrize("counts", [[3, 0], [0, 0]], ids=["one-expert", "no-token-at-all"])
def test_legacy_grouped_mlp_with_experts_without_tokens(counts):
    """2 local experts; [0, 0] takes the no-token branch, which crashed on a shape mismatch
    (the base output was [0, E * 2F], the deltas [0, F]) whenever E > 1."""
    hidden, ffn = 8, 6
    cfg = DRLoRAConfig(budget=3, r_max=6, p_grow=0.5, targets=("up", "down"))
    model_cfg = types.SimpleNamespace(hidden_size=hidden, moe_ffn_hidden_size=ffn,
                                      ffn_hidden_size=ffn, gated_linear_unit=True)
    bank = ExpertLoRABank(0, [0, 1], 2, projection_specs(cfg, model_cfg, 1, 0), 6, 3, cfg.scale)
    with torch.no_grad():
        for name in bank.projection_names:
            bank.factor(name, "B").normal_(0, 0.2)
    bank.set_ranks(torch.tensor([[2, 3], [4, 1]]))
    grouped = _LegacyGroupedStandIn(2, hidden, ffn)
    grouped.requires_grad_(False)
    attach.attach_to_legacy_grouped(grouped, bank, None, gmm=_ref_gmm)
    x = torch.randn(sum(counts), hidden)
    probs = torch.rand(sum(counts))
    out, _ = grouped(x, torch.tensor(counts), probs)
    assert out.shape == (sum(counts), hidden)
    (out.sum() + 0.0).backward()
    for name in bank.projection_names:
        for which in ("A", "B"):
            grad = bank.factor(name, which).grad
            assert grad is not None, (name, which)
            assert torch.count_nonzero(grad[1]) == 0
            assert (torch.count_nonzero(grad[0]) > 0) == (counts[0] > 0)
    if counts[0]:
        from tests.test_adapters import grouped_reference

        w1 = grouped.weight1.view(2, hidden, -1).transpose(1, 2)
        w2 = grouped.weight2.view(2, -1, hidden).transpose(1, 2)
        ref = grouped_reference(w1, w2, bank, x, counts, probs)
        torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-6)
