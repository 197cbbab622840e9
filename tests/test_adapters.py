"""DR-LoRA adapters on Megatron-Core MoE experts (single process, CPU)."""

import types

import pytest
import torch
import torch.nn.functional as F

from megatron_drlora import DRLoRAConfig
from megatron_drlora.adapters.bank import ExpertLoRABank
from megatron_drlora.adapters import experts as attach
from megatron_drlora.inject import DRLoRAInjectionError, apply_drlora, projection_specs
from tests.tiny import (CPUGroupedLinear, batch, build, dense_grads, grown_rank_map,
                        randomize_adapters, tiny_args)

BANKS = pytest.mark.parametrize("rank_pool", [True, False], ids=["pool", "dense"])

pytestmark = pytest.mark.usefixtures("megatron_single")


def _logits(model, args, seed=0):
    tokens, pos, _ = batch(args, seed=seed)
    with torch.no_grad():
        return model(tokens, pos, None)


def test_logits_at_init_equal_base_bitwise():
    args = tiny_args()
    chunks, _ = build(args)
    base = _logits(chunks[0], args)
    chunks2, handle = build(args, DRLoRAConfig(budget=8, targets=("gate", "up", "down")))
    assert handle.summary()["modules_here"] == 2 * 4 * 3
    assert torch.equal(base, _logits(chunks2[0], args))


def _dense_experts_reference(experts, bank, x, counts, probs, gated=True):
    """Per-expert dense computation with merged weights W + s * B[:, :r] A[:r]."""
    outs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x, counts), torch.split(probs, counts))):
        mlp = experts.local_experts[e]
        w1 = mlp.linear_fc1.weight.detach().clone().double()
        w2 = mlp.linear_fc2.weight.detach().clone().double()
        half = w1.shape[0] // 2
        for name in bank.projection_names:
            r = bank.rank(e, name)
            delta = bank.scale * (bank.dense_factor(name, "B")[e, :, :r].double()
                                  @ bank.dense_factor(name, "A")[e, :r].double())
            if name == "up" and not gated:
                w1 += delta
            elif name == "up":
                w1[half:] += delta
            elif name == "gate":
                w1[:half] += delta
            else:
                w2 += delta
        h = xe.double() @ w1.T
        act = F.silu(h[:, :half]) * h[:, half:] if gated else F.gelu(h)
        outs.append((act * pe.double().unsqueeze(-1)) @ w2.T)
    return torch.cat(outs)


@BANKS
@pytest.mark.parametrize("targets", [("up", "down"), ("gate", "up", "down"), ("down",)])
def test_sequential_experts_match_dense_reference(targets, rank_pool):
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, targets=targets, rank_pool=rank_pool))
    randomize_adapters(handle)
    handle.set_rank_map(grown_rank_map(handle))
    layer = handle.layers[0]
    g = torch.Generator().manual_seed(11)
    for trial in range(5):
        counts = torch.randint(0, 7, (4,), generator=g)
        x = torch.randn(int(counts.sum()), args.hidden_size, generator=g)
        probs = torch.rand(int(counts.sum()), generator=g)
        with torch.no_grad():
            out, _ = layer.experts(x, counts, probs)
        ref = _dense_experts_reference(layer.experts, layer.bank, x, counts.tolist(), probs)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@BANKS
