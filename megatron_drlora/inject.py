"""apply_drlora: find the MoE layers of a Megatron-Core model and give every routed expert
DR-LoRA adapters.

The base model is frozen, adapters are installed through forward hooks (module names and
checkpoint keys of the base stay unchanged) and the result is checked: a model without MoE
layers, an unknown experts implementation or an expert left without an adapter is an error,
never a silent partial adaptation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_drlora import comm
from megatron_drlora.adapters.bank import ExpertLoRABank, ProjectionSpec
from megatron_drlora.adapters.pool import PooledLoRABank, pool_capacity
from megatron_drlora.adapters import experts as attach
from megatron_drlora.adapters.shared import SharedExpertLoRA, attach_to_shared_expert
from megatron_drlora.compat import megatron as mcompat
from megatron_drlora.config import DRLoRAConfig

logger = logging.getLogger("megatron_drlora")


class DRLoRAInjectionError(RuntimeError):
    """The model cannot be adapted as asked; the message says why and what to change."""


@dataclass
class AdaptedLayer:
    """One MoE layer of this rank with its adapter bank."""

    moe_index: int            # index among the model's MoE layers (rows of the rank map)
    layer: int                # global 0-based transformer layer index
    moe_layer: torch.nn.Module
    experts: torch.nn.Module
    kind: str                 # sequential / te_grouped / legacy_grouped
    bank: ExpertLoRABank
    handles: List = field(default_factory=list)
    # --drlora-shared-experts uniform: the shared expert's LoRA (outside the DR-LoRA budget)
    shared: Optional[SharedExpertLoRA] = None
    shared_handles: List = field(default_factory=list)


def projection_specs(config: DRLoRAConfig, model_config, etp_size: int,
                     etp_rank: int, ffn: Optional[int] = None) -> List[ProjectionSpec]:
    """Shapes of the adapted projections of one expert (or, with `ffn`, of the shared
    expert), in config.targets order."""
    hidden = model_config.hidden_size
    ffn = ffn or model_config.moe_ffn_hidden_size or model_config.ffn_hidden_size
    gated = bool(model_config.gated_linear_unit)
    if getattr(model_config, "moe_latent_size", None):
        raise DRLoRAInjectionError("DR-LoRA does not support MoE latent projections "
                                   "(moe_latent_size); disable it")
    if "gate" in config.targets and not gated:
        raise DRLoRAInjectionError(
            "--drlora-targets includes 'gate' but the experts have no gated linear unit "
            "(no gate projection); use a gated MLP (--swiglu) or drop 'gate'")
    if ffn % etp_size:
        raise DRLoRAInjectionError(f"moe_ffn_hidden_size {ffn} is not divisible by the "
                                   f"expert-tensor-parallel size {etp_size}")
    specs = []
    for name in config.targets:
        if name in ("gate", "up"):
            specs.append(ProjectionSpec(name, "fc1", name if gated else None, hidden, ffn,
                                        etp_size, etp_rank))
        else:
            specs.append(ProjectionSpec(name, "fc2", None, ffn, hidden, etp_size, etp_rank))
    return specs


class DRLoRAModel:
    """Handle on an adapted model: its banks, the rank map and the parameter groups."""

    def __init__(self, chunks: List[torch.nn.Module], config: DRLoRAConfig,
                 layers: List[AdaptedLayer], num_moe_layers: int, num_experts: int,
                 moe_layer_numbers: List[int]):
        self.chunks = chunks
        self.config = config
        self.layers = layers
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.moe_layer_numbers = moe_layer_numbers  # global layer index of each MoE row
        self.projections = list(config.targets)
        self._input_grad_hooks: List = []

    # --- parameters -----------------------------------------------------------------------
    def lora_parameters(self) -> Iterator[torch.nn.Parameter]:
        for layer in self.layers:
            yield from layer.bank.parameters()

    def shared_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The shared experts' uniform LoRA (--drlora-shared-experts uniform): trained, but
        outside the DR-LoRA budget, its statistics and the rank map."""
        for layer in self.layers:
            if layer.shared is not None:
                yield from layer.shared.parameters()

    def router_parameters(self) -> Iterator[torch.nn.Parameter]:
        for layer in self.layers:
            yield from layer.moe_layer.router.parameters()

    # --- ranks ----------------------------------------------------------------------------
    def rank_map_shape(self):
        return (self.num_moe_layers, self.num_experts, len(self.projections))

    def initial_rank_map(self) -> torch.Tensor:
        """r_init everywhere, or the fixed map of --drlora-rank-map (checked against the model)."""
        if self.config.rank_map is None:
            return torch.full(self.rank_map_shape(), self.config.rank_init, dtype=torch.int64)
        return fixed_rank_map(self.config, self.rank_map_shape())

    def growth_group_capacity(self) -> Optional[Tuple[int, int]]:
        """(experts per EP rank, rank slots per layer of each rank's pool) when
        --drlora-rank-pool-capacity bounds the pool, for allocate_growth; else None. The same
        on every rank (uniform EP, every rank holds MoE layers, the pool size is a function of
        the config and the geometry)."""
        if self.config.rank_pool_capacity is None:
            return None
        bank = self.layers[0].bank
        return len(bank.global_expert_ids), bank.capacity

    def set_rank_map(self, rank_map: torch.Tensor) -> None:
        """Push a global [MoE layers, experts, projections] rank map into the local banks."""
        rank_map = torch.as_tensor(rank_map, dtype=torch.int64)
        if tuple(rank_map.shape) != self.rank_map_shape():
            raise ValueError(f"rank map shape {tuple(rank_map.shape)} != {self.rank_map_shape()} "
                             f"(MoE layers, experts, projections)")
        for layer in self.layers:
            ids = torch.tensor(layer.bank.global_expert_ids)
            layer.bank.set_ranks(rank_map[layer.moe_index, ids])

    def local_rank_map(self) -> torch.Tensor:
        """The global-shaped map with this rank's entries filled in, -1 elsewhere."""
        out = torch.full(self.rank_map_shape(), -1, dtype=torch.int64)
        for layer in self.layers:
            out[layer.moe_index, torch.tensor(layer.bank.global_expert_ids)] = layer.bank.ranks.cpu()
        return out

    # --- bookkeeping ----------------------------------------------------------------------
    def summary(self) -> Dict[str, int]:
        """Counts over this rank's MoE layers (global experts, full unsharded sizes)."""
        cfg = self.config
        per_rank = 0
        if self.layers:
            specs = self.layers[0].bank.specs.values()
            per_rank = sum(s.in_features + s.out_features for s in specs)
        stage_layers = sorted({layer.moe_index for layer in self.layers})
        modules = len(stage_layers) * self.num_experts * len(self.projections)
        return {
            "moe_layers_here": len(stage_layers),
            "moe_layers_total": self.num_moe_layers,
            "experts_per_layer": self.num_experts,
            "local_experts": len(self.layers[0].bank.global_expert_ids) if self.layers else 0,
            "modules_here": modules,
            "params_at_r_init": len(stage_layers) * self.num_experts * per_rank * cfg.rank_init,
            "params_at_r_target": len(stage_layers) * self.num_experts * per_rank * cfg.budget,
            "params_allocated_r_max": len(stage_layers) * self.num_experts * per_rank
            * cfg.rank_max,
        }

    def shared_summary(self) -> Dict:
        """The shared experts' adapters over all MoE layers (every MoE layer has one when they
        are adapted; full, unsharded sizes), next to the routed budget over the same layers."""
        shared = [layer.shared for layer in self.layers if layer.shared is not None]
        per_layer = shared[0].num_parameters() if shared else 0
        routed = self.summary()
        here = max(1, routed["moe_layers_here"])
        return {"mode": self.config.shared_experts, "rank": self.config.budget if shared else 0,
                "layers": self.num_moe_layers if shared else 0,
                "params": per_layer * self.num_moe_layers if shared else 0,
                "routed_params_at_r_target": routed["params_at_r_target"] // here
                * self.num_moe_layers}

    def shared_summary_text(self) -> str:
        s = self.shared_summary()
        if not s["layers"]:
            return f"DR-LoRA shared experts: no adapter (--drlora-shared-experts {s['mode']})"
        return (f"DR-LoRA shared experts: uniform LoRA rank {s['rank']} on the shared experts "
                f"of {s['layers']} MoE layers ({','.join(self.projections)}) = {s['params']:,} "
                f"params, outside the DR-LoRA budget (routed experts at r_target: "
                f"{s['routed_params_at_r_target']:,} params, all MoE layers)")

    def pooled_banks(self) -> List:
        """This rank's rank-pool banks (none with --no-drlora-rank-pool)."""
        return [layer.bank for layer in self.layers if getattr(layer.bank, "pooled", False)]

    def pool_text(self) -> str:
        """--drlora-rank-pool: the slots per layer on this rank against uniform LoRA at
        r_target and the dense bank (r_max), for the start-up log ("" without the pool)."""
        pooled = self.pooled_banks()
        if not pooled:
            return ""
        bank, cfg = pooled[0], self.config
        modules = len(bank.global_expert_ids) * len(bank.projection_names)
        return (f"; rank pool: {bank.capacity} rank slots per MoE layer for this rank's "
                f"{modules} expert modules ({bank.capacity / (modules * cfg.budget):.2f}x "
                f"uniform LoRA at r_target {cfg.budget}, dense bank at r_max "
                f"{cfg.rank_max}: {modules * cfg.rank_max})")

    def summary_text(self) -> str:
        s = self.summary()
        kinds = sorted({layer.kind for layer in self.layers})
        return (f"DR-LoRA adapted {s['moe_layers_here']}/{s['moe_layers_total']} MoE layers here "
                f"x {s['experts_per_layer']} experts ({s['local_experts']} local, "
                f"{'/'.join(kinds)}) x {len(self.projections)} projections "
                f"({','.join(self.projections)}) = {s['modules_here']} modules; trainable "
                f"LoRA params (all experts of these layers): r_init {s['params_at_r_init']:,}, "
                f"r_target {s['params_at_r_target']:,}, {self._allocated_text(s)}"
                f"{self.pool_text()}")

    def _allocated_text(self, s: Dict[str, int]) -> str:
        """What is allocated: every module at r_max (dense bank), or the pool's slots."""
        pooled = self.pooled_banks()
        if not pooled:
            return f"allocated r_max {s['params_allocated_r_max']:,}"
        spec = next(iter(pooled[0].specs.values()))
        per_slot = spec.in_features + spec.out_features  # one rank: hidden + expert ffn
        slots = sum(bank.capacity for bank in pooled)
        return (f"allocated {slots * per_slot:,} in rank-pool slots on this rank (the dense "
                f"bank would allocate r_max {s['params_allocated_r_max']:,})")

    def remove(self) -> None:
        """Detach all hooks (the banks stay registered, so state can still be read)."""
        for layer in self.layers:
            for handle in layer.handles + layer.shared_handles:
                handle.remove()
            layer.handles, layer.shared_handles = [], []
        for handle in self._input_grad_hooks:
            handle.remove()
        self._input_grad_hooks = []


