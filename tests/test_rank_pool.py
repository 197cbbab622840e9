"""--drlora-rank-pool (adapters/pool.py): the pooled bank computes the dense bank's model.

The reference is the dense ExpertLoRABank (itself checked against plain float64 merged-weight
products in test_adapters.py) with the same rank map and values: outputs, per-(expert, rank)
gradients, growth's init, the saliency statistics; plus the pool's own promises: free slots
stay exactly zero through AdamW with weight decay, and its memory is uniform LoRA at r_target.
"""

import functools
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_drlora import DRLoRAConfig
from megatron_drlora.adapters import experts as attach
from megatron_drlora.adapters.bank import ExpertLoRABank, init_seed, kaiming_uniform_a
from megatron_drlora.adapters.pool import PooledLoRABank, pool_capacity
from megatron_drlora.compat.optimizer import move_param_rows
from megatron_drlora.controller import DRLoRAController
from megatron_drlora.inject import projection_specs
from megatron_drlora.statistics import local_sensitivity
from tests.tiny import (CPUGroupedLinear, batch, build, dense_grads, randomize_adapters,
                        tiny_args)

pytestmark = pytest.mark.usefixtures("megatron_single")

# [MoE layer][expert][projection] within the layer budget 4 experts x 2 x r_target 8 = 64
RANKS = [[[3, 16], [0, 5], [12, 9], [8, 8]], [[1, 1], [16, 16], [2, 0], [7, 11]]]


def _pair(args, targets=("up", "down"), rank_map=RANKS, packed=False, **cfg):
    """A dense and a pooled model with the same base, rank map and adapter values. `packed`:
    the pool repacks at the rank change (as with an attached optimizer; here there is no
    optimizer state to move) and its forward slices; else the ranks take free slots and the
    forward gathers."""
    out = []
    for pool in (False, True):
        config = DRLoRAConfig(budget=8, targets=targets, rank_pool=pool, **cfg)
        chunks, handle = build(args, config)
        if pool and packed:
            for layer in handle.layers:
                layer.bank.row_mover = functools.partial(move_param_rows, None)
        handle.set_rank_map(torch.tensor(rank_map)[:, :, :len(targets)])
        if pool:
            assert all(layer.bank.packed == packed for layer in handle.layers)
        randomize_adapters(handle)
        out.append((chunks[0], handle))
    return out


def _loss(model, args, seed=0):
    tokens, pos, labels = batch(args, batch_size=4, seed=seed)
    return model(tokens, pos, None, labels=labels).float().mean()


def _assert_close_scaled(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual.double() - expected.double()).abs().max() <= rel * scale, \
        f"max diff {(actual - expected).abs().max()} vs scale {scale}"


@pytest.mark.parametrize("packed", [True, False], ids=["sliced", "gathered"])
@pytest.mark.parametrize("targets,gated", [(("up", "down"), True), (("gate", "up", "down"), True),
                                           (("up", "down"), False)],
                         ids=["up-down", "gate-up-down", "non-gated"])
def test_pool_forward_backward_equal_dense_bank(targets, gated, packed):
    args = tiny_args(swiglu=gated)
    rank_map = [[row + [row[0]] for row in layer] for layer in RANKS] if len(targets) == 3 \
        else RANKS
    if len(targets) == 3:  # keep within 4 x 3 x 8 = 96 per layer
        rank_map = [[[min(r, 8) for r in row] for row in layer] for layer in rank_map]
    (dense_model, dense), (pool_model, pool) = _pair(args, targets, rank_map, packed)
    loss_d, loss_p = _loss(dense_model, args), _loss(pool_model, args)
    loss_d.backward()
    loss_p.backward()
    _assert_close_scaled(loss_p.detach(), loss_d.detach(), 1e-6)
    for ld, lp in zip(dense.layers, pool.layers):
        gd, gp = dense_grads(ld.bank), dense_grads(lp.bank)
        for key in gd:
            assert torch.count_nonzero(gd[key]) > 0
            _assert_close_scaled(gp[key], gd[key])