def test_non_gated_mlp_reference_and_gate_refused(rank_pool):
    args = tiny_args(swiglu=False)
    chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=rank_pool))
    randomize_adapters(handle)
    layer = handle.layers[0]
    counts = torch.tensor([3, 0, 2, 4])
    x = torch.randn(9, args.hidden_size)
    probs = torch.rand(9)
    with torch.no_grad():
        out, _ = layer.experts(x, counts, probs)
    ref = _dense_experts_reference(layer.experts, layer.bank, x, counts.tolist(), probs,
                                   gated=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(DRLoRAInjectionError, match="gate"):
        build(args, DRLoRAConfig(budget=8, targets=("gate", "up")))


def _grouped_bank(targets=("up", "down"), num=3, hidden=8, ffn=6, r_max=6):
    cfg = DRLoRAConfig(budget=3, r_max=r_max, p_grow=0.5, targets=targets)
    model_cfg = types.SimpleNamespace(hidden_size=hidden, moe_ffn_hidden_size=ffn,
                                      ffn_hidden_size=ffn, gated_linear_unit=True)
    specs = projection_specs(cfg, model_cfg, 1, 0)
    bank = ExpertLoRABank(0, list(range(num)), num, specs, r_max, cfg.rank_init, cfg.scale)
    with torch.no_grad():
        for name in bank.projection_names:
            bank.factor(name, "B").normal_(0, 0.2)
    bank.set_ranks(torch.tensor([[1, 6], [0, 2], [5, 3]])[:num, :len(targets)])
    return bank


def grouped_reference(fc1_w, fc2_w, bank, x, counts, probs):
    """Per-expert dense computation with merged weights (fc1 [2F, H] = [gate; up])."""
    outs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x, counts), torch.split(probs, counts))):
        w1, w2 = fc1_w[e].double().clone(), fc2_w[e].double().clone()
        half = w1.shape[0] // 2
        for name in bank.projection_names:
            r = bank.rank(e, name)
            d = bank.scale * bank.factor(name, "B")[e, :, :r].double() @ \
                bank.factor(name, "A")[e, :r].double()
            if name == "up":
                w1[half:] += d
            else:
                w2 += d
        h = xe.double() @ w1.T
        outs.append((F.silu(h[:, :half]) * h[:, half:] * pe.double()[:, None]) @ w2.T)
    return torch.cat(outs)


