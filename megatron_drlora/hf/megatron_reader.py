"""Read tensors from Megatron dist checkpoints one layer at a time, without building a model.

`dist_checkpointing.load` accepts any sharded state dict whose ShardedTensors cover part of the
saved global tensors, and reads only those parts. A request for layer l of a stacked key is a
ShardedTensor of local shape [1, ...] at offset l along the layer axis, so exporting a model
needs the memory of one layer (plus the adapters), whatever the layout it was saved from.

`AdapterCheckpoint` adds what a DR-LoRA checkpoint means: the DR-LoRA config and rank map from
the common state (key "drlora", written by the controller), the adapted layers (from the global
adapter keys `drlora.layers.{layer}.{proj}_{A|B}`, shapes A [E, r_max, k], B [E, d, r_max]) and
the router when it was trained.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional

import torch

from megatron_drlora.hf.common import (HFInteropError, checkpoint_errors,
                                       ensure_single_process_group, resolve_iteration_dir)

ADAPTER_KEY = re.compile(r"^drlora\.layers\.(\d+)\.(gate|up|down)_(A|B)$")
SHARED_KEY = re.compile(r"^drlora\.shared\.(\d+)\.(gate|up|down)_(A|B)$")


class DistCheckpoint:
    """Metadata, common state and partial reads of one dist_checkpointing directory."""

    def __init__(self, path: str, flag: str, iteration: Optional[int] = None):
        from megatron.core import dist_checkpointing

        self.flag = flag
        self.path = resolve_iteration_dir(path, flag, iteration)
        ensure_single_process_group()
        try:
            self.meta = dist_checkpointing.load_tensors_metadata(self.path)
            self.common = dist_checkpointing.load_common_state_dict(self.path)
        except checkpoint_errors() as e:  # re-raised with the flag named
            raise HFInteropError(f"{flag} {self.path}: cannot read the checkpoint "
                                 f"({type(e).__name__}: {e})") from e

    @property
    def kind(self) -> str:
        from megatron_drlora.checkpoint import drlora_state

        return "adapters" if drlora_state(self.common) is not None else "full"

    def has(self, key: str) -> bool:
        return key in self.meta

    def shape(self, key: str) -> tuple:
        if key not in self.meta:
            raise HFInteropError(f"{self.flag} {self.path}: no tensor {key!r} in the checkpoint")
        return tuple(self.meta[key].global_shape)

    def keys(self) -> List[str]:
        return list(self.meta)

    def has_layer_tensor(self, suffix: str) -> bool:
        """A layer-stacked `decoder.layers.<suffix>` or a per-layer `decoder.layers.L.<suffix>`
        (Megatron's keys when the layers differ, e.g. dense first layers)."""
        return self.layer_key(suffix) is not None or any(
            k.startswith("decoder.layers.") and k.split(".", 3)[-1] == suffix
            and k.split(".")[2].isdigit() for k in self.meta)

    def layer_key(self, suffix: str, layer: Optional[int] = None) -> Optional[str]:
        """The key holding `suffix` of `layer` (None: the layer-stacked key), None if absent."""
        key = f"decoder.layers.{suffix}" if layer is None else f"decoder.layers.{layer}.{suffix}"
        return key if key in self.meta else None

    def layer_tensor(self, suffix: str, layer: int) -> Optional[torch.Tensor]:
        """`suffix` of one layer from a stacked or a per-layer key; None if that layer has none."""
        stacked = self.layer_key(suffix)
        if stacked is not None:
            return self.load([stacked], layer=layer)[stacked]
        key = self.layer_key(suffix, layer)
        return None if key is None else self.load([key])[key]

    def load(self, keys: Iterable[str], layer: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Whole tensors, or with `layer` the [layer] slice of layer-stacked tensors."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for key in keys:
            shape, dtype = self.shape(key), self.meta[key].dtype
            if layer is None:
                request[key] = ShardedTensor.from_rank_offsets(
                    key, torch.empty(shape, dtype=dtype), replica_id=0)
            else:
                if not 0 <= layer < shape[0]:
                    raise HFInteropError(f"{self.flag} {self.path}: {key} has {shape[0]} layers, "
                                         f"layer {layer} requested")
                request[key] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1,) + shape[1:], dtype=dtype), (0, layer, shape[0]),
                    replica_id=0)
        if not request:
            return {}
        try:
            # A partial request (one layer) does not cover the tensors: skip that check.
            loaded = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
        except checkpoint_errors() as e:
            raise HFInteropError(f"{self.flag} {self.path}: reading {list(request)[:3]} failed "
                                 f"({type(e).__name__}: {e})") from e
        # load() also returns the common state; keep only what was asked for.
        return {k: (loaded[k][0] if layer is not None else loaded[k]) for k in request}