def _grouped_banks(ffn, r_max, num=3, hidden=8):
    cfg = DRLoRAConfig(budget=r_max // 2, r_max=r_max, p_grow=0.5, rank_pool=True)
    model_cfg = types.SimpleNamespace(hidden_size=hidden, moe_ffn_hidden_size=ffn,
                                      ffn_hidden_size=ffn, gated_linear_unit=True)
    specs = projection_specs(cfg, model_cfg, 1, 0)
    ranks = torch.tensor([[1, r_max], [0, 2], [r_max - 1, 3]])
    dense = ExpertLoRABank(0, list(range(num)), num, specs, r_max, cfg.rank_init, cfg.scale)
    pool = PooledLoRABank(0, list(range(num)), num, specs, r_max, cfg.rank_init, cfg.scale,
                          capacity=int(ranks.sum()) + 2)
    g = torch.Generator().manual_seed(5)
    for bank in (dense, pool):
        bank.set_ranks(ranks)
    for name in dense.projection_names:
        b = torch.randn(dense.factor(name, "B").shape, generator=g) * 0.2
        dense.write_dense_factor(name, "B", b)
        pool.write_dense_factor(name, "B", b)
        pool.write_dense_factor(name, "A", dense.dense_factor(name, "A"))
    return dense, pool


@pytest.mark.parametrize("ffn,r_max", [(6, 6), (8, 8)], ids=["per-expert-loop", "grouped-mm"])
def test_grouped_hooks_pool_equal_dense_bank(ffn, r_max):
    """The TEGroupedMLP hook path; widths of 6 fp32 take the per-expert loop, 8 grouped_mm."""
    dense, pool = _grouped_banks(ffn, r_max)
    counts = [4, 0, 5]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=g)
    probs = torch.rand(9, generator=g)
    grad_out = torch.randn(9, 8, generator=g)
    results = []
    for bank in (dense, pool):
        experts = torch.nn.Module()
        experts.linear_fc1 = CPUGroupedLinear(3, 8, 2 * ffn, seed=1)
        experts.linear_fc2 = CPUGroupedLinear(3, ffn, 8, seed=2)
        attach.attach_to_grouped_linears(experts, bank, None)
        h, _ = experts.linear_fc1(x, counts)
        half = h.shape[-1] // 2
        out, _ = experts.linear_fc2(F.silu(h[:, :half]) * h[:, half:] * probs[:, None], counts)
        out.backward(grad_out)
        results.append((out.detach(), dense_grads(bank)))
    (out_d, grads_d), (out_p, grads_p) = results
    _assert_close_scaled(out_p, out_d, 1e-6)
    for key in grads_d:
        _assert_close_scaled(grads_p[key], grads_d[key])


def _literal_packing(rank_map, r_max):
    """Slot of (expert, projection, rank) when packed expert after expert, projection after
    projection, rank after rank: a counting loop."""
    table, slot = {}, 0
    for e, row in enumerate(rank_map):
        for j, r in enumerate(row):
            for k in range(r):
                table[e, j, k] = slot
                slot += 1
    return table, slot


