"""Attach an ExpertLoRABank to Megatron-Core's expert implementations.

The base modules are never replaced: the LoRA delta is added by forward hooks on the experts'
`linear_fc1` / `linear_fc2`, so module names and Megatron's (sharded) state-dict keys stay
exactly those of the base model and a base checkpoint loads into an adapted model unchanged.

- SequentialMLP (CPU and GPU): one hook per local expert linear, tokens of that expert only.
- TEGroupedMLP: one hook per grouped linear; its input is all local tokens sorted by expert and
  `m_splits`, so the grouped LoRA computation splits them by tokens_per_expert.
- legacy GroupedMLP (megatron-core <= 0.18, grouped_gemm): it has no linear submodules, so
  its forward is replaced by one that runs the same grouped GEMMs plus the deltas.

Nothing here communicates: with expert-TP > 1 the gradient of the factor replicated across
expert-TP ranks is partial, and the controller sums it once per optimizer step
(`replicated_gradients`, comm.sum_replicated_gradients).
"""

from __future__ import annotations

import types
from typing import Callable, List

import torch

from megatron_drlora.adapters.bank import ExpertLoRABank
from megatron_drlora.adapters.lora_math import (add_to_fc1_half, grouped_lora_delta,
                                                grouped_width, lora_delta)


def _remember_expert_tp_group(bank: ExpertLoRABank, etp_group) -> None:
    bank.expert_tp_group = etp_group


def replicated_factors(bank: ExpertLoRABank) -> List[torch.nn.Parameter]:
    """The factor of each projection that is whole on every expert-TP rank while its gradient
    is partial there (fc1: A, B sharded on output; fc2: B, A sharded on input)."""
    if getattr(bank, "pooled", False):  # the hidden-size slots are whole on every ETP rank
        return [bank.slots_hidden] if bank.tp_size > 1 else []
    out = []
    for name in bank.projection_names:
        spec = bank.specs[name]
        if spec.tp_size > 1:
            out.append(bank.factor(name, "A" if spec.linear == "fc1" else "B"))
    return out


def replicated_gradients(bank: ExpertLoRABank) -> tuple:
    """(expert-TP group, accumulated gradients of the replicated factors) of one bank, for
    comm.sum_replicated_gradients once per optimizer step: `main_grad` under Megatron DDP
    (where the optimizer reads), else `.grad`."""
    grads = []
    for param in replicated_factors(bank):
        main_grad = getattr(param, "main_grad", None)
        grads.append(main_grad if main_grad is not None else param.grad)
    return getattr(bank, "expert_tp_group", None), grads


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
        if getattr(self.bank, "pooled", False):  # each expert's active slots only
            self.views = self.bank.expert_views()
            return
        self.views = {}
        for name in self.bank.projection_names:
            a, b = self.bank.lora_factors(name)
            self.views[(name, "A")], self.views[(name, "B")] = a.unbind(0), b.unbind(0)

    def drop(self, module, args, output) -> None:
        self.views = {}

    def get(self, name: str, which: str, local: int) -> torch.Tensor:
        views = self.views.get((name, which))
        if views is not None:
            return views[local]
        return self.bank.lora_factors(name, self.bank.r_max)[0 if which == "A" else 1][local]


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
    _remember_expert_tp_group(bank, etp_group)
    factors = _ExpertFactorViews(bank)

    def make_hook(local: int, linear: str):
        def hook(module, args, output):
            x = args[0]
            out, bias = output

            def compute(name):
                return lora_delta(x, factors.get(name, "A", local),
                                  factors.get(name, "B", local), bank.rank(local, name),
                                  bank.scale, bank.dropout, bank.training)

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


def _grouped(bank: ExpertLoRABank, name: str, x: torch.Tensor, counts):
    """All local experts' delta of one projection in one grouped call (see lora_math)."""
    j = bank.projection_names.index(name)
    ranks = bank.ranks_of(name)
    a, b = bank.lora_factors(name, grouped_width(max(ranks, default=0), bank.r_max, x))
    return grouped_lora_delta(x, counts, a, b, ranks, bank.scale, bank.dropout, bank.training,
                              ranks_device=bank.ranks[:, j])


def attach_to_grouped_linears(experts, bank: ExpertLoRABank, etp_group) -> List:
    """Hooks on TEGroupedMLP's grouped linear_fc1 / linear_fc2 (called as (x, m_splits))."""
    handles = []
    _remember_expert_tp_group(bank, etp_group)

    def make_hook(linear: str):
        def hook(module, args, output):
            x, m_splits = args[0], args[1]
            out, bias = output

            def compute(name):
                return _grouped(bank, name, x, m_splits)

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
    _remember_expert_tp_group(bank, etp_group)
    config = experts.config
    hidden = config.hidden_size

    def deltas(linear, x, out, counts):
        def compute(name):
            return _grouped(bank, name, x, counts)

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

