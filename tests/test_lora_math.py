"""The grouped / per-expert LoRA delta equals the dense merged-weight reference."""

import torch

from megatron_drlora.adapters.lora_math import (add_to_fc1_half, dense_reference,
                                                grouped_lora_delta, lora_delta)


def _factors(num_experts=3, r_max=8, k=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_experts, r_max, k, generator=g, dtype=torch.float64)
    b = torch.randn(num_experts, d, r_max, generator=g, dtype=torch.float64)
    return a, b


def test_lora_delta_matches_dense_weight():
    a, b = _factors()
    x = torch.randn(7, 6, dtype=torch.float64)
    w = torch.randn(5, 6, dtype=torch.float64)
    for rank in (0, 1, 5, 8):
        merged = dense_reference(w, a[0], b[0], rank, 2.0)
        got = x @ w.T + lora_delta(x, a[0], b[0], rank, 2.0)
        torch.testing.assert_close(got, x @ merged.T, rtol=1e-12, atol=1e-12)


def test_grouped_delta_matches_per_expert_reference_random_routing():
    a, b = _factors(num_experts=4)
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        counts = torch.randint(0, 6, (4,), generator=g).tolist()
        ranks = torch.randint(0, 9, (4,), generator=g).tolist()
        x = torch.randn(sum(counts), 6, generator=g, dtype=torch.float64)
        got = grouped_lora_delta(x, counts, a, b, ranks, 0.5)
        pieces = []
        for e, chunk in enumerate(torch.split(x, counts)):
            delta_w = 0.5 * b[e][:, :ranks[e]] @ a[e][:ranks[e]]
            pieces.append(chunk @ delta_w.T)
        torch.testing.assert_close(got, torch.cat(pieces), rtol=1e-12, atol=1e-12)


def test_grouped_delta_rejects_bad_splits():
    a, b = _factors()
    x = torch.randn(4, 6, dtype=torch.float64)
    try:
        grouped_lora_delta(x, [1, 1, 1], a, b, [1, 1, 1], 1.0)
    except ValueError as e:
        assert "tokens_per_expert sums to 3" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_inactive_slots_get_exact_zero_gradient():
    a, b = _factors()
    a.requires_grad_(True)
    b.requires_grad_(True)
    x = torch.randn(9, 6, dtype=torch.float64)
    out = grouped_lora_delta(x, [3, 3, 3], a, b, [2, 0, 8], 1.0)
    out.square().sum().backward()
    assert torch.count_nonzero(a.grad[0, 2:]) == 0 and torch.count_nonzero(b.grad[0, :, 2:]) == 0
    assert torch.count_nonzero(a.grad[1]) == 0 and torch.count_nonzero(b.grad[1]) == 0
    assert torch.all(a.grad[0, :2].abs().sum(-1) > 0) and torch.all(a.grad[2].abs().sum(-1) > 0)


def test_fc1_halves():
    out = torch.zeros(2, 8)
    delta = torch.ones(2, 4)
    assert add_to_fc1_half(out, delta, "up")[:, 4:].eq(1).all()
    assert add_to_fc1_half(out, delta, "up")[:, :4].eq(0).all()
    assert add_to_fc1_half(out, delta, "gate")[:, :4].eq(1).all()
    assert add_to_fc1_half(out, torch.ones(2, 8), None).eq(1).all()