def _dense_states(bank, opt):
    """{(projection, A|B, state): dense view} of the AdamW moments of a pooled bank."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        pool = {"slots_hidden": opt.state[bank.slots_hidden][key],
                "slots_ffn": opt.state[bank.slots_ffn][key]}
        for name in bank.projection_names:
            for which in ("A", "B"):
                out[name, which, key] = bank.dense_from(name, which, pool)
    return out


@pytest.mark.parametrize("attached", [True, False], ids=["repacked", "free-slots"])
def test_growth_writes_the_dense_init_and_keeps_outputs_states_and_free_slots(attached):
    """A growth after three AdamW steps: the model's output is unchanged, grown ranks hold the
    dense bank's init (B zero) with zero moments, kept ranks keep their values and moments
    wherever they now live, free slots stay zero. With the optimizer attached the slots are
    repacked (expert, projection, rank: a literal count) so the forward slices; without it
    grown ranks take the lowest free slots and nothing moves."""
    args = tiny_args()
    config = DRLoRAConfig(budget=8, rank_pool=True, grow_interval=10, grow_buffer=0)
    chunks, handle = build(args, config)
    model = chunks[0]
    controller = DRLoRAController(handle, train_iters=100, warmup_iters=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if attached:
        controller.attach_optimizer(opt)
    for step in range(3):
        opt.zero_grad()
        _loss(model, args, seed=step).backward()
        opt.step()
    banks = [layer.bank for layer in handle.layers]
    for bank in banks:  # r_init 4 x 4 experts x 2 of 64 slots used, the rest exactly zero
        free = torch.tensor(bank._free)
        assert len(free) == bank.capacity - 32
        for p in (bank.slots_hidden, bank.slots_ffn):
            assert torch.count_nonzero(p.detach()[free]) == 0
            assert torch.count_nonzero(opt.state[p]["exp_avg"][free]) == 0
    before = _loss(model, args, seed=9).detach()
    free_before = [set(bank._free) for bank in banks]
    values_before = [{(n, w): bank.dense_factor(n, w) for n in bank.projection_names
                      for w in "AB"} for bank in banks]
    states_before = [_dense_states(bank, opt) for bank in banks]
    rank_map = handle.initial_rank_map()
    rank_map[:, ::2] += 3
    rank_map[:, 1, 1] += 2
    handle.set_rank_map(rank_map)
    assert torch.equal(before, _loss(model, args, seed=9).detach())
    for i, (bank, was_free) in enumerate(zip(banks, free_before)):
        states = _dense_states(bank, opt)
        for name in bank.projection_names:
            a = bank.dense_factor(name, "A")
            for which in "AB":
                now, was = bank.dense_factor(name, which), values_before[i][name, which]
                for e in range(len(bank.global_expert_ids)):
                    keep = (slice(e, e + 1), slice(0, 4)) if which == "A" else \
                        (slice(e, e + 1), slice(None), slice(0, 4))
                    assert torch.equal(now[keep], was[keep])
                    for key in ("exp_avg", "exp_avg_sq"):
                        got = states[name, which, key]
                        assert torch.equal(got[keep], states_before[i][name, which, key][keep])
                        grown = (e, slice(4, None)) if which == "A" else \
                            (e, slice(None), slice(4, None))
                        assert torch.count_nonzero(got[grown]) == 0
            for e, expert in enumerate(bank.global_expert_ids):
                r0, r1 = 4, bank.rank(e, name)
                if r1 == r0:
                    continue
                spec = bank.specs[name]
                want = kaiming_uniform_a(bank.r_max, spec.in_features,
                                         init_seed(config.seed, bank.layer, expert, name))
                assert torch.equal(a[e, r0:r1], want[r0:r1].float())
                assert torch.count_nonzero(bank.dense_factor(name, "B")[e, :, r0:r1]) == 0
        free = torch.tensor(bank._free)
        assert len(free) == bank.capacity - 32 - 3 * 2 * 2 - 2
        for p in (bank.slots_hidden, bank.slots_ffn):
            assert torch.count_nonzero(p.detach()[free]) == 0
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.count_nonzero(opt.state[p][key][free]) == 0
        literal, used = _literal_packing(bank.ranks.tolist(), bank.r_max)
        packed = {(e, j, k): int(bank._table[e, j, k]) for e, j, k in literal}
        if attached:
            assert packed == literal and bank.packed and bank._free[0] == used
        else:  # the original slots stay, the grown ranks took the lowest free ones
            assert not bank.packed
            taken = sorted(was_free - set(bank._free))
            assert taken == sorted(was_free)[:len(taken)]


def test_free_slots_stay_zero_and_training_matches_dense_bank():
    """Three AdamW steps (weight decay 0: the dense bank's inactive A rows would decay
    otherwise, while a pooled rank starts from the true init) give the same logits."""
    args = tiny_args()
    models = _pair(args)
    logits = []
    for model, handle in models:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                weight_decay=0.0)
        for step in range(3):
            opt.zero_grad()
            _loss(model, args, seed=step).backward()
            opt.step()
        tokens, pos, _ = batch(args, seed=11)
        with torch.no_grad():
            logits.append(model(tokens, pos, None))
        if handle.layers[0].bank.pooled:
            for bank in (layer.bank for layer in handle.layers):
                free = torch.tensor(bank._free, dtype=torch.int64)
                assert torch.count_nonzero(bank.slots_hidden.detach()[free]) == 0
                assert torch.count_nonzero(bank.slots_ffn.detach()[free]) == 0
    _assert_close_scaled(logits[1], logits[0], 1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["sliced", "gathered"])
def test_statistics_equal_dense_bank(packed):
    args = tiny_args()
    results = []
    for model, handle in _pair(args, packed=packed):
        _loss(model, args).backward()
        results.append(local_sensitivity(handle, lambda b, n: True, lambda b, n: True))
    (a_d, b_d), (a_p, b_p) = results
    assert torch.count_nonzero(a_d) > 20
    torch.testing.assert_close(a_p, a_d, rtol=1e-5, atol=0)
    torch.testing.assert_close(b_p, b_d, rtol=1e-5, atol=0)


def test_pool_memory_is_uniform_lora_at_r_target():
    args = tiny_args()
    # global scope, 2 layers: a layer may take the budget the other leaves above r_init:
    # 2 x 8 x 8 - 8 x 4 = 96 slots of each layer's 64 at r_target
    for allocation, ratio in (("layer", 1.0), ("global", 1.5)):
        config = DRLoRAConfig(budget=8, rank_pool=True, allocation=allocation)
        _, handle = build(args, config)
        pooled = sum(p.numel() for p in handle.lora_parameters())
        uniform = 2 * 4 * 2 * 8 * (args.hidden_size + args.ffn_hidden_size)
        assert pooled == ratio * uniform, (allocation, pooled, uniform)
        text = handle.summary_text()
        assert "rank pool: " in text
        # the allocated parameters are the pool's (independently: the count above), not r_max's
        assert f"allocated {pooled:,} in rank-pool slots" in text, text


def test_pool_capacity_bounds():
    """The bounds docs/design.md states: EP=1 the layer budget (1.0x uniform r_target), EP=2
    1.5x that rank's share, EP=4 2.0x (r_max: no saving), a fixed map its sum."""
    cfg = DRLoRAConfig(budget=8, r_init=4, r_max=16)
    # (local experts, slots, uniform r_target share) of 64 experts x 2 projections
    for local, slots, share in ((64, 1024, 1024), (32, 768, 512), (16, 512, 256)):
        assert pool_capacity(cfg, 64, local, 2, 16) == slots
        assert local * 2 * 8 == share
    assert pool_capacity(cfg, 64, 8, 2, 16, fixed_local_sum=100) == 100
    # global scope over 16 layers at EP=1: one layer may reach r_max everywhere
    assert pool_capacity(DRLoRAConfig(budget=8, r_init=4, r_max=16, allocation="global"),
                         64, 64, 2, 16) == 64 * 2 * 16
    # --drlora-rank-pool-capacity F: F x the rank's share, never above the bound
    capped = DRLoRAConfig(budget=8, r_init=4, r_max=16, rank_pool=True, rank_pool_capacity=1.1)
    for local, share, bound in ((64, 1024, 1024), (32, 512, 768), (16, 256, 512)):
        assert pool_capacity(capped, 64, local, 2, 16) == min(bound, int(1.1 * share))