def _iter_transformer_layers(chunk: torch.nn.Module):
    decoder = getattr(chunk, "decoder", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise DRLoRAInjectionError(
            f"expected a Megatron-Core GPTModel (with .decoder.layers), got {type(chunk).__name__}")
    return list(decoder.layers)


def fixed_rank_map(config: DRLoRAConfig, shape) -> torch.Tensor:
    """--drlora-rank-map as a tensor, refused unless it has this model's shape."""
    rank_map = torch.tensor(config.rank_map, dtype=torch.int64)
    if tuple(rank_map.shape) != tuple(shape):
        raise DRLoRAInjectionError(
            f"--drlora-rank-map has shape {tuple(rank_map.shape)} but this model needs "
            f"{tuple(shape)} (MoE layers, experts, target projections)")
    return rank_map


def apply_drlora(model, config: DRLoRAConfig, log: Optional[Callable[[str], None]] = None,
                 legacy_gmm=None) -> DRLoRAModel:
    """Freeze the base, install DR-LoRA on every routed expert, and return a handle.

    `model` is a GPTModel or a list of model chunks (virtual pipeline); call before wrapping in
    DDP. `legacy_gmm` overrides grouped_gemm's kernel for the legacy GroupedMLP (tests).
    """
    if not isinstance(config, DRLoRAConfig):
        raise TypeError("apply_drlora needs a DRLoRAConfig")
    chunks = mcompat.model_chunks(model)
    model_config = chunks[0].config
    if not getattr(model_config, "num_moe_experts", None):
        raise DRLoRAInjectionError(
            "the model has no MoE layers (num_moe_experts is not set): DR-LoRA adapts routed "
            "experts; build the model with --num-experts")
    pattern = mcompat.moe_layer_pattern(model_config)
    moe_layer_numbers = [i for i, is_moe in enumerate(pattern) if is_moe]
    moe_index_of = {layer: i for i, layer in enumerate(moe_layer_numbers)}
    num_experts = int(model_config.num_moe_experts)
    if config.rank_map is not None:  # before any layer is sized by it (the rank pool)
        fixed_rank_map(config, (len(moe_layer_numbers), num_experts, len(config.targets)))

    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)

    adapted: List[AdaptedLayer] = []
    for chunk in chunks:
        for layer in _iter_transformer_layers(chunk):
            mlp = getattr(layer, "mlp", None)
            if mlp is None or not mcompat.is_moe_layer(mlp):
                continue
            index = mcompat.global_layer_index(layer)
            if index not in moe_index_of:
                raise DRLoRAInjectionError(
                    f"layer {index} is an MoE layer but moe_layer_freq says it is dense")
            adapted.append(_adapt_layer(mlp, index, moe_index_of[index], num_experts, config,
                                        model_config, legacy_gmm))
            if config.router != "frozen":
                for param in mlp.router.parameters():
                    param.requires_grad_(True)

    if not adapted:
        raise DRLoRAInjectionError(
            "no MoE layer found in the model (this pipeline stage has none?): DR-LoRA needs "
            "MoELayer modules in decoder.layers")
    handle = DRLoRAModel(chunks, config, adapted, len(moe_layer_numbers), num_experts,
                         moe_layer_numbers)
    _verify_every_expert_adapted(handle)
    if getattr(model_config, "recompute_granularity", None) is not None:
        handle._input_grad_hooks = _make_inputs_require_grad(chunks)
    (log or logger.info)(handle.summary_text())
    if config.shared_experts != "none":
        (log or logger.info)(handle.shared_summary_text())
    return handle