class AdapterCheckpoint(DistCheckpoint):
    """A DR-LoRA adapter checkpoint (see the module docstring)."""

    def __init__(self, path: str, flag: str = "--load", iteration: Optional[int] = None):
        super().__init__(path, flag, iteration)
        from megatron_drlora.config import DRLoRAConfig

        if self.kind != "adapters":
            raise HFInteropError(f"{flag} {self.path}: a '{self.kind}' checkpoint, not DR-LoRA "
                                 f"adapters (a base model goes to --pretrained-checkpoint)")
        from megatron_drlora.checkpoint import drlora_state

        state = drlora_state(self.common)
        if not state or "rank_map" not in state or "config" not in state:
            raise HFInteropError(f"{flag} {self.path}: no DR-LoRA state (rank map, config) in "
                                 f"the checkpoint's common state")
        self.config = DRLoRAConfig.from_dict(dict(state["config"]), source=f"{flag} {self.path}")
        self.rank_map = torch.as_tensor(state["rank_map"], dtype=torch.int64)
        self.projections = list(self.config.targets)
        found: Dict[int, set] = {}
        for key in self.meta:
            m = ADAPTER_KEY.match(key)
            if m:
                found.setdefault(int(m.group(1)), set()).add((m.group(2), m.group(3)))
        self.layers = sorted(found)
        want = {(p, w) for p in self.projections for w in ("A", "B")}
        for layer, have in found.items():
            if have != want:
                raise HFInteropError(f"{flag} {self.path}: layer {layer} has adapter tensors "
                                     f"{sorted(have)}, the DR-LoRA config targets "
                                     f"{self.projections}")
        shape = tuple(self.rank_map.shape)
        if len(shape) != 3 or shape[0] != len(self.layers) or shape[2] != len(self.projections):
            raise HFInteropError(f"{flag} {self.path}: rank map shape {shape} does not match "
                                 f"{len(self.layers)} adapted layers x experts x "
                                 f"{len(self.projections)} projections")
        self.num_experts = shape[1]
        self.r_max = self.config.rank_max
        if int(self.rank_map.min()) < 0 or int(self.rank_map.max()) > self.r_max:
            raise HFInteropError(f"{flag} {self.path}: rank map values outside [0, r_max="
                                 f"{self.r_max}]")
        self.router_trained = self.has_layer_tensor("mlp.router.weight")
        # --drlora-shared-experts uniform: every adapted layer's shared expert has LoRA
        shared = {int(m.group(1)) for m in map(SHARED_KEY.match, self.meta) if m}
        self.shared_adapted = self.config.shared_experts == "uniform"
        if self.shared_adapted and shared != set(self.layers):
            raise HFInteropError(f"{flag} {self.path}: --drlora-shared-experts uniform but "
                                 f"shared-expert adapters for layers {sorted(shared)}, not the "
                                 f"MoE layers {self.layers}")
        if shared and not self.shared_adapted:
            raise HFInteropError(f"{flag} {self.path}: shared-expert adapters in a checkpoint "
                                 f"whose config says --drlora-shared-experts "
                                 f"{self.config.shared_experts}")

    @property
    def scale(self) -> float:
        return self.config.scale

    def moe_index(self, layer: int) -> int:
        return self.layers.index(layer)

    def ranks(self, layer: int, projection: str) -> List[int]:
        return self.rank_map[self.moe_index(layer), :, self.projections.index(projection)].tolist()

    def factors(self, layer: int) -> Dict[str, Dict[str, torch.Tensor]]:
        """{projection: {'A': [E, r_max, k], 'B': [E, d, r_max]}} in fp32."""
        keys = [f"drlora.layers.{layer}.{p}_{w}" for p in self.projections for w in ("A", "B")]
        loaded = self.load(keys)
        return {p: {w: loaded[f"drlora.layers.{layer}.{p}_{w}"].float() for w in ("A", "B")}
                for p in self.projections}

    def shared_factors(self, layer: int) -> Dict[str, Dict[str, torch.Tensor]]:
        """The shared expert's LoRA {projection: {'A': [r, k], 'B': [d, r]}} in fp32 (active
        at its whole rank r_target); {} when shared experts were not adapted."""
        if not self.shared_adapted:
            return {}
        keys = [f"drlora.shared.{layer}.{p}_{w}" for p in self.projections for w in ("A", "B")]
        loaded = self.load(keys)
        return {p: {w: loaded[f"drlora.shared.{layer}.{p}_{w}"].float() for w in ("A", "B")}
                for p in self.projections}

    def router(self, layer: int) -> Optional[torch.Tensor]:
        if not self.router_trained:
            return None
        return self.layer_tensor("mlp.router.weight", layer)  # None: a dense layer

    def expert_bias(self, layer: int) -> Optional[torch.Tensor]:
        """The sigmoid router's expert bias as training left it (Megatron updates it even with
        the router frozen), None without one or in a dense layer."""
        return self.layer_tensor("mlp.router.expert_bias", layer)

    def check_against(self, desc) -> None:
        """Adapter shapes, expert and layer counts against the HF model description."""
        where = f"{self.flag} {self.path}"
        if self.num_experts != desc.num_experts:
            raise HFInteropError(f"{where}: adapters for {self.num_experts} experts per layer, "
                                 f"the HF model has {desc.num_experts} (num_experts); wrong "
                                 f"--hf-path?")
        if self.layers and self.layers[-1] >= desc.num_layers:
            raise HFInteropError(f"{where}: adapters for layer {self.layers[-1]}, the HF model "
                                 f"has {desc.num_layers} layers")
        h, i = desc.hidden_size, desc.moe_ffn_hidden_size
        expected = {"gate": (h, i), "up": (h, i), "down": (i, h)}
        layer = self.layers[0] if self.layers else None
        for p in self.projections:
            if layer is None:
                break
            k, d = expected[p]
            a = self.shape(f"drlora.layers.{layer}.{p}_A")
            b = self.shape(f"drlora.layers.{layer}.{p}_B")
            if a != (desc.num_experts, self.r_max, k) or b != (desc.num_experts, d, self.r_max):
                raise HFInteropError(
                    f"{where}: {p} adapter shapes A {a}, B {b} do not fit the HF model (expected "
                    f"A {(desc.num_experts, self.r_max, k)}, B {(desc.num_experts, d, self.r_max)}"
                    f": hidden {h}, expert ffn {i}); wrong --hf-path?")
        if self.shared_adapted and self.layers:
            self._check_shared_against(desc, where)

    def _check_shared_against(self, desc, where: str) -> None:
        shared = desc.shared_expert_ffn
        if not shared:
            raise HFInteropError(f"{where}: shared-expert adapters, but the HF model "
                                 f"({desc.family}) has no shared expert; wrong --hf-path?")
        h, r = desc.hidden_size, self.config.budget
        expected = {"gate": (h, shared), "up": (h, shared), "down": (shared, h)}
        layer = self.layers[0]
        for p in self.projections:
            k, d = expected[p]
            a = self.shape(f"drlora.shared.{layer}.{p}_A")
            b = self.shape(f"drlora.shared.{layer}.{p}_B")
            if a != (r, k) or b != (d, r):
                raise HFInteropError(f"{where}: shared-expert {p} adapter shapes A {a}, B {b} "
                                     f"do not fit the HF model (expected A {(r, k)}, B "
                                     f"{(d, r)}); wrong --hf-path?")


