"""Per-step DR-LoRA statistics gathered on each rank, before any reduction.

- Routing: a forward hook on every adapted layer's router adds the routed probability (and the
  hard count) each expert received, and the number of tokens routed, summed over all
  micro-batches of the step. Like Megatron's own router token counter it only counts under
  `torch.is_grad_enabled()`, so activation recompute (first pass under no_grad, recompute with
  grad) and evaluation never count twice.
- Sensitivity: per rank slot, ||dL/da_j (.) a_j||_1 and ||dL/db_j (.) b_j||_1 from the gradient
  the optimizer will use (Megatron DDP's reduced `main_grad`, else `.grad`).

Both are written into global-shaped tensors ([MoE layers, experts, ...]) with zeros where this
rank holds nothing, so one all-reduce (comm.reduce_step_statistics) completes them. They live on
the device of the adapters: nothing here copies to the host, so forward, backward and a
non-event step never wait for the GPU (tests/test_host_syncs.py).
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_drlora.compat.megatron import reduced_grad
from megatron_drlora.saliency import rank_sensitivity_l1


def statistics_device(handle) -> torch.device:
    """Where DR-LoRA's statistics live: the device of the adapters (CPU on a CPU run)."""
    for param in handle.lora_parameters():
        return param.device
    return torch.device("cpu")


def _expert_slice(bank):
    """The bank's global experts as a slice (EP ranks own contiguous ranges): indexing a
    device tensor with a slice needs no index tensor copied from the host."""
    ids = bank.global_expert_ids
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"layer {bank.layer}: local experts {ids} are not contiguous")
    return slice(ids[0], ids[0] + len(ids))


class RoutingStatistics:
    """Accumulates routed weight, hard counts and token counts per (MoE layer, expert)."""

    def __init__(self, handle):
        self.handle = handle
        L, E = handle.num_moe_layers, handle.num_experts
        device = statistics_device(handle)
        self.routed = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.counts = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(L, dtype=torch.float64, device=device)
        self._handles = [layer.moe_layer.router.register_forward_hook(self._hook(layer.moe_index))
                         for layer in handle.layers]

    def _hook(self, moe_index: int):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and module.training):
                return None
            probs, routing_map = output[0], output[1]
            if probs.device != self.routed.device:  # the model moved after we were built: once
                self.to(probs.device)
            with torch.no_grad():  # on the device: no host copy per layer and micro-batch
                self.routed[moe_index] += probs.detach().sum(0).to(torch.float64)
                self.counts[moe_index] += routing_map.sum(0).to(torch.float64)
                self.tokens[moe_index] += probs.shape[0]
            return None

        return hook

    def to(self, device) -> None:
        self.routed, self.counts, self.tokens = (t.to(device) for t in
                                                 (self.routed, self.counts, self.tokens))

    def reset(self) -> None:
        self.routed.zero_()
        self.counts.zero_()
        self.tokens.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def local_sensitivity(handle, contributes_a, contributes_b,
                      grad_masks=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """[L, E, M, R] l1 partial sums of this rank's adapters, zero elsewhere.

    `contributes_a(bank, name) -> bool` says whether this rank's A shard of a projection must be
    counted (a factor replicated on several ranks is counted once; sharded factors add their
    partial sums), likewise `contributes_b`. `grad_masks[param]` (distributed optimizer) keeps
    only the elements whose reduced gradient this rank owns; l1 sums are additive over elements,
    so the shards of all expert-data-parallel ranks add up to the full value.
    """
    grad_masks = grad_masks or {}
    L, E = handle.num_moe_layers, handle.num_experts
    M, R = len(handle.projections), handle.config.rank_max
    device = statistics_device(handle)
    l1_a = torch.zeros(L, E, M, R, dtype=torch.float64, device=device)
    l1_b = torch.zeros(L, E, M, R, dtype=torch.float64, device=device)
    for layer in handle.layers:
        bank = layer.bank
        ids = _expert_slice(bank)
        if getattr(bank, "pooled", False):
            _pooled_sensitivity(bank, layer.moe_index, ids, l1_a, l1_b, contributes_a,
                                contributes_b, grad_masks)
            continue
        for j, name in enumerate(bank.projection_names):
            # Slots past the largest active rank have exactly zero gradient (prefix compute):
            # skip them, their l1 is 0.
            r_hi = max(bank.ranks_of(name), default=0)
            if r_hi == 0:
                continue
            for which, rank_dim, out, gate in (("A", 1, l1_a, contributes_a),
                                               ("B", 2, l1_b, contributes_b)):
                if not gate(bank, name):
                    continue
                param = bank.factor(name, which)
                grad = reduced_grad(param)
                if grad is None:
                    continue
                grad = grad.view_as(param).narrow(rank_dim, 0, r_hi)
                if param in grad_masks:
                    grad = grad * grad_masks[param].narrow(rank_dim, 0, r_hi)
                out[layer.moe_index, ids, j, :r_hi] = rank_sensitivity_l1(
                    grad, param.narrow(rank_dim, 0, r_hi), rank_dim)
    return l1_a, l1_b


def _slot_l1(param, grad_masks, rows: int) -> torch.Tensor:
    """Per-slot ||grad (.) slot||_1 of the first `rows` slots of a pool parameter [S, width]
    -> [rows] float64 (None when there is no gradient yet)."""
    grad = reduced_grad(param)
    if grad is None:
        return None
    grad, weight = grad.view_as(param)[:rows], param[:rows]
    if param in grad_masks:
        grad = grad * grad_masks[param][:rows]
    return rank_sensitivity_l1(grad.unsqueeze(1), weight.unsqueeze(1), 1).squeeze(1)


def _pooled_sensitivity(bank, moe_index, ids, l1_a, l1_b, contributes_a, contributes_b,
                        grad_masks) -> None:
    """A pooled bank (adapters/pool.py): l1 per slot of each pool parameter, then mapped to
    (expert, projection, rank) through the device slot table; ranks at or above an expert's
    rank read 0. A slot serves one (expert, projection, rank), so its l1 is that rank's. A
    packed pool's active slots are its first ones: only those are read (half the pool at
    r_init)."""
    rows = bank.slots_in_use() if bank.packed else bank.capacity
    per_slot = {id(p): _slot_l1(p, grad_masks, rows) for p in (bank.slots_hidden,
                                                                bank.slots_ffn)}
    for j, name in enumerate(bank.projection_names):
        r_hi = max(bank.ranks_of(name), default=0)
        if r_hi == 0:
            continue
        table = bank.slot_table[:, j, :r_hi]
        active = (torch.arange(r_hi, device=table.device)
                  < bank.ranks[:, j].unsqueeze(1))
        for which, out, gate in (("A", l1_a, contributes_a), ("B", l1_b, contributes_b)):
            slots = per_slot[id(bank.side(name, which))]
            if slots is None or not gate(bank, name):
                continue
            values = slots[table.reshape(-1)].view(table.shape)
            out[moe_index, ids, j, :r_hi] = torch.where(active, values,
                                                        torch.zeros_like(values))
