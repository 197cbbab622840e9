"""Attach an ExpertLoRABank to Megatron-Core's expert implementations.

The base modules are never replaced: the LoRA delta is added by forward hooks on the experts'
`linear_fc1` / `linear_fc2`, so module names and Megatron's (sharded) state-dict keys stay
exactly those of the base model and a base checkpoint loads into an adapted model unchanged.

- SequentialMLP (CPU and GPU): one hook per local expert linear, tokens of that expert only.
- TEGroupedMLP: one hook per grouped linear; its input is all local tokens sorted by expert and
  `m_splits`, so the grouped LoRA computation splits them by tokens_per_expert.
- legacy GroupedMLP (megatron-core <= 0.18, grouped_gemm): it has no linear submodules, so
  its forward is replaced by one that runs the same grouped GEMMs plus the deltas.
"""

from __future__ import annotations

import types
from typing import Callable, List

import torch

from megatron_drlora import comm
from megatron_drlora.adapters.bank import ExpertLoRABank
from megatron_drlora.adapters.lora_math import add_to_fc1_half, grouped_lora_delta, lora_delta


def _factor_preparers(bank: ExpertLoRABank, name: str, etp_group) -> tuple:
    """Gradient hooks for the factor replicated across expert-TP ranks (see comm)."""
    spec = bank.specs[name]
    ident = lambda t: t  # noqa: E731
    if spec.tp_size == 1:
        return ident, ident
    if spec.linear == "fc1":  # A whole, B sharded on output
        return (lambda t: comm.sum_gradient_across(t, etp_group)), ident
    return ident, (lambda t: comm.sum_gradient_across(t, etp_group))  # fc2: B whole


def _projections_on(bank: ExpertLoRABank, linear: str) -> List[str]:
    return [n for n in bank.projection_names if bank.specs[n].linear == linear]


def _apply_deltas(bank: ExpertLoRABank, linear: str, x: torch.Tensor, out: torch.Tensor,
                  compute: Callable[[str], torch.Tensor]) -> torch.Tensor:
    for name in _projections_on(bank, linear):
        delta = compute(name)
        if linear == "fc1":
            out = add_to_fc1_half(out, delta, bank.specs[name].fc1_half)
        else:
            out = out + delta
    return out


class _ExpertFactorViews:
    """Per-expert views of the packed factors, made once per experts forward by `unbind`.

    Indexing the packed [E, ...] parameter once per expert (`A[local]`) costs a full-size zero
    gradient per expert in backward (select's backward), i.e. O(E^2) work per layer; one
    unbind per forward has a single backward that stacks the experts' gradients. A forward
    pre-hook on the experts module makes the views (again under activation recompute), a
    forward hook drops them; outside an experts forward the hooks index the parameter."""

    def __init__(self, bank: ExpertLoRABank):
        self.bank = bank
        self.views = {}

    def make(self, module, args) -> None:
        self.views = {(n, w): self.bank.factor(n, w).unbind(0)
                      for n in self.bank.projection_names for w in ("A", "B")}

    def drop(self, module, args, output) -> None:
        self.views = {}

    def get(self, name: str, which: str, local: int) -> torch.Tensor:
        views = self.views.get((name, which))
        return views[local] if views is not None else self.bank.factor(name, which)[local]


class _HookPair:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attach_to_sequential(experts, bank: ExpertLoRABank, etp_group) -> List:
    """Hooks on every local expert's linear_fc1 / linear_fc2 of a SequentialMLP, plus one
    pair on the experts module that splits the packed factors per forward (last handle)."""
    handles = []
    preparers = {n: _factor_preparers(bank, n, etp_group) for n in bank.projection_names}
    factors = _ExpertFactorViews(bank)

    def make_hook(local: int, linear: str):
        def hook(module, args, output):
            x = args[0]
            out, bias = output

            def compute(name):
                prep_a, prep_b = preparers[name]
                return lora_delta(x, prep_a(factors.get(name, "A", local)),
                                  prep_b(factors.get(name, "B", local)),
                                  bank.rank(local, name), bank.scale, bank.dropout,
                                  bank.training)

            return _apply_deltas(bank, linear, x, out, compute), bias

        return hook

    for local, expert in enumerate(experts.local_experts):
        for linear in ("fc1", "fc2"):
            if _projections_on(bank, linear):
                module = getattr(expert, f"linear_{linear}")
                handles.append(module.register_forward_hook(make_hook(local, linear)))
    handles.append(_HookPair(experts.register_forward_pre_hook(factors.make),
                             experts.register_forward_hook(factors.drop)))
    return handles


