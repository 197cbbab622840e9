"""SaliencyState EMAs (Eq. 5-9) on hand-computed examples, and rank_sensitivity_l1."""

import pytest
import torch

from megatron_drlora.saliency import SaliencyState, rank_sensitivity_l1, statistics_are_finite

F64 = torch.float64


def full(shape, value):
    return torch.full(shape, float(value), dtype=F64)


def test_initial_state():
    s = SaliencyState(2, 3, 2, 4)
    assert s.frequency.shape == (2, 3) and s.frequency.dtype == F64
    assert s.importance.shape == (2, 3, 2, 4) and s.importance.dtype == F64
    assert s.updates == 0 and not s.frequency.any() and not s.importance.any()


def test_frequency_ema_hand_computed():
    s = SaliencyState(2, 2, 1, 2)
    ranks = torch.ones(2, 2, 1, dtype=torch.int64)
    # Layer 0: 10 tokens, experts got weights 4 and 6 -> w = 0.4, 0.6. Layer 1: no tokens -> 0.
    s.update(torch.tensor([[4.0, 6.0], [3.0, 1.0]]), torch.tensor([10, 0]), None, None, ranks, 0.9)
    assert torch.allclose(s.frequency, torch.tensor([[0.04, 0.06], [0.0, 0.0]], dtype=F64))
    s.update(torch.tensor([[2.0, 8.0], [3.0, 1.0]]), torch.tensor([10, 4]), None, None, ranks, 0.9)
    expected = torch.tensor([[0.9 * 0.04 + 0.1 * 0.2, 0.9 * 0.06 + 0.1 * 0.8],
                             [0.1 * 0.75, 0.1 * 0.25]], dtype=F64)
    assert torch.allclose(s.frequency, expected, rtol=0, atol=1e-15)
    assert s.updates == 2
    assert not s.importance.any()  # no gradient statistics given


def test_importance_ema_only_active_slots():
    s = SaliencyState(1, 2, 2, 3)
    ranks = torch.tensor([[[2, 0], [3, 1]]])
    l1_a = torch.arange(1, 13, dtype=torch.float32).reshape(1, 2, 2, 3)
    l1_b = full((1, 2, 2, 3), 2.0)
    s.update(torch.zeros(1, 2), torch.tensor([5]), l1_a, l1_b, ranks, 0.5)
    g = s.importance[0]
    # expert 0: up has slots 0,1 active (a = 1, 2); down inactive. expert 1: up all, down slot 0.
    assert g[0, 0].tolist() == [0.5 * 1 * 2, 0.5 * 2 * 2, 0.0]
    assert g[0, 1].tolist() == [0.0, 0.0, 0.0]
    assert g[1, 0].tolist() == [0.5 * 7 * 2, 0.5 * 8 * 2, 0.5 * 9 * 2]
    assert g[1, 1].tolist() == [0.5 * 10 * 2, 0.0, 0.0]
    # Second step with fewer active slots: the dropped slot keeps its value untouched.
    fewer = torch.tensor([[[1, 0], [3, 1]]])
    s.update(torch.zeros(1, 2), torch.tensor([5]), l1_a, l1_b, fewer, 0.5)
    assert s.importance[0, 0, 0].tolist() == [0.5 * 1.0 + 0.5 * 1 * 2, 2.0, 0.0]


@pytest.mark.parametrize("bad", ["importance_nan", "importance_inf", "routed_nan", "tokens_inf"])
def test_non_finite_statistics_leave_the_emas_unchanged(bad):
    s = SaliencyState(1, 2, 2, 3)
    ranks = torch.tensor([[[2, 1], [3, 3]]])
    routed, tokens = torch.tensor([[3.0, 1.0]]), torch.tensor([4.0])
    l1_a, l1_b = full((1, 2, 2, 3), 1.5), full((1, 2, 2, 3), 2.0)
    assert s.update(routed, tokens, l1_a, l1_b, ranks, 0.9) is True
    before = (s.frequency.clone(), s.importance.clone(), s.updates)
    if bad == "importance_nan":
        l1_a = l1_a.clone()
        l1_a[0, 1, 0, 0] = float("nan")
    elif bad == "importance_inf":
        l1_b = l1_b.clone()
        l1_b[0, 0, 1, 0] = float("inf")
    elif bad == "routed_nan":
        routed = torch.tensor([[float("nan"), 1.0]])
    else:
        tokens = torch.tensor([float("inf")])
    assert s.update(routed, tokens, l1_a, l1_b, ranks, 0.9) is False
    assert torch.equal(s.frequency, before[0]) and torch.equal(s.importance, before[1])
    assert s.updates == before[2]
    assert torch.isfinite(s.saliency(ranks)).all()


