"""Checkpoints: adapter-only dist_checkpointing saves with the DR-LoRA state, written atomically.

Layout (Megatron-like): `SAVE/iter_0000100/` and `SAVE/latest_checkpointed_iteration.txt`.
A checkpoint is written into `iter_0000100.tmp/` and renamed only after every rank finished,
and the tracker file is replaced atomically afterwards, so a crash or kill during a save leaves
the previous checkpoint (and the tracker pointing at it) intact.

- DR-LoRA runs save only what trains: the adapter factors (keyed by global layer, global expert
  and projection, so they load under any TP/EP/PP layout), the router if trained, the optimizer,
  the scheduler and the DR-LoRA state (rank map, saliency EMAs). The frozen base comes from
  `--pretrained-checkpoint`.
- Runs without DR-LoRA (making a base) save the whole model.
- The base is loaded into an adapted model without ever seeing adapter keys: the adapter banks
  contribute nothing to Megatron's own sharded_state_dict.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import torch

from megatron_drlora import comm

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; says which and why."""


def _load_failures() -> tuple:
    """What a failed dist_checkpointing load raises: torch's CheckpointException derives from
    BaseException, not Exception, so it is listed explicitly."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:
        return (Exception,)
    return (Exception, CheckpointException)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker names, or None if `root` holds no finished checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(f"{path} names iteration {iteration} but "
                              f"{iteration_dir(root, iteration)} does not exist")
    return iteration


# --- sharded state dicts ------------------------------------------------------------------
def adapter_sharded_state_dict(handle) -> Dict:
    """ShardedTensors of every local adapter factor, keyed by global identity."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    edp_rank = comm.expert_data_parallel_rank()
    for layer in handle.layers:
        bank = layer.bank
        num_local = len(bank.global_expert_ids)
        ep_size = bank.num_global_experts // num_local
        ep_rank = bank.global_expert_ids[0] // num_local
        for name in bank.projection_names:
            spec = bank.specs[name]
            for which, sharded, dim in (("A", spec.a_sharded, 2), ("B", spec.b_sharded, 1)):
                offsets = [(0, ep_rank, ep_size)]
                if sharded:
                    offsets.append((dim, spec.tp_rank, spec.tp_size))
                replica = (0, 0 if sharded else spec.tp_rank, edp_rank)
                key = f"drlora.layers.{layer.layer}.{name}_{which}"
                out[key] = ShardedTensor.from_rank_offsets(
                    key, bank.factor(name, which), *offsets, replica_id=replica)
    return out


def _model_sharded_state_dict(chunks) -> Dict:
    out = {}
    for i, chunk in enumerate(chunks):
        sd = chunk.sharded_state_dict()
        out.update(sd if len(chunks) == 1 else {f"model{i}.{k}": v for k, v in sd.items()})
    return out


def trainable_sharded_state_dict(chunks, handle) -> Dict:
    """What a run saves: adapters + trained router (DR-LoRA) or the whole model (no DR-LoRA)."""
    if handle is None:
        return _model_sharded_state_dict(chunks)
    out = adapter_sharded_state_dict(handle)
    if handle.config.router != "frozen":
        for chunk in chunks:
            for key, value in chunk.sharded_state_dict().items():
                if ".mlp.router." in key:
                    out[key] = value
    return out