@pytest.mark.parametrize("ffn,r_max", [(6, 6), (8, 8)], ids=["per-expert-loop", "grouped-mm"])
def test_grouped_linear_hooks_match_dense_reference(ffn, r_max):
    """The TEGroupedMLP path (hooks on grouped linears taking m_splits), with a CPU stand-in;
    widths of 6 fp32 are not 16-byte aligned (the per-expert loop), 8 run torch's grouped_mm."""
    bank = _grouped_bank(ffn=ffn, r_max=r_max)
    experts = torch.nn.Module()
    experts.linear_fc1 = CPUGroupedLinear(3, 8, 2 * ffn, seed=1)
    experts.linear_fc2 = CPUGroupedLinear(3, ffn, 8, seed=2)
    handles = attach.attach_to_grouped_linears(experts, bank, None)
    assert len(handles) == 2
    counts = [4, 0, 5]
    x = torch.randn(9, 8)
    probs = torch.rand(9)
    h, _ = experts.linear_fc1(x, counts)
    half = h.shape[-1] // 2
    act = F.silu(h[:, :half]) * h[:, half:] * probs[:, None]
    out, _ = experts.linear_fc2(act, counts)
    ref = grouped_reference(experts.linear_fc1.weight, experts.linear_fc2.weight, bank, x,
                             counts, probs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_legacy_grouped_mlp_matches_dense_reference(monkeypatch):
    """megatron-core's legacy GroupedMLP with a reference grouped GEMM standing in for the
    grouped_gemm CUDA kernel."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import experts as mexperts

    if not hasattr(mexperts, "GroupedMLP"):
        pytest.skip("legacy GroupedMLP was removed in this megatron-core (>= 0.19)")
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    def ref_gmm(x, w, counts, trans_b=False):
        pieces = torch.split(x, [int(c) for c in counts])
        return torch.cat([p @ (w[e].T if trans_b else w[e]) for e, p in enumerate(pieces)])

    monkeypatch.setattr(gg, "grouped_gemm", types.SimpleNamespace(), raising=False)
    args = tiny_args(moe_grouped_gemm=True)
    from megatron_drlora.modeling import transformer_config

    config = transformer_config(args)
    grouped = mexperts.GroupedMLP(4, config, ProcessGroupCollection.use_mpu_process_groups())
    torch.nn.init.normal_(grouped.weight1, std=0.1)
    torch.nn.init.normal_(grouped.weight2, std=0.1)
    cfg = DRLoRAConfig(budget=8)
    specs = projection_specs(cfg, config, 1, 0)
    bank = ExpertLoRABank(0, list(range(4)), 4, specs, cfg.rank_max, cfg.rank_init, cfg.scale)
    with torch.no_grad():
        for name in bank.projection_names:
            bank.factor(name, "B").normal_(0, 0.2)
    bank.set_ranks(torch.tensor([[1, 8], [0, 2], [5, 3], [4, 4]]))
    attach.attach_to_legacy_grouped(grouped, bank, None, gmm=ref_gmm)
    counts = torch.tensor([2, 3, 0, 4])
    x = torch.randn(9, args.hidden_size)
    probs = torch.rand(9)
    with torch.no_grad():
        out, _ = grouped(x, counts, probs)
    w1 = grouped.weight1.view(4, args.hidden_size, -1).transpose(1, 2)
    w2 = grouped.weight2.view(4, -1, args.hidden_size).transpose(1, 2)
    ref = grouped_reference(w1, w2, bank, x, counts.tolist(), probs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@BANKS
def test_inactive_ranks_get_zero_grad_active_ones_do_not(rank_pool):
    """(A pooled bank holds no inactive rank: its dense view is zero there by construction;
    what it checks there is that every active rank of a routed expert gets a gradient.)"""
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=rank_pool))
    rank_map = grown_rank_map(handle)
    rank_map[0, 1] = 0
    handle.set_rank_map(rank_map)
    randomize_adapters(handle)  # after: a pooled rank grown from r_init starts with B = 0
    tokens, pos, labels = batch(args, batch_size=4)
    loss = chunks[0](tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    routed = torch.zeros(handle.num_moe_layers, handle.num_experts, dtype=torch.bool)
    for layer in handle.layers:
        bank = layer.bank
        for j, name in enumerate(bank.projection_names):
            grads = dense_grads(bank)
            ga, gb = grads[name, "A"], grads[name, "B"]
            for e in range(4):
                r = int(rank_map[layer.moe_index, e, j])
                assert torch.count_nonzero(ga[e, r:]) == 0
                assert torch.count_nonzero(gb[e, :, r:]) == 0
                if r and torch.count_nonzero(ga[e, :r]):
                    routed[layer.moe_index, e] = True
                    assert torch.all(ga[e, :r].abs().sum(-1) > 0)
                    assert torch.all(gb[e, :, :r].abs().sum(0) > 0)
    assert routed.sum() >= 6  # most experts got tokens and gradients


def test_growth_does_not_change_output_after_training():
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8))
    model = chunks[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for step in range(3):
        tokens, pos, labels = batch(args, seed=step)
        opt.zero_grad()
        model(tokens, pos, None, labels=labels).float().mean().backward()
        opt.step()
    before = _logits(model, args, seed=9)
    rank_map = handle.initial_rank_map()
    rank_map[:, ::2] += 3
    handle.set_rank_map(rank_map)
    assert torch.equal(before, _logits(model, args, seed=9))


def test_lora_gets_gradients_with_full_recompute_and_frozen_base():
    args = tiny_args(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    chunks, handle = build(args, DRLoRAConfig(budget=8))
    randomize_adapters(handle)
    tokens, pos, labels = batch(args)
    chunks[0](tokens, pos, None, labels=labels).float().mean().backward()
    for layer in handle.layers:
        for p in layer.bank.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    frozen = [n for n, p in chunks[0].named_parameters()
              if not p.requires_grad and p.grad is not None]
    assert frozen == []


def test_no_moe_model_is_refused():
    args = tiny_args()
    chunks, _ = build(args)
    chunks[0].config.num_moe_experts = None
    try:
        with pytest.raises(DRLoRAInjectionError, match="no MoE layers"):
            apply_drlora(chunks, DRLoRAConfig(budget=8))
    finally:
        chunks[0].config.num_moe_experts = 4


@BANKS
def test_trainable_parameters_are_adapters_and_router_only(rank_pool):
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=rank_pool))
    names = [n for n, p in chunks[0].named_parameters() if p.requires_grad]
    assert all(".drlora." in n or ".router." in n for n in names)
    # 2 layers x (up, down) x (A, B), or 2 layers x (slots_hidden, slots_ffn)
    assert sum(".drlora." in n for n in names) == (2 * 2 if rank_pool else 2 * 4)
    chunks, handle = build(args, DRLoRAConfig(budget=8, router="frozen"))
    assert not any(".router." in n for n, p in chunks[0].named_parameters() if p.requires_grad)
