"""Grouped experts' LoRA branch: a kernel count independent of the number of local experts,
and the same values and gradients as per-expert prefix products.

The op counts are taken at the ATen dispatch level (forward and backward) at 4 and 32 local
experts with heterogeneous ranks, an expert without tokens included; the reference is written
here with plain float64 matmuls per expert (no megatron_drlora code).
"""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_drlora.adapters import lora_math
from megatron_drlora.adapters.lora_math import grouped_lora_delta

pytestmark = pytest.mark.skipif(lora_math._GROUPED_MM is None,
                                reason="this torch has no torch.nn.functional.grouped_mm")


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _case(num_experts, tokens=64, k=16, d=24, r_max=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(num_experts), tokens, replacement=True,
                               generator=g).bincount(minlength=num_experts)
    counts[1] += counts[0]
    counts[0] = 0  # an expert without tokens
    ranks = torch.randint(0, r_max + 1, (num_experts,), generator=g)
    ranks[:3] = torch.tensor([2, r_max, 0])  # heterogeneous, full and empty ranks included
    x = torch.randn(tokens, k, generator=g).to(dtype)
    a = (torch.randn(num_experts, r_max, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(num_experts, d, r_max, generator=g) / r_max ** 0.5).to(dtype)
    grad_out = torch.randn(tokens, d, generator=g).to(dtype)
    return x, counts.tolist(), a, b, ranks.tolist(), grad_out


def _run(x, counts, a, b, ranks, grad_out, scale=0.5, **kw):
    x, a, b = (t.clone().requires_grad_(True) for t in (x, a, b))
    out = grouped_lora_delta(x, counts, a, b, ranks, scale, **kw)
    out.backward(grad_out)
    return out.detach(), x.grad, a.grad, b.grad


def _count_ops(num_experts, dtype=torch.float32, **kw):
    x, counts, a, b, ranks, grad_out = _case(num_experts, dtype=dtype)
    ranks_device = torch.tensor(ranks)
    x, a, b = (t.clone().requires_grad_(True) for t in (x, a, b))
    with OpCounter() as counter:
        out = grouped_lora_delta(x, counts, a, b, ranks, 0.5, ranks_device=ranks_device, **kw)
        out.backward(grad_out)
    assert a.grad is not None and b.grad is not None and x.grad is not None
    return counter.ops


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_op_count_does_not_grow_with_local_experts(dropout):
    few = _count_ops(4, dropout=dropout, training=True)
    many = _count_ops(32, dropout=dropout, training=True)
    assert few == many, f"4 experts: {dict(few)}\n32 experts: {dict(many)}"
    assert few["_grouped_mm"] == 6 and sum(few.values()) <= 48, dict(few)  # 2 fwd, 4 bwd


def test_op_counter_sees_the_per_expert_loop():
    """Not vacuous: the float64 fallback (a per-expert loop) issues more ops at 32 experts."""
    few = sum(_count_ops(4, dtype=torch.float64).values())
    many = sum(_count_ops(32, dtype=torch.float64).values())
    assert many > few + 28 * 3, (few, many)


def _reference(x, counts, a, b, ranks, grad_out, scale=0.5):
    """Per-expert float64 prefix products: scale * x_e A_e[:r]^T B_e[:, :r]^T."""
    x, a, b = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    pieces = []
    for e, x_e in enumerate(torch.split(x, counts)):
        r = ranks[e]
        pieces.append(scale * (x_e @ a[e, :r].T) @ b[e, :, :r].T)
    out = torch.cat(pieces)
    out.backward(grad_out.double())
    return out.detach(), x.grad, a.grad, b.grad


def _assert_close_to_scale(got, ref, what, rel=2e-6):
    assert got.shape == ref.shape, what
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _check_against_reference(x, counts, a, b, ranks, grad_out, rel=2e-6, **kw):
    got = _run(x, counts, a, b, ranks, grad_out, **kw)
    ref = _reference(x, counts, a, b, ranks, grad_out)
    for what, g, r in zip(("output", "x grad", "A grad", "B grad"), got, ref):
        _assert_close_to_scale(g, r, what, rel)
    _, _, ga, gb = got
    for e, r in enumerate(ranks):
        assert torch.count_nonzero(ga[e, r:]) == 0 and torch.count_nonzero(gb[e, :, r:]) == 0
        if counts[e] and r:
            assert torch.all(ga[e, :r].abs().sum(-1) > 0), e
            assert torch.all(gb[e, :, :r].abs().sum(0) > 0), e


@pytest.mark.parametrize("num_experts", [4, 32])
def test_grouped_equals_per_expert_reference(num_experts):
    x, counts, a, b, ranks, grad_out = _case(num_experts, seed=num_experts)
    assert lora_math._grouped_width(x, a, b, ranks) is not None  # the grouped kernels run
    _check_against_reference(x, counts, a, b, ranks, grad_out)
    _check_against_reference(x, counts, a, b, ranks, grad_out,
                             ranks_device=torch.tensor(ranks))


@pytest.mark.parametrize("shape", ["one-expert-has-all", "one-token", "equal-ranks",
                                   "unaligned-max-rank", "tensor-counts", "unaligned-k"])
def test_grouped_edge_cases(shape):
    x, counts, a, b, ranks, grad_out = _case(6, tokens=20, seed=7)
    kw = {}
    if shape == "one-expert-has-all":
        counts = [0, 0, 0, 20, 0, 0]
    elif shape == "one-token":
        x, grad_out, counts = x[:1], grad_out[:1], [0, 1, 0, 0, 0, 0]
    elif shape == "equal-ranks":
        ranks = [8] * 6
    elif shape == "unaligned-max-rank":
        ranks = [3, 5, 0, 1, 2, 5]  # runs at width 8 (16 bytes of fp32), masked to each rank
        assert lora_math._grouped_width(x, a, b, ranks) == 8
    elif shape == "tensor-counts":  # the legacy GroupedMLP's tokens_per_expert
        kw["counts_as_tensor"] = True
    elif shape == "unaligned-k":  # strides not 16-byte aligned: the per-expert loop
        x, a = x[:, :14].contiguous(), a[:, :, :14].contiguous()
        assert lora_math._grouped_width(x, a, b, ranks) is None
    if kw.pop("counts_as_tensor", False):
        got = _run(x, torch.tensor(counts), a, b, ranks, grad_out)
        ref = _reference(x, counts, a, b, ranks, grad_out)
        for g, r in zip(got, ref):
            _assert_close_to_scale(g, r, shape)
        return
    _check_against_reference(x, counts, a, b, ranks, grad_out)


def test_no_tokens_keeps_every_factor_in_the_graph():
    x, counts, a, b, ranks, grad_out = _case(4)
    out, gx, ga, gb = _run(x[:0], [0, 0, 0, 0], a, b, ranks, grad_out[:0])
    assert out.shape == (0, 24)
    assert ga is not None and gb is not None and ga.shape == a.shape and gb.shape == b.shape
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


def test_dropout_applies_to_the_input_once():
    x, counts, a, b, ranks, grad_out = _case(8, seed=3)
    torch.manual_seed(11)
    dropped = F.dropout(x, p=0.3, training=True)
    torch.manual_seed(11)
    got = _run(x, counts, a, b, ranks, grad_out, dropout=0.3, training=True)[0]
    ref = _reference(dropped, counts, a, b, ranks, grad_out)[0]
    _assert_close_to_scale(got, ref, "output with dropout")


def test_bfloat16_grouped_within_bf16_precision():
    x, counts, a, b, ranks, grad_out = _case(8, dtype=torch.bfloat16, seed=5)
    assert lora_math._grouped_width(x, a, b, ranks) is not None
    got = _run(x, counts, a, b, ranks, grad_out)
    ref = _reference(x, counts, a, b, ranks, grad_out)
    for what, g, r in zip(("output", "x grad", "A grad", "B grad"), got, ref):
        _assert_close_to_scale(g, r, what, rel=3e-2)
    for e, r in enumerate(ranks):
        assert torch.count_nonzero(got[2][e, r:]) == 0
        assert torch.count_nonzero(got[3][e, :, r:]) == 0


class _GroupedLinear(torch.nn.Module):
    """Stands in for TE's GroupedLinear (forward(x, m_splits)), itself one grouped GEMM."""

    def __init__(self, num_experts, in_f, out_f):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_experts, out_f, in_f) * 0.1,
                                         requires_grad=False)

    def forward(self, x, m_splits):
        offs = torch.tensor(m_splits).cumsum(0).to(torch.int32)
        return F.grouped_mm(x, self.weight.transpose(1, 2), offs=offs), None


