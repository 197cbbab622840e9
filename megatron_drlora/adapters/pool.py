"""PooledLoRABank (`--drlora-rank-pool`): one MoE layer's LoRA ranks held in a pool of slots.

Why: the dense ExpertLoRABank allocates every (expert, projection) at r_max, so parameters,
gradients, main copies and Adam moments cost uniform LoRA at r_max (2x r_target by default)
although the budget never lets more than uniform LoRA at r_target be active. The pool holds only
as many rank slots as the allocator can ever give this rank's experts in this layer
(`pool_capacity`), and growth assigns free slots; shapes stay static, so Megatron's DDP buffers,
the optimizers and dist_checkpointing stay valid for the whole run.

One slot is one rank of any projection, as two rows: `slots_hidden[s]` (hidden size, whole on
every expert-TP rank) and `slots_ffn[s]` (the expert's intermediate size, sharded over
expert-TP like fc1's output / fc2's input). For gate/up (fc1) the A-row is `slots_hidden[s]` and
the B-column `slots_ffn[s]`; for down (fc2) the A-row is `slots_ffn[s]` and the B-column
`slots_hidden[s]`. Every projection's rank therefore costs hidden + ffn, exactly like uniform
LoRA.

The slot table [local experts, projections, r_max] maps (expert, projection, rank k) to a slot,
as a device tensor (the grouped forward and the statistics gather with it, no host read) and a
host copy (-1 = none). Once an optimizer is attached (`row_mover`, set by the controller to
compat.optimizer.move_param_rows) every rank change packs the slots anew, expert after expert,
projection after projection, rank after rank (`packed_table`), moving the kept ranks' rows in
the parameters, the optimizer's main copies and its states alike: the per-expert loop then
takes each expert's factors as views of one `split` of each pool parameter (no gather, one
backward node), like the dense bank's `unbind`. Without a mover (no optimizer to keep in step)
a grown rank takes the lowest free slots instead and the loop gathers the active slots.
Free slots hold zeros: zero gradient, zero Adam moments, and weight decay keeps them zero.
Assigning rank k writes the dense bank's init into the slot (A-row k of the same
`kaiming_uniform_a` draw, B zero) and, through `row_writer` (the controller sets it to
compat.optimizer.write_param_rows), into the optimizer's main copy with the slot's optimizer
state reset; a pooled model computes what a dense bank with the same rank map computes.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_drlora.adapters.bank import (LocalExpertAdapters, ProjectionSpec, init_seed,
                                           kaiming_uniform_a)


def pool_capacity(config, num_experts: int, num_local: int, num_projections: int,
                  num_moe_layers: int, fixed_local_sum: Optional[int] = None) -> int:
    """The most rank slots the allocator can ever give one rank's local experts of one layer.

    Ranks only grow from r_init, so the other modules of the budget scope hold at least r_init
    each: S = min(local modules x r_max, scope budget - other modules x r_init), the scope
    being the layer (`--drlora-allocation layer`: E x P modules) or the model ('global':
    L x E x P). At EP=1 with layer scope that is uniform LoRA at r_target; with global scope or
    EP > 1 it may be up to local modules x r_max (no saving). A fixed `--drlora-rank-map` needs
    exactly its local sum (`fixed_local_sum`). `--drlora-rank-pool-capacity F` lowers S to
    F x the local modules' share of uniform r_target, and the allocator keeps every rank's
    experts of a layer within it (`allocate_growth(group_capacity=...)`)."""
    local_modules = num_local * num_projections
    if fixed_local_sum is not None:
        return max(1, int(fixed_local_sum))
    scope = num_experts * num_projections
    if config.allocation == "global":
        scope *= num_moe_layers
    budget = max(config.budget, config.rank_init) * scope
    bound = budget - (scope - local_modules) * config.rank_init
    capacity = min(local_modules * config.rank_max, bound)
    factor = config.rank_pool_capacity
    if factor is not None:
        share = local_modules * max(config.budget, config.rank_init)
        capacity = min(capacity, math.floor(factor * share + 1e-9))
    return max(1, capacity)


def packed_table(ranks: torch.Tensor, r_max: int) -> torch.Tensor:
    """The slot table [E, P, r_max] (-1 = none) that packs `ranks` [E, P] from slot 0, expert
    after expert, projection after projection, rank after rank."""
    ranks = torch.as_tensor(ranks, dtype=torch.int64).cpu()
    starts = (ranks.reshape(-1).cumsum(0) - ranks.reshape(-1)).view(ranks.shape)
    k = torch.arange(r_max, dtype=torch.int64)
    return torch.where(k < ranks.unsqueeze(-1), starts.unsqueeze(-1) + k, torch.full((), -1))


def moved_rows(rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`rows` [S, width] repacked: row i is old row source[i], zero where source[i] < 0 (the
    parameter here, its optimizer main copy and states in compat.optimizer)."""
    index = source.clamp(min=0).to(rows.device)
    keep = (source >= 0).to(rows.device).unsqueeze(1)
    return torch.where(keep, rows.index_select(0, index),
                       torch.zeros((), dtype=rows.dtype, device=rows.device))