def test_pool_refuses_a_rank_map_over_its_capacity():
    args = tiny_args()
    _, handle = build(args, DRLoRAConfig(budget=8, rank_pool=True))
    too_big = torch.full(handle.rank_map_shape(), 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="rank slots"):
        handle.set_rank_map(too_big)


def test_checkpoint_round_trip_in_the_dense_format(tmp_path):
    """A pooled run saves the dense bank's keys: it loads back into a pooled model (same
    factors, same logits) and into a dense one (same active factors and logits; inactive
    A-rows hold their init, so the dense run can still grow)."""
    from megatron_drlora.checkpoint import load_adapters
    from tests.tiny import save_adapter_checkpoint

    args = tiny_args()
    (_, _), (model, pool) = _pair(args)
    rank_map = torch.tensor(RANKS)
    save_adapter_checkpoint(str(tmp_path), 3, [model], pool, rank_map)
    tokens, pos, _ = batch(args, seed=4)
    with torch.no_grad():
        want = model(tokens, pos, None)
    for rank_pool in (True, False):
        chunks, handle = build(args, DRLoRAConfig(budget=8, rank_pool=rank_pool))
        load_adapters(str(tmp_path), chunks, handle)
        assert torch.equal(handle.local_rank_map(), rank_map)
        with torch.no_grad():
            torch.testing.assert_close(chunks[0](tokens, pos, None), want, rtol=0, atol=1e-6)
        for saved, loaded in zip(pool.layers, handle.layers):
            for j, name in enumerate(saved.bank.projection_names):
                for which in ("A", "B"):
                    a, b = saved.bank.dense_factor(name, which), loaded.bank.dense_factor(name,
                                                                                         which)
                    for e in range(4):
                        r = int(rank_map[saved.moe_index, e, j])
                        if which == "A":
                            assert torch.equal(a[e, :r], b[e, :r])
                            if not rank_pool:  # the dense bank's inactive rows: the init
                                assert torch.equal(b[e, r:],
                                                   saved.bank.init_rows(e, name)[r:].float())
                        else:
                            assert torch.equal(a[e, :, :r], b[e, :, :r])
                            assert torch.count_nonzero(b[e, :, r:]) == 0