def test_statistics_are_finite():
    assert statistics_are_finite(torch.ones(2), None, torch.zeros(1, 3))
    assert not statistics_are_finite(torch.ones(2), torch.tensor([1.0, float("-inf")]))
    assert not statistics_are_finite(torch.tensor([float("nan")], dtype=F64))


def test_expert_importance_and_rank():
    s = SaliencyState(1, 3, 2, 4)
    s.importance[0, 0, 0] = torch.tensor([1.0, 3.0, 100.0, 100.0], dtype=F64)  # rank 2 -> 2
    s.importance[0, 0, 1] = torch.tensor([6.0, 0.0, 0.0, 100.0], dtype=F64)    # rank 3 -> 2
    s.importance[0, 1, 0] = torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=F64)      # rank 4 -> 5
    s.importance[0, 1, 1] = torch.tensor([9.0, 9.0, 9.0, 9.0], dtype=F64)      # rank 0 -> 0
    ranks = torch.tensor([[[2, 3], [4, 0], [0, 0]]])
    assert s.expert_importance(ranks).tolist() == [[2.0, 2.5, 0.0]]
    assert s.expert_rank(ranks).tolist() == [[2.5, 2.0, 0.0]]


def test_saliency_variants():
    s = SaliencyState(1, 2, 1, 4)
    s.frequency[:] = torch.tensor([[0.2, 0.5]], dtype=F64)
    s.importance[0, :, 0, :2] = torch.tensor([[4.0, 2.0], [1.0, 1.0]], dtype=F64)
    ranks = torch.tensor([[[2], [3]]])
    g = torch.tensor([3.0, 2.0 / 3.0], dtype=F64)
    f = torch.tensor([0.2, 0.5], dtype=F64)
    pen = torch.tensor([3.0, 4.0], dtype=F64) ** 1.2
    assert torch.allclose(s.saliency(ranks, "full", 1.2)[0], f * g / pen)
    assert torch.allclose(s.saliency(ranks, "frequency", 1.2)[0], f / pen)
    assert torch.allclose(s.saliency(ranks, "importance", 1.2)[0], g / pen)
    assert torch.allclose(s.saliency(ranks, "full", 0)[0], f * g)  # no-penalty ablation
    assert s.saliency(ranks).dtype == F64
    with pytest.raises(ValueError, match="--drlora-saliency"):
        s.saliency(ranks, "entropy")


def test_frequency_variant_not_aliased():
    s = SaliencyState(1, 1, 1, 1)
    out = s.saliency(torch.ones(1, 1, 1, dtype=torch.int64), "frequency", 0.0)
    out += 5
    assert s.frequency.item() == 0.0


def test_reset_importance_keeps_frequency():
    s = SaliencyState(3, 2, 1, 2)
    s.frequency.fill_(0.3)
    s.importance.fill_(1.0)
    s.reset_importance([0, 2])
    assert s.importance[0].abs().sum() == 0 and s.importance[2].abs().sum() == 0
    assert (s.importance[1] == 1.0).all() and (s.frequency == 0.3).all()
    s.reset_importance()
    assert not s.importance.any() and (s.frequency == 0.3).all()
    s.reset_importance([])
    with pytest.raises(ValueError, match="out of range"):
        s.reset_importance([3])


def test_state_dict_round_trip():
    s = SaliencyState(2, 3, 2, 4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        s.update(torch.rand(2, 3, generator=g), torch.tensor([7, 9]),
                 torch.rand(2, 3, 2, 4, generator=g), torch.rand(2, 3, 2, 4, generator=g),
                 torch.randint(0, 5, (2, 3, 2), generator=g), 0.9)
    sd = s.state_dict()
    t = SaliencyState(2, 3, 2, 4)
    t.load_state_dict(sd)
    assert torch.equal(t.frequency, s.frequency) and torch.equal(t.importance, s.importance)
    assert t.updates == 3
    sd["frequency"].fill_(7.0)  # the state dict is a copy, not a view
    assert not (s.frequency == 7.0).any()


@pytest.mark.parametrize("key,value,match", [
    ("frequency", torch.zeros(2, 4, dtype=F64), "frequency"),
    ("importance", torch.zeros(2, 3, 2, 5, dtype=F64), "--drlora-rank-max"),
])
def test_load_state_dict_validates(key, value, match):
    s = SaliencyState(2, 3, 2, 4)
    sd = s.state_dict()
    sd[key] = value
    with pytest.raises(ValueError, match=match):
        s.load_state_dict(sd)
    del sd[key]
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict(sd)


def test_update_validates_shapes_and_beta():
    s = SaliencyState(1, 2, 1, 2)
    ranks = torch.ones(1, 2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="routed_sum"):
        s.update(torch.zeros(2, 2), torch.ones(1), None, None, ranks, 0.9)
    with pytest.raises(ValueError, match="tokens"):
        s.update(torch.zeros(1, 2), torch.ones(2), None, None, ranks, 0.9)
    with pytest.raises(ValueError, match="both"):
        s.update(torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2, 1, 2), None, ranks, 0.9)
    with pytest.raises(ValueError, match="l1_b"):
        s.update(torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2, 1, 2),
                 torch.zeros(1, 2, 1, 3), ranks, 0.9)
    with pytest.raises(ValueError, match="beta"):
        s.update(torch.zeros(1, 2), torch.ones(1), None, None, ranks, 1.0)
    with pytest.raises(ValueError, match="num_layers"):
        SaliencyState(0, 2, 1, 2)