def _adapt_layer(mlp, layer_index, moe_index, num_experts, config, model_config, legacy_gmm):
    experts = mlp.experts
    kind = mcompat.expert_kind(experts)
    ep_group, etp_group = mcompat.expert_groups(experts)
    ep_size, ep_rank = comm.group_size(ep_group), comm.group_rank(ep_group)
    etp_size, etp_rank = comm.group_size(etp_group), comm.group_rank(etp_group)
    num_local = mcompat.num_local_experts(experts)
    if num_local * ep_size != num_experts:
        raise DRLoRAInjectionError(f"layer {layer_index}: {num_local} local experts x EP "
                                   f"{ep_size} != {num_experts} experts")
    specs = projection_specs(config, model_config, etp_size, etp_rank)
    base_weight = next(experts.parameters())
    expert_ids = [ep_rank * num_local + i for i in range(num_local)]
    common = dict(layer=layer_index, global_expert_ids=expert_ids,
                  num_global_experts=num_experts, projections=specs, r_max=config.rank_max,
                  r_init=config.rank_init, scale=config.scale, dropout=config.dropout,
                  seed=config.seed, dtype=base_weight.dtype, device=base_weight.device)
    if config.rank_pool:
        fixed = None
        if config.rank_map is not None:
            fixed = sum(sum(config.rank_map[moe_index][e]) for e in expert_ids)
        num_moe_layers = sum(1 for x in mcompat.moe_layer_pattern(model_config) if x)
        capacity = pool_capacity(config, num_experts, num_local, len(specs), num_moe_layers,
                                 fixed)
        bank = PooledLoRABank(capacity=capacity, **common)
    else:
        bank = ExpertLoRABank(**common)
    # Registered on the MoE layer (not inside the experts module) so the experts' own
    # sharded_state_dict and load paths never see adapter tensors.
    mlp.add_module("drlora", bank)
    if kind == "sequential":
        handles = attach.attach_to_sequential(experts, bank, etp_group)
    elif kind == "te_grouped":
        handles = attach.attach_to_grouped_linears(experts, bank, etp_group)
    else:
        handles = attach.attach_to_legacy_grouped(experts, bank, etp_group, gmm=legacy_gmm)
    adapted = AdaptedLayer(moe_index, layer_index, mlp, experts, kind, bank, handles)
    if config.shared_experts == "uniform":
        _adapt_shared_expert(adapted, config, model_config)
    return adapted