def test_a_saved_slot_table_that_does_not_fit_is_packed_canonically():
    """Two EP ranks' tables loaded by one process collide (both used slot 0): the ranks they
    imply are packed expert-major; a table that fits is kept as saved (the distributed
    optimizer's dp_reshardable states are in its slot order)."""
    from megatron_drlora.pool_checkpoint import PoolCheckpointError, resolve_table

    bank = types.SimpleNamespace(capacity=8, r_max=3, layer=0)
    half = torch.tensor([[[1, 0, -1]], [[2, -1, -1]]])  # one EP rank: 2 experts x 1 projection
    assert torch.equal(resolve_table(bank, half), half)
    both = torch.cat([half, half])
    assert torch.equal(resolve_table(bank, both),
                       torch.tensor([[[0, 1, -1]], [[2, -1, -1]], [[3, 4, -1]], [[5, -1, -1]]]))
    with pytest.raises(PoolCheckpointError, match="rank slots"):
        resolve_table(types.SimpleNamespace(capacity=4, r_max=3, layer=0), both)


def test_a_fixed_rank_map_gets_exactly_its_slots():
    """--drlora-rank-map (no growth): each layer's pool holds that layer's sum, and the run
    computes the dense bank's model with that map."""
    args = tiny_args()
    rank_map = [[[2, 12], [0, 6], [9, 9], [8, 2]], [[1, 1], [16, 16], [2, 0], [7, 11]]]
    models = []
    for pool in (False, True):
        chunks, handle = build(args, DRLoRAConfig(budget=8, rank_map=rank_map, rank_pool=pool))
        controller = DRLoRAController(handle, train_iters=10, warmup_iters=0)
        assert torch.equal(controller.rank_map, torch.tensor(rank_map))
        randomize_adapters(handle)
        models.append((chunks[0], handle))
    assert [l.bank.capacity for l in models[1][1].layers] == [48, 54]
    losses = [_loss(model, args).detach() for model, _ in models]
    _assert_close_scaled(losses[1], losses[0], 1e-6)


def test_an_optimizer_the_pool_cannot_reach_is_refused_when_attached():
    """The precision-aware optimizer keeps its main params where DR-LoRA cannot write a grown
    rank: refused when the optimizer is attached (before the first step), naming the flag and
    the way out; the same optimizer without the flag is accepted."""
    from megatron_drlora.compat.optimizer import UnsupportedOptimizer

    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, grow_interval=10, grow_buffer=0))
    controller = DRLoRAController(handle, train_iters=100, warmup_iters=0)
    params = [p for p in chunks[0].parameters() if p.requires_grad]
    for flag, refused in ((True, True), (False, False)):
        wrapped = types.SimpleNamespace(
            optimizer=torch.optim.Adam(params),
            config=types.SimpleNamespace(use_precision_aware_optimizer=flag))
        if refused:
            with pytest.raises(UnsupportedOptimizer,
                               match="--use-precision-aware-optimizer.*--no-drlora-rank-pool"):
                controller.attach_optimizer(wrapped)
        else:
            controller.attach_optimizer(wrapped)
            assert handle.layers[0].bank.row_mover is not None