def check_base_against(base: DistCheckpoint, desc, padded_vocab: Optional[int] = None) -> None:
    """The Megatron base's global shapes against the HF model description."""
    from megatron_drlora.hf import mapping as m

    where = f"{base.flag} {base.path}"
    if base.kind != "full":
        raise HFInteropError(f"{where}: holds DR-LoRA adapters, not a base model")
    router = "decoder.layers." + m.ROUTER
    if not base.has_layer_tensor(m.ROUTER):
        raise HFInteropError(f"{where}: no MoE router ({router}); not an MoE base?")
    if base.has(router):
        layers, experts, hidden = base.shape(router)
    else:  # per-layer keys (dense first layers): the last layer is an MoE layer
        last = base.layer_key(m.ROUTER, desc.num_layers - 1)
        if last is None:
            raise HFInteropError(f"{where}: no MoE router in layer {desc.num_layers - 1}; the HF "
                                 f"model has {desc.num_layers} layers: they do not match")
        layers, (experts, hidden) = desc.num_layers, base.shape(last)
    if (layers, experts, hidden) != (desc.num_layers, desc.num_experts, desc.hidden_size):
        raise HFInteropError(f"{where}: the base has {layers} layers x {experts} experts, hidden "
                             f"{hidden}; the HF model has {desc.num_layers} x {desc.num_experts}, "
                             f"hidden {desc.hidden_size}: they do not match")
    fc1_key = base.layer_key(m.EXPERT_FC1) or base.layer_key(m.EXPERT_FC1, desc.num_layers - 1)
    fc1 = base.shape(fc1_key)
    if fc1[-2] != 2 * desc.moe_ffn_hidden_size:
        raise HFInteropError(f"{where}: expert fc1 has {fc1[-2]} rows, the HF model's experts "
                             f"need 2 x {desc.moe_ffn_hidden_size}")
    features = {"multi-latent attention": ("self_attention.linear_kv_down_proj.weight",
                                           desc.mla),
                "qkv biases": (m.QKV_BIAS, desc.qkv_bias),
                "a shared expert": (m.SHARED_FC1, bool(desc.shared_expert_ffn)),
                "an attention output bias": (m.PROJ_BIAS, desc.attention_output_bias),
                "LayerNorm biases": (m.ATTN_NORM_BIAS, desc.normalization == "LayerNorm")}
    if desc.mla:  # MLA's q latent norm has Qwen3's q norm key
        features["a q LoRA (q_lora_rank)"] = ("self_attention.linear_q_down_proj.weight",
                                               desc.q_lora_rank is not None)
    else:
        features["q/k norms (qk_layernorm)"] = (m.Q_NORM, desc.qk_norm != "none")
    for what, (suffixes, wanted) in features.items():
        suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
        if any(base.has_layer_tensor(s) for s in suffixes) != wanted:
            raise HFInteropError(f"{where}: the base {'lacks' if wanted else 'has'} {what}, the "
                                 f"HF model ({desc.family}) {'has' if wanted else 'does not'}: "
                                 f"they do not match")
    if base.has(m.OUTPUT) == desc.tie_word_embeddings:
        raise HFInteropError(f"{where}: output layer {'untied' if base.has(m.OUTPUT) else 'tied'}"
                             f" in the base, tie_word_embeddings={desc.tie_word_embeddings} in "
                             f"the HF model")
    if base.has(m.OUTPUT_BIAS) != desc.lm_head_bias:
        where_bias = "in" if base.has(m.OUTPUT_BIAS) else "not in"
        raise HFInteropError(f"{where}: output layer bias {where_bias} the base, "
                             f"lm_head_bias={desc.lm_head_bias} in the HF model")
    vocab = base.shape(m.EMBED)[0]
    if vocab < desc.vocab_size:
        raise HFInteropError(f"{where}: vocabulary {vocab} < the HF model's {desc.vocab_size}")