def _hooked_grouped_mlp_ops(num_experts, hidden=16, ffn=16, r_max=16):
    """Ops of a TEGroupedMLP-shaped block (base grouped GEMMs + DR-LoRA hooks on up and down)
    for one forward and backward, heterogeneous ranks, one expert without tokens."""
    from megatron_drlora.adapters import experts as attach
    from megatron_drlora.adapters.bank import ExpertLoRABank, ProjectionSpec

    torch.manual_seed(num_experts)
    specs = [ProjectionSpec("up", "fc1", "up", hidden, ffn),
             ProjectionSpec("down", "fc2", None, ffn, hidden)]
    bank = ExpertLoRABank(0, list(range(num_experts)), num_experts, specs, r_max, 4, 2.0)
    with torch.no_grad():
        for name in bank.projection_names:
            bank.factor(name, "B").normal_()
    # the same widest rank per projection at both sizes (the kernels run at that width)
    bank.set_ranks(torch.tensor([[(5, 0, 3, 1)[e % 4], (2, 7, 0, 4)[e % 4]]
                                 for e in range(num_experts)]))
    block = torch.nn.Module()
    block.linear_fc1 = _GroupedLinear(num_experts, hidden, 2 * ffn)
    block.linear_fc2 = _GroupedLinear(num_experts, ffn, hidden)
    attach.attach_to_grouped_linears(block, bank, None)
    counts = torch.multinomial(torch.ones(num_experts), 64, replacement=True)
    m_splits = counts.bincount(minlength=num_experts)
    m_splits[1] += m_splits[0]
    m_splits[0] = 0
    m_splits = m_splits.tolist()
    x = torch.randn(64, hidden, requires_grad=True)
    with OpCounter() as counter:
        h, _ = block.linear_fc1(x, m_splits)
        gate, up = h.chunk(2, dim=-1)
        out, _ = block.linear_fc2(F.silu(gate) * up, m_splits)
        out.square().sum().backward()  # (a sum alone hands grouped_mm a stride-0 grad)
    for p in bank.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    return counter.ops


def test_grouped_mlp_hooks_op_count_does_not_grow_with_local_experts():
    few, many = _hooked_grouped_mlp_ops(4), _hooked_grouped_mlp_ops(32)
    assert few == many, f"4 experts: {dict(few)}\n32 experts: {dict(many)}"