class PooledLoRABank(LocalExpertAdapters):
    """LoRA rank slots and the slot table of the local experts of one MoE layer."""

    pooled = True

    def __init__(self, layer: int, global_expert_ids: Sequence[int], num_global_experts: int,
                 projections: Sequence[ProjectionSpec], r_max: int, r_init: int, scale: float,
                 capacity: int, dropout: float = 0.0, seed: int = 1234,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__(layer, global_expert_ids, num_global_experts, projections, r_max,
                         scale, dropout, seed)
        self.capacity = int(capacity)
        spec = projections[0]
        hidden = spec.in_features if spec.linear == "fc1" else spec.out_features
        ffn_local = spec.out_local if spec.linear == "fc1" else spec.in_local
        self.tp_size, self.tp_rank = spec.tp_size, spec.tp_rank
        for name, width, sharded in (("slots_hidden", hidden, False),
                                     ("slots_ffn", ffn_local, spec.tp_size > 1)):
            param = torch.nn.Parameter(torch.zeros(self.capacity, width, dtype=dtype,
                                                   device=device))
            # The dense bank's contract (see bank.py): expert buffer reduced over expert-DP;
            # counted in the grad norm on every rank unless replicated across expert-TP.
            param.allreduce = False
            param.drlora = True
            param.drlora_sharded = sharded
            duplicate = spec.tp_size > 1 and not sharded and spec.tp_rank != 0
            param.tensor_model_parallel = not duplicate
            param.partition_dim = 1
            param.partition_stride = 1
            if duplicate:
                param.shared = True
            self.register_parameter(name, param)
        num_local = len(self.global_expert_ids)
        shape = (num_local, len(projections), self.r_max)
        self._table = torch.full(shape, -1, dtype=torch.int64)  # host copy, -1 = no slot
        # Device copy used by the forward gathers; unassigned entries point at slot 0 (the
        # grouped kernels mask columns at or above an expert's rank, the loop slices them off).
        self.register_buffer("slot_table", torch.zeros(shape, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("ranks", torch.zeros(num_local, len(projections), dtype=torch.int64,
                                                  device=device), persistent=False)
        # The slots of the active ranks in packed order (expert, projection, rank): the
        # per-expert loop gathers these rows when the layout is not packed (`expert_views`).
        self.register_buffer("slot_order", torch.zeros(self.capacity, dtype=torch.int64,
                                                       device=device), persistent=False)
        self._ranks_list: List[List[int]] = self.ranks.cpu().tolist()
        self._free: List[int] = list(range(self.capacity))
        self._packed = True  # the host table is packed_table(ranks): slices, no gather
        # (param, rows LongTensor, values) -> None: also writes the optimizer's main copy.
        self.row_writer: Optional[Callable] = None
        # (param, source LongTensor [capacity]) -> None: row i of the optimizer's main copy and
        # states becomes old row source[i] (zero where -1). Set: rank changes pack the pool.
        self.row_mover: Optional[Callable] = None
        self.set_ranks(torch.full((num_local, len(projections)), int(r_init), dtype=torch.int64))

    # --- which pool row holds which factor ---------------------------------------------------
    def side(self, projection: str, which: str) -> torch.nn.Parameter:
        """The pool parameter holding `projection`'s A-rows or B-columns."""
        fc1 = self.specs[projection].linear == "fc1"
        return self.slots_hidden if (which == "A") == fc1 else self.slots_ffn

    @property
    def packed(self) -> bool:
        """The active ranks hold slots 0 .. slots_in_use() - 1 in packed order (packed_table)."""
        return self._packed

    # --- ranks (ExpertLoRABank's interface) ------------------------------------------------
    def slots_in_use(self) -> int:
        return self.capacity - len(self._free)

    @torch.no_grad()
    def set_ranks(self, ranks: torch.Tensor) -> None:
        """Set the active ranks [local experts, projections]: a grown rank gets its init, a
        shrunk one (only a load does that) loses its values. With a `row_mover` the slots are
        packed anew (kept ranks moved, optimizer state with them); without one a grown rank
        takes the lowest free slots and a shrunk one's slots are zeroed and freed. Raises
        before changing anything when the pool is too small."""
        ranks = self._checked_rank_map(ranks)
        if int(ranks.sum()) > self.capacity:
            raise ValueError(
                f"layer {self.layer}: the rank map needs {int(ranks.sum())} rank slots on this "
                f"rank but the pool (--drlora-rank-pool) holds {self.capacity}; it is sized for "
                f"ranks grown from r_init within the budget")
        old = self._ranks_list
        new = ranks.tolist()
        if self.row_mover is not None:
            self._repack(ranks)
        else:
            self._reuse_free_slots(old, new)
        self._ranks_list = new
        self.ranks.copy_(ranks.to(self.ranks.device))
        self._publish_table()

    def _grown(self, old, new):
        return [(e, j, old[e][j], r) for e, row in enumerate(new) for j, r in enumerate(row)
                if r > old[e][j]]

    def _repack(self, ranks: torch.Tensor) -> None:
        """Pack the new ranks from slot 0 (packed_table): kept ranks move with their optimizer
        state, grown ones get their init, every other slot is zero."""
        old_ranks = self._ranks_list
        table = packed_table(ranks, self.r_max)
        kept = (table >= 0) & (self._table >= 0)
        source = torch.full((self.capacity,), -1, dtype=torch.int64)
        source[table[kept]] = self._table[kept]
        used = int(ranks.sum())
        moved = not torch.equal(table[kept], self._table[kept])
        if moved or int(kept.sum()) < self.slots_in_use():  # else: free rows are zero already
            for param in (self.slots_hidden, self.slots_ffn):
                param.data.copy_(moved_rows(param.data, source))
                self.row_mover(param, source)
        self._table = table
        self._free = list(range(used, self.capacity))
        self._write_init(self._grown(old_ranks, ranks.tolist()))

    def _reuse_free_slots(self, old, new) -> None:
        """Without an optimizer to move state in: zero and free shrunk ranks' slots, give
        grown ranks the lowest free ones (nothing moves)."""
        freed: List[int] = []
        for e, row in enumerate(new):
            for j, r in enumerate(row):
                if r < old[e][j]:
                    freed += self._table[e, j, r:old[e][j]].tolist()
                    self._table[e, j, r:old[e][j]] = -1
        if freed:
            rows = torch.tensor(freed, dtype=torch.int64)
            for param in (self.slots_hidden, self.slots_ffn):
                self._write_rows(param, rows, torch.zeros(len(freed), param.shape[1],
                                                          dtype=param.dtype))
            self._free = sorted(self._free + freed)
        grown = self._grown(old, new)
        for e, j, lo, hi in grown:
            slots, self._free = self._free[:hi - lo], self._free[hi - lo:]
            self._table[e, j, lo:hi] = torch.tensor(slots, dtype=torch.int64)
        self._write_init(grown)

    def load_layout(self, table: torch.Tensor) -> None:
        """Adopt a slot table (a checkpoint's, pool_checkpoint.resolve_table) as it is: the
        parameters and optimizer states are loaded to match it, nothing is written here."""
        table = table.to(torch.int64).cpu().clone()
        if tuple(table.shape) != tuple(self._table.shape):
            raise ValueError(f"layer {self.layer}: slot table {tuple(table.shape)} != "
                             f"{tuple(self._table.shape)}")
        used = set(table[table >= 0].tolist())
        ranks = (table >= 0).sum(dim=-1)
        self._table = table
        self._free = [s for s in range(self.capacity) if s not in used]
        self._ranks_list = ranks.tolist()
        self.ranks.copy_(ranks.to(self.ranks.device))
        self._publish_table()

    def _publish_table(self) -> None:
        """The device copies of the host table (at a rank change only, never per forward)."""
        self.slot_table.copy_(self._table.clamp(min=0).to(self.slot_table.device))
        used = self._table[self._table >= 0]  # row-major: expert, projection, rank
        order = torch.zeros(self.capacity, dtype=torch.int64)
        order[:used.numel()] = used
        self.slot_order.copy_(order.to(self.slot_order.device))
        self._packed = bool(torch.equal(used, torch.arange(used.numel())))

    def _write_init(self, grown) -> None:
        """Write the init of ranks [lo, hi) of (expert, projection) into their slots (already in
        the table): A-rows of the dense bank's draw, B zero."""
        writes = {id(self.slots_hidden): [], id(self.slots_ffn): []}
        for e, j, lo, hi in grown:
            name = self.projection_names[j]
            slots = self._table[e, j, lo:hi].tolist()
            a_rows = self.init_rows(e, name)[lo:hi]
            a_side, b_side = self.side(name, "A"), self.side(name, "B")
            writes[id(a_side)].append((slots, a_rows))
            writes[id(b_side)].append((slots, torch.zeros(hi - lo, b_side.shape[1],
                                                          dtype=torch.float64)))
        for param in (self.slots_hidden, self.slots_ffn):
            items = writes[id(param)]
            if items:
                rows = torch.tensor([s for slots, _ in items for s in slots], dtype=torch.int64)
                values = torch.cat([v for _, v in items]).to(param.dtype)
                self._write_rows(param, rows, values)

    def init_rows(self, local_expert: int, projection: str) -> torch.Tensor:
        """The dense bank's A [r_max, k_local] of (local expert, projection), float64."""
        spec = self.specs[projection]
        full = kaiming_uniform_a(self.r_max, spec.in_features,
                                 init_seed(self.seed, self.layer,
                                           self.global_expert_ids[local_expert], projection))
        if spec.a_sharded:
            width = spec.in_local
            full = full[:, spec.tp_rank * width:(spec.tp_rank + 1) * width]
        return full

    def _write_rows(self, param: torch.nn.Parameter, rows: torch.Tensor,
                    values: torch.Tensor) -> None:
        values = values.to(device=param.device, dtype=param.dtype)
        param.data[rows.to(param.device)] = values
        if self.row_writer is not None:
            self.row_writer(param, rows, values)

    # --- the forward's factors ---------------------------------------------------------------
    def lora_factors(self, projection: str, width: int):
        """(A [E, width, k], B [E, d, width]) of every local expert, gathered from the pool with
        the device slot table (autograd sends the gradients back to the slots)."""
        j = self.projection_names.index(projection)
        num_local = len(self.global_expert_ids)
        index = self.slot_table[:, j, :width].reshape(-1)
        a_side, b_side = self.side(projection, "A"), self.side(projection, "B")
        a = a_side.index_select(0, index).view(num_local, width, a_side.shape[1])
        b_rows = b_side.index_select(0, index).view(num_local, width, b_side.shape[1])
        return a, b_rows.transpose(1, 2).contiguous()

    def expert_views(self):
        """{(projection, 'A' | 'B'): per local expert A [r_e, k] / B [d, r_e]} of the active
        ranks only, for the per-expert loop: one `split` per pool parameter into every
        (expert, projection)'s rows, views of the parameter itself when the layout is packed
        (else of one gather of the active slots in packed order, `slot_order`); B is a
        transposed view. The split sizes are the host ranks: no device read."""
        sizes = [r for row in self._ranks_list for r in row]  # expert, projection
        used = sum(sizes)
        chunks = {}
        for param in (self.slots_hidden, self.slots_ffn):
            if self._packed:  # the free tail is the last chunk (one backward node)
                chunks[id(param)] = param.split(sizes + [self.capacity - used])[:len(sizes)]
            else:
                chunks[id(param)] = param.index_select(
                    0, self.slot_order.narrow(0, 0, used)).split(sizes)
        P = len(self.projection_names)
        views = {}
        for j, name in enumerate(self.projection_names):
            a = chunks[id(self.side(name, "A"))][j::P]
            b = chunks[id(self.side(name, "B"))][j::P]
            views[name, "A"], views[name, "B"] = list(a), [rows.t() for rows in b]
        return views

    # --- dense views (checkpoints, export, tests, benchmarks) --------------------------------
    def dense_from(self, projection: str, which: str, pool: Dict[str, torch.Tensor],
                   table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense factor (A [E, r_max, k] / B [E, d, r_max]) of `projection` built from pool
        tensors {'slots_hidden', 'slots_ffn'} (the parameters or optimizer states shaped like
        them), zero at inactive ranks."""
        table = self._table if table is None else table
        j = self.projection_names.index(projection)
        src = pool["slots_hidden" if self.side(projection, which) is self.slots_hidden
                   else "slots_ffn"]
        tab = table[:, j, :].to(src.device)
        rows = src.index_select(0, tab.clamp(min=0).reshape(-1)).view(*tab.shape, src.shape[1])
        rows = rows * (tab >= 0).unsqueeze(-1).to(rows.dtype)
        return rows if which == "A" else rows.transpose(1, 2).contiguous()

    def dense_factor(self, projection: str, which: str) -> torch.Tensor:
        """A detached dense copy of a factor (zeros at inactive ranks)."""
        with torch.no_grad():
            return self.dense_from(projection, which, {"slots_hidden": self.slots_hidden,
                                                       "slots_ffn": self.slots_ffn})

    @torch.no_grad()
    def write_dense_factor(self, projection: str, which: str, value: torch.Tensor) -> None:
        """Write the active ranks of a dense factor into their slots (inactive ones ignored)."""
        j = self.projection_names.index(projection)
        rows = value if which == "A" else value.transpose(1, 2)
        tab = self._table[:, j, :]
        used = tab >= 0
        self._write_rows(self.side(projection, which), tab[used],
                         rows.to(torch.float64, copy=True).cpu()[used])

    def factor(self, projection: str, which: str):
        raise AttributeError(
            "a pooled bank (--drlora-rank-pool) has no per-projection factor parameters; use "
            "dense_factor / write_dense_factor, or lora_factors for the forward")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Nothing (see ExpertLoRABank.sharded_state_dict)."""
        return {}

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, experts={self.global_expert_ids[0]}.."
                f"{self.global_expert_ids[-1]} of {self.num_global_experts}, "
                f"projections={self.projection_names}, r_max={self.r_max}, "
                f"slots={self.capacity}, scale={self.scale:g}")
