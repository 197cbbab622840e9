"""What Megatron-LM's checkpointing sees of an adapted model chunk.

Megatron-LM saves `model.sharded_state_dict()` and loads with `model.load_state_dict(...)`.
For a DR-LoRA run both are replaced on the chunk instance (the class and the base's own keys
stay untouched), so `--save/--load/--async-save/--finetune` handle exactly what trains:
- the adapter factors of the chunk's MoE layers, keyed by global (layer, expert, projection),
  so a checkpoint loads under another TP/EP/PP layout;
- the router, unless DR-LoRA keeps it frozen for the whole run; an aux-loss-free router's
  expert bias always (Megatron-LM updates it every step whatever trains);
- the DR-LoRA state (rank map, saliency EMAs, the settings that shape the schedule), held by
  the first chunk as a plain value, i.e. in dist_checkpointing's common state (identical on
  every rank by construction).
The frozen base is never written: it comes from `--pretrained-checkpoint` on every start.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_drlora.checkpoint import STATE_KEY, adapter_sharded_state_dict


def _router_key(key: str) -> bool:
    return ".mlp.router." in key


def _expert_bias_key(key: str) -> bool:
    return key.endswith(".mlp.router.expert_bias")


def _chunk_layers(chunk, handle) -> List:
    modules = {id(m) for m in chunk.modules()}
    return [layer for layer in handle.layers if id(layer.moe_layer) in modules]


def install(chunk, run, holds_state: bool) -> None:
    """Replace `chunk.sharded_state_dict` / `chunk.load_state_dict` by the DR-LoRA view."""
    full_sharded_state_dict = chunk.sharded_state_dict
    layers = _chunk_layers(chunk, run.handle)
    train_router = run.config.router != "frozen"
    expert_bias = bool(getattr(getattr(chunk, "config", None), "moe_router_enable_expert_bias",
                               False))

    def saved_router_key(key: str) -> bool:
        return _router_key(key) and (train_router or _expert_bias_key(key))

    def sharded_state_dict(prefix: str = "", sharded_offsets=(), metadata=None) -> Dict:
        out = {}
        if train_router or expert_bias:
            full = full_sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                           metadata=metadata)
            out.update({k: v for k, v in full.items() if saved_router_key(k)})
        out.update(adapter_sharded_state_dict(run.handle, layers))
        if holds_state:
            out[STATE_KEY] = run.checkpoint_state()
        return out

    adapter_params = {key: sharded.data for key, sharded in
                      adapter_sharded_state_dict(run.handle, layers).items()}

    def load_state_dict(state_dict: Dict, strict: bool = True):
        state_dict = dict(state_dict)
        state = state_dict.pop(STATE_KEY, None)
        if holds_state and state is None:
            raise RuntimeError("the checkpoint has no DR-LoRA state (rank map, saliency): it "
                               "was not written by a DR-LoRA run; a base model goes to "
                               "--pretrained-checkpoint, not --load")
        with torch.no_grad():
            missing = [k for k in adapter_params if k not in state_dict]
            if missing:
                raise RuntimeError(f"the checkpoint lacks {len(missing)} DR-LoRA adapter "
                                   f"tensors, e.g. {missing[:3]}")
            for key, param in adapter_params.items():
                value = state_dict.pop(key)
                if value.data_ptr() != param.data_ptr():
                    param.copy_(value)
        router = {k: state_dict.pop(k) for k in list(state_dict) if _router_key(k)}
        router = {k: v for k, v in router.items() if saved_router_key(k)}
        if router:
            result = torch.nn.Module.load_state_dict(chunk, router, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"router tensors that fit no router of this model: "
                                   f"{result.unexpected_keys[:3]}")
        if strict and state_dict:
            raise RuntimeError(f"unexpected tensors in a DR-LoRA checkpoint: {list(state_dict)[:3]}")
        if state is not None:
            run.load_checkpoint_state(state)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    chunk.sharded_state_dict = sharded_state_dict
    chunk.load_state_dict = load_state_dict