# --- save -----------------------------------------------------------------------------------
def save_checkpoint(root: str, iteration: int, chunks, handle=None, optimizer=None,
                    extra: Optional[Dict] = None) -> str:
    """Write iteration's checkpoint atomically; returns its directory."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    rank = comm.world_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    model_sd = trainable_sharded_state_dict(chunks, handle)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    state.update(extra or {})
    state["iteration"] = iteration
    state["drlora_checkpoint_kind"] = "adapters" if handle is not None else "full"
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as fh:
            fh.write(str(iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    return final


def _barrier():
    if comm.is_distributed():
        import torch.distributed as dist

        dist.barrier()


# --- load -----------------------------------------------------------------------------------
def load_checkpoint(root: str, chunks, handle=None, optimizer=None, load_optimizer=True,
                    iteration: Optional[int] = None) -> Dict:
    """Load adapters (or the whole model), the optimizer and the common state; returns the
    common state (iteration, scheduler, drlora, ...)."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {TRACKER}; nothing to resume from")
    path = iteration_dir(root, iteration)
    kind = "adapters" if handle is not None else "full"
    model_sd = trainable_sharded_state_dict(chunks, handle)
    request = {"model": model_sd}
    if optimizer is not None and load_optimizer:
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True,
            metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    common = dist_checkpointing.load_common_state_dict(path)
    saved_kind = common.get("drlora_checkpoint_kind")
    if saved_kind != kind:
        raise CheckpointError(
            f"--load {path}: a '{saved_kind}' checkpoint, but this run needs '{kind}' "
            f"({'give --drlora-* settings' if saved_kind == 'adapters' else 'a DR-LoRA run saves adapters'}"
            f"; a base for fine-tuning goes to --pretrained-checkpoint)")
    try:
        loaded = dist_checkpointing.load(request, path)
    except _load_failures() as e:  # re-raised with the checkpoint named
        raise CheckpointError(f"--load {path}: could not load ({type(e).__name__}: {e}); "
                              f"was it saved for this model and these DR-LoRA settings?") from e
    _assign(model_sd, loaded["model"])
    if "optimizer" in request:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = os.path.join(path, "rng", f"rank{comm.world_rank():05d}.pt")
    loaded["rng_file"] = rng_file if os.path.isfile(rng_file) else None
    return loaded


@torch.no_grad()
def _assign(request: Dict, loaded: Dict) -> None:
    """Copy loaded tensors into the live parameters the sharded tensors wrapped."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for key, item in request.items():
        if isinstance(item, ShardedTensor) and key in loaded:
            value = loaded[key]
            if value.data_ptr() != item.data.data_ptr():  # some strategies load in place
                item.data.copy_(value)
    missing = [k for k, v in request.items() if isinstance(v, ShardedTensor) and k not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def load_base_checkpoint(path: str, chunks) -> None:
    """Load a frozen base (full-model checkpoint dir or a save root) into possibly adapted
    chunks. Only Megatron's own keys are requested; adapter banks are never involved."""
    from megatron.core import dist_checkpointing

    if os.path.isfile(os.path.join(path, TRACKER)):
        path = iteration_dir(path, latest_iteration(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"--pretrained-checkpoint {path}: no such directory")
    common = dist_checkpointing.load_common_state_dict(path)
    if common.get("drlora_checkpoint_kind", "full") != "full":
        raise CheckpointError(f"--pretrained-checkpoint {path} holds DR-LoRA adapters, not a "
                              f"base model; pass it to --load instead")
    model_sd = _model_sharded_state_dict(chunks)
    request = {"model": model_sd} if "model" in _saved_top_keys(path) else model_sd
    try:
        loaded = dist_checkpointing.load(request, path)
    except _load_failures() as e:
        raise CheckpointError(f"--pretrained-checkpoint {path}: does not fit this model "
                              f"({type(e).__name__}: {e}); check the model flags (layers, "
                              f"hidden size, experts) against the base") from e
    _assign(model_sd, loaded.get("model", loaded))


def _saved_top_keys(path: str):
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(path)
    except Exception:  # noqa: BLE001
        return {"model"}
    return {k.split(".", 1)[0] for k in meta}


# --- RNG ------------------------------------------------------------------------------------
def rng_state() -> Dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(path: Optional[str]) -> None:
    if not path:
        return
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_adapters(root: str, chunks, handle, iteration: Optional[int] = None) -> Dict:
    """Adapters (+ trained router) and the rank map of a DR-LoRA checkpoint, for evaluation or
    export under any parallel layout (no optimizer state). Returns the common state."""
    loaded = load_checkpoint(root, chunks, handle, optimizer=None, iteration=iteration)
    state = loaded.get("drlora")
    if not state or "rank_map" not in state:
        raise CheckpointError(f"{root}: no DR-LoRA state (rank map) in the checkpoint")
    handle.set_rank_map(torch.as_tensor(state["rank_map"], dtype=torch.int64))
    return loaded