def _adapt_shared_expert(adapted: AdaptedLayer, config: DRLoRAConfig, model_config) -> None:
    """Uniform LoRA at r_target on the shared expert (see adapters/shared.py)."""
    shared = getattr(adapted.moe_layer, "shared_experts", None)
    if shared is None:
        raise DRLoRAInjectionError(
            f"--drlora-shared-experts uniform: MoE layer {adapted.layer} has no shared expert "
            f"(--moe-shared-expert-intermediate-size is not set); use --drlora-shared-experts "
            f"none for a model without shared experts")
    if getattr(shared.config, "moe_shared_expert_overlap", False):
        raise DRLoRAInjectionError(
            "--drlora-shared-experts uniform cannot be combined with "
            "--moe-shared-expert-overlap (the overlapped shared expert runs its linears "
            "outside their usual TP communication); drop --moe-shared-expert-overlap")
    tp_group = getattr(shared, "tp_group", None)
    tp_size, tp_rank = comm.group_size(tp_group), comm.group_rank(tp_group)
    ffn = int(shared.config.ffn_hidden_size)  # SharedExpertMLP: the shared intermediate size
    if ffn % tp_size:
        raise DRLoRAInjectionError(f"the shared expert's intermediate size {ffn} is not "
                                   f"divisible by the tensor-parallel size {tp_size}")
    weight = shared.linear_fc1.weight
    adapter = SharedExpertLoRA(
        adapted.layer, projection_specs(config, model_config, tp_size, tp_rank, ffn=ffn),
        rank=config.budget, scale=config.scale, dropout=config.dropout, seed=config.seed,
        sequence_parallel=bool(shared.config.sequence_parallel), tp_group=tp_group,
        dtype=weight.dtype, device=weight.device)
    adapted.moe_layer.add_module("drlora_shared", adapter)
    adapted.shared = adapter
    adapted.shared_handles = attach_to_shared_expert(shared, adapter)


