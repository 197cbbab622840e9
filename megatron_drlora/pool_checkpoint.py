"""Checkpoints of pooled banks (the rank pool, the default) in the dense bank's format.

Why: exports, the checkpoint readers and cross-layout resume know one on-disk format, the dense
factors `drlora.layers.{layer}.{proj}_{A|B}` (A [E, r_max, k], B [E, d, r_max], experts sharded
over EP, the base layer's dim over expert-TP, zero at inactive ranks where the pool holds
nothing). A pooled bank writes exactly those through one dist_checkpointing
ShardedTensorFactory per pool parameter: build turns the pool tensor it is given (the parameter,
or an optimizer state shaped like it: Megatron replaces a factory's data by the state) into the
dense factors of its side; merge turns loaded dense factors back into a pool tensor. Each
factory also writes its slot table ([E, P, r_max] int64, -1 = no slot, experts sharded over
EP) under `drlora.layers.{layer}.pool_table_{hidden|ffn}`, keys the readers never match. Inactive A-rows
are saved with their init (what a dense bank holds there), inactive B-columns and optimizer
states as zeros.

On load the saved table is used as it is when it fits this pool (same layout: the distributed
optimizer's default `dp_reshardable` format keeps its states in the saved slot order, so the
model must too); otherwise (another EP size, another capacity) the ranks it implies are packed
(`adapters.pool.packed_table`: expert, projection, rank), the same way by every factory, so
parameters and optimizer states stay aligned. A pool that repacks at rank changes (an
optimizer attached) saves packed tables, so its loads keep the sliced forward. A dense bank's checkpoint (no table) cannot be loaded into a
pooled run (Megatron-LM's entry refuses it at start-up, naming --no-drlora-rank-pool); the other direction works. The distributed
optimizer's `fully_sharded_model_space` format (flattened factories) is refused by name.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_drlora.adapters.pool import packed_table

_SIDES = ("slots_hidden", "slots_ffn")


class PoolCheckpointError(RuntimeError):
    """A pooled bank cannot be saved or loaded this way; the message says what to change."""


def _table_key(key: str, side: str) -> str:
    return f"{key}.pool_table_{side.split('_')[1]}"


def _entries(bank, side: str):
    param = getattr(bank, side)
    return [(name, which) for name in bank.projection_names for which in ("A", "B")
            if bank.side(name, which) is param]


def resolve_table(bank, loaded: torch.Tensor) -> torch.Tensor:
    """The slot table a load uses: the saved one if it fits this pool, else the canonical
    packing of the ranks it implies."""
    loaded = loaded.to(torch.int64).cpu()
    ranks = (loaded >= 0).sum(dim=-1)
    if int(ranks.sum()) > bank.capacity:
        raise PoolCheckpointError(
            f"layer {bank.layer}: the checkpoint's ranks need {int(ranks.sum())} rank slots on "
            f"this rank but the rank pool holds {bank.capacity}; load it with "
            f"--no-drlora-rank-pool or with fewer experts per rank")
    prefix = torch.arange(bank.r_max) < ranks.unsqueeze(-1)
    used = loaded[prefix]
    if (bool(((loaded >= 0) == prefix).all()) and bool((used < bank.capacity).all())
            and used.unique().numel() == used.numel()):
        return loaded
    return packed_table(ranks, loaded.shape[-1])


def _fill_inactive_init(bank, name: str, dense: torch.Tensor) -> None:
    """A-rows at or above an expert's rank hold their init, as in a dense bank that never
    trained them, so a dense run resumed from this checkpoint can grow into them (with B = 0
    and A = 0 a rank would never get a gradient). Optimizer states stay zero there. Costs one
    init draw per (local expert, projection) per save."""
    for e in range(dense.shape[0]):
        r = bank.rank(e, name)
        if r < bank.r_max:
            dense[e, r:] = bank.init_rows(e, name)[r:].to(dense.dtype)


def pooled_sharded_state_dict(bank, edp_rank: int) -> Dict:
    """{dict key: ShardedTensorFactory} of one pooled bank (see the module docstring)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    num_local = len(bank.global_expert_ids)
    ep_size = bank.num_global_experts // num_local
    ep_rank = bank.global_expert_ids[0] // num_local
    key = f"drlora.layers.{bank.layer}"
    out = {}
    for side in _SIDES:
        param = getattr(bank, side)
        sharded = bool(param.drlora_sharded)
        entries = _entries(bank, side)

        def build(key, data, replica_id, flattened_range, side=side, entries=entries,
                  sharded=sharded):
            if flattened_range is not None:
                raise PoolCheckpointError(
                    "the rank pool cannot save the distributed optimizer's "
                    "fully_sharded_model_space format (flattened optimizer shards of a pool "
                    "are not dense factors); use Megatron-LM's default (dp_reshardable) or "
                    "--dist-ckpt-optim-fully-reshardable, or pass --no-drlora-rank-pool")
            built = {}
            is_param = data.data_ptr() == getattr(bank, side).data_ptr()
            for name, which in entries:
                spec = bank.specs[name]
                dense = bank.dense_from(name, which, {side: data.detach()})
                if which == "A" and is_param:
                    _fill_inactive_init(bank, name, dense)
                offsets = [(0, ep_rank, ep_size)]
                if sharded:
                    offsets.append((2 if which == "A" else 1, spec.tp_rank, spec.tp_size))
                built[f"{name}_{which}"] = ShardedTensor.from_rank_offsets(
                    f"{key}.{name}_{which}", dense, *offsets, replica_id=replica_id)
            table_replica = (replica_id[0], bank.tp_rank, replica_id[2]) \
                if isinstance(replica_id, tuple) else replica_id
            built["table"] = ShardedTensor.from_rank_offsets(
                _table_key(key, side), bank._table.clone(), (0, ep_rank, ep_size),
                replica_id=table_replica)
            return built

        def merge(loaded, side=side, entries=entries):
            table = resolve_table(bank, loaded["table"])
            bank.load_layout(table)
            param = getattr(bank, side)
            first = loaded[f"{entries[0][0]}_{entries[0][1]}"]
            pool = torch.zeros(param.shape, dtype=first.dtype, device=first.device)
            for name, which in entries:
                j = bank.projection_names.index(name)
                dense = loaded[f"{name}_{which}"]
                rows = dense if which == "A" else dense.transpose(1, 2)
                tab = table[:, j, :]
                used = tab >= 0
                pool[tab[used].to(pool.device)] = rows[used.to(rows.device)].to(pool.dtype)
            return pool

        replica = (0, 0 if sharded else bank.tp_rank, edp_rank)
        out[f"{key}.pool_{side}"] = ShardedTensorFactory(key, param, build, merge, replica)
    return out