def _grouped(bank: ExpertLoRABank, preparers, name: str, x: torch.Tensor, counts):
    """All local experts' delta of one projection in one grouped call (see lora_math)."""
    prep_a, prep_b = preparers[name]
    j = bank.projection_names.index(name)
    return grouped_lora_delta(x, counts, prep_a(bank.factor(name, "A")),
                              prep_b(bank.factor(name, "B")), bank.ranks_of(name), bank.scale,
                              bank.dropout, bank.training, ranks_device=bank.ranks[:, j])


def attach_to_grouped_linears(experts, bank: ExpertLoRABank, etp_group) -> List:
    """Hooks on TEGroupedMLP's grouped linear_fc1 / linear_fc2 (called as (x, m_splits))."""
    handles = []
    preparers = {n: _factor_preparers(bank, n, etp_group) for n in bank.projection_names}

    def make_hook(linear: str):
        def hook(module, args, output):
            x, m_splits = args[0], args[1]
            out, bias = output

            def compute(name):
                return _grouped(bank, preparers, name, x, m_splits)

            return _apply_deltas(bank, linear, x, out, compute), bias

        return hook

    for linear in ("fc1", "fc2"):
        if _projections_on(bank, linear):
            module = getattr(experts, f"linear_{linear}")
            handles.append(module.register_forward_hook(make_hook(linear)))
    return handles


def attach_to_legacy_grouped(experts, bank: ExpertLoRABank, etp_group, gmm=None) -> List:
    """Replace a legacy GroupedMLP's forward by base grouped GEMMs + grouped LoRA deltas.

    `gmm(x, w, tokens_per_expert, trans_b=False)` defaults to grouped_gemm's kernel; tests pass
    a reference implementation so the path runs on CPU.
    """
    if gmm is None:
        from megatron.core.transformer.moe import grouped_gemm_util as gg

        gmm = gg.ops.gmm
    preparers = {n: _factor_preparers(bank, n, etp_group) for n in bank.projection_names}
    config = experts.config
    hidden = config.hidden_size

    def deltas(linear, x, out, counts):
        def compute(name):
            return _grouped(bank, preparers, name, x, counts)

        return _apply_deltas(bank, linear, x, out, compute)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.config.moe_apply_probs_on_input:
            dtype = permuted_local_hidden_states.dtype
            permuted_local_hidden_states = (permuted_probs.unsqueeze(-1)
                                            * permuted_local_hidden_states).to(dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        counts = tokens_per_expert  # grouped_gemm keeps it on the host; never read back here
        x = permuted_local_hidden_states
        w1 = self.weight1.view(self.num_local_experts, hidden, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, hidden)
        if x.nelement() != 0:
            fc1 = gmm(x, w1, tokens_per_expert, trans_b=False)
        else:
            fc1 = _grouped_gemm_of_no_tokens(x, w1)
        fc1 = deltas("fc1", x, fc1, counts)
        act = self.activation_func_with_probs(fc1, permuted_probs.unsqueeze(-1))
        if x.nelement() != 0:
            fc2 = gmm(act, w2, tokens_per_expert, trans_b=False)
        else:
            fc2 = _grouped_gemm_of_no_tokens(act, w2)
        return deltas("fc2", act, fc2, counts), None

    original = experts.forward
    experts.forward = types.MethodType(forward, experts)

    class _Restore:
        def remove(self):
            experts.forward = original

    return [_Restore()]


def _grouped_gemm_of_no_tokens(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the grouped GEMM gives for zero tokens, [0, n] (grouped_gemm refuses empty input),
    with every local expert's weight [E, k, n] in the graph: the per-expert output width, so
    the LoRA deltas add to it whatever the number of local experts."""
    return torch.matmul(x.unsqueeze(0), w).sum(0)