def _verify_every_expert_adapted(handle: DRLoRAModel) -> None:
    """Never leave an expert without an adapter silently (lessons.md, Targeting)."""
    for layer in handle.layers:
        bank = layer.bank
        num_local = mcompat.num_local_experts(layer.experts)
        if len(bank.global_expert_ids) != num_local:
            raise DRLoRAInjectionError(f"layer {layer.layer}: {len(bank.global_expert_ids)} "
                                       f"adapters for {num_local} local experts")
        linears = {bank.specs[n].linear for n in bank.projection_names}
        expected = (num_local * len(linears) + 1 if layer.kind == "sequential"
                    else len(linears) if layer.kind == "te_grouped" else 1)
        if len(layer.handles) != expected:
            raise DRLoRAInjectionError(f"layer {layer.layer}: installed {len(layer.handles)} "
                                       f"adapter hooks, expected {expected}")
        for pname, param in bank.named_parameters():
            if not param.requires_grad:
                raise DRLoRAInjectionError(f"layer {layer.layer}: {pname} is frozen")


def _make_inputs_require_grad(chunks) -> List:
    """With a frozen base and activation recompute, a checkpointed block whose input does not
    require grad is never re-run in backward, and LoRA gets no gradient. Making the embedding
    output require grad keeps the checkpoint in the graph (Megatron-Bridge peft/recompute.py)."""
    handles = []
    for chunk in chunks:
        embedding = getattr(chunk, "embedding", None)
        if embedding is None:
            continue

        def hook(module, args, output):
            if torch.is_grad_enabled() and not output.requires_grad:
                output.requires_grad_(True)
            return output

        handles.append(embedding.register_forward_hook(hook))
    return handles