def _naive_l1(grad, weight, rank_dim):
    E, R = grad.shape[0], grad.shape[rank_dim]
    out = torch.zeros(E, R, dtype=F64)
    for e in range(E):
        for j in range(R):
            g = grad[e].select(rank_dim - 1, j).double()
            w = weight[e].select(rank_dim - 1, j).double()
            out[e, j] = sum(abs(x * y) for x, y in zip(g.flatten().tolist(), w.flatten().tolist()))
    return out


def test_rank_sensitivity_l1_matches_loops():
    g = torch.Generator().manual_seed(3)
    E, R, k, d = 3, 5, 7, 4
    a, ga = torch.randn(E, R, k, generator=g), torch.randn(E, R, k, generator=g)
    b, gb = torch.randn(E, d, R, generator=g), torch.randn(E, d, R, generator=g)
    la = rank_sensitivity_l1(ga, a, rank_dim=1)
    lb = rank_sensitivity_l1(gb, b, rank_dim=2)
    assert la.shape == (E, R) and lb.shape == (E, R) and la.dtype == F64
    assert torch.allclose(la, _naive_l1(ga, a, 1), rtol=1e-12, atol=0)
    assert torch.allclose(lb, _naive_l1(gb, b, 2), rtol=1e-12, atol=0)
    assert torch.equal(rank_sensitivity_l1(gb, b, rank_dim=-1), lb)


def test_rank_sensitivity_l1_accumulates_in_float64():
    # bf16 inputs: the product is formed in float64, so no bf16 rounding of the sum.
    grad = torch.full((1, 2, 4096), 1.0, dtype=torch.bfloat16)
    weight = torch.full((1, 2, 4096), 1.0 + 2 ** -7, dtype=torch.bfloat16)
    out = rank_sensitivity_l1(grad, weight, 1)
    assert out.dtype == F64 and out[0, 0].item() == 4096 * (1.0 + 2 ** -7)


def test_rank_sensitivity_l1_errors():
    with pytest.raises(ValueError, match="differs"):
        rank_sensitivity_l1(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), 1)
    with pytest.raises(ValueError, match="expert dim"):
        rank_sensitivity_l1(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 0)


def test_end_to_end_with_sensitivity_feeds_saliency():
    # One layer, two experts, one module each, r_max 2, rank 1: only slot 0 counts.
    E, R, k, d = 2, 2, 3, 2
    a = torch.ones(E, R, k)
    ga = torch.tensor([[[1.0] * k, [50.0] * k], [[2.0] * k, [50.0] * k]])
    b = torch.ones(E, d, R)
    gb = torch.ones(E, d, R)
    l1_a = rank_sensitivity_l1(ga, a, 1)[None, :, None, :]  # [1, E, 1, R]
    l1_b = rank_sensitivity_l1(gb, b, 2)[None, :, None, :]
    s = SaliencyState(1, E, 1, R)
    ranks = torch.ones(1, E, 1, dtype=torch.int64)
    s.update(torch.tensor([[1.0, 1.0]]), torch.tensor([2]), l1_a, l1_b, ranks, 0.0)
    # s_0 = (k * |ga|) * d: expert 0 -> 3 * 2 = 6, expert 1 -> 6 * 2 = 12; f = 0.5 each.
    assert s.expert_importance(ranks).tolist() == [[6.0, 12.0]]
    assert s.saliency(ranks, "full", 1.0).tolist() == [[0.5 * 6 / 2, 0.5 * 12 / 2]]
