"""DR-LoRA's own checkpoint pieces; saving and resuming a run is Megatron-LM's job.

- `adapter_sharded_state_dict`: the adapter factors as ShardedTensors keyed by global identity
  (`drlora.layers.{layer}.{projection}_{A|B}`, experts sharded over EP, the base layer's
  dimension over expert-TP; shared experts' LoRA `drlora.shared.{layer}.{projection}_{A|B}`,
  sharded over TP), so a checkpoint loads under any TP/EP/PP layout. Megatron-LM's
  checkpointing writes them through `megatron_lm.checkpoint_view`.
- `drlora_state`: the DR-LoRA state (config, rank map, saliency EMAs) of a checkpoint's common
  state, wherever Megatron-LM put it (`model` or `model0`).
- `load_base_checkpoint`: a frozen base (a Megatron-LM save, or a converted HF model) into
  possibly adapted chunks, requesting only Megatron's own keys.
- `load_adapters`: adapters, trained router and rank map of a DR-LoRA checkpoint, for
  evaluation and export (no optimizer).
- `save_base_checkpoint`: a full model as a base (the HF importer), crash-safe: written to a
  temporary directory, fsynced, renamed, and only then named by the tracker.

Layout (Megatron-LM's): `ROOT/iter_0000100/` and `ROOT/latest_checkpointed_iteration.txt`.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Dict, Optional

import torch

from megatron_drlora import comm

TRACKER = "latest_checkpointed_iteration.txt"
STATE_KEY = "drlora_state"


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


def resolve(path: str, flag: str, iteration: Optional[int] = None) -> str:
    """A save root (latest or `iteration`) or an iter_* directory -> the iteration directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: no such directory")
    if iteration is not None:
        path = iteration_dir(path, iteration)
    elif os.path.isfile(os.path.join(path, TRACKER)):
        path = iteration_dir(path, latest_iteration(path))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{flag} {path}: not a dist_checkpointing checkpoint (no "
                              f"metadata.json; give a save root with {TRACKER} or an iter_* "
                              f"directory)")
    return path


def read_common_state(path: str) -> Dict:
    """A checkpoint's common (non-tensor) state, without a process group."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


def drlora_state(common: Dict) -> Optional[Dict]:
    """The DR-LoRA state in a checkpoint's common state dict; None for a plain model."""
    for key in ("model", "model0"):
        value = common.get(key)
        if isinstance(value, dict) and STATE_KEY in value:
            return value[STATE_KEY]
    return None


# --- sharded state dicts ------------------------------------------------------------------
def adapter_sharded_state_dict(handle, layers=None) -> Dict:
    """ShardedTensors of every local adapter factor (of `layers`, default all), keyed by global
    identity (global layer, projection; the expert dimension is sharded over EP)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    edp_rank = comm.expert_data_parallel_rank()
    for layer in handle.layers if layers is None else layers:
        bank = layer.bank
        if getattr(bank, "pooled", False):  # the same dense keys, through factories
            from megatron_drlora.pool_checkpoint import pooled_sharded_state_dict

            out.update(pooled_sharded_state_dict(bank, edp_rank))
            if layer.shared is not None:
                out.update(_shared_sharded_state_dict(layer.shared))
            continue
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
        if layer.shared is not None:
            out.update(_shared_sharded_state_dict(layer.shared))
    return out


def _shared_sharded_state_dict(adapter) -> Dict:
    """A shared expert's LoRA (`drlora.shared.{layer}.{projection}_{A|B}`): sharded over TP
    like its dense base layer, replicated over the whole data-parallel group."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    dp_rank = comm.data_parallel_rank()
    for name in adapter.projection_names:
        spec = adapter.specs[name]
        for which, sharded, dim in (("A", spec.a_sharded, 1), ("B", spec.b_sharded, 0)):
            offsets = [(dim, spec.tp_rank, spec.tp_size)] if sharded else []
            key = f"drlora.shared.{adapter.layer}.{name}_{which}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, adapter.factor(name, which), *offsets,
                replica_id=(0, 0 if sharded else spec.tp_rank, dp_rank))
    return out


def model_sharded_state_dict(chunks) -> Dict:
    out = {}
    for i, chunk in enumerate(chunks):
        sd = type(chunk).sharded_state_dict(chunk)  # the class's: never the DR-LoRA view
        out.update(sd if len(chunks) == 1 else {f"model{i}.{k}": v for k, v in sd.items()})
    return out


@torch.no_grad()
def _assign(request: Dict, loaded: Dict) -> None:
    """Copy loaded tensors into the live parameters the sharded tensors (and factories: a
    pooled bank's, merged back into pool tensors) wrapped."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    kinds = (ShardedTensor, ShardedTensorFactory)
    missing = [k for k, v in request.items() if isinstance(v, kinds) and k not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for key, item in request.items():
        if isinstance(item, kinds):
            value = loaded[key]
            if value.data_ptr() != item.data.data_ptr():  # some strategies load in place
                item.data.copy_(value)


# --- load -----------------------------------------------------------------------------------
def load_base_checkpoint(path: str, chunks) -> None:
    """Load a frozen base into possibly adapted chunks. Only Megatron's own keys are
    requested (adapter banks are never involved), so the base may come from any layout."""
    from megatron.core import dist_checkpointing

    path = resolve(path, "--pretrained-checkpoint")
    common = dist_checkpointing.load_common_state_dict(path)
    if drlora_state(common) is not None or common.get("drlora_checkpoint_kind") == "adapters":
        raise CheckpointError(f"--pretrained-checkpoint {path} holds DR-LoRA adapters, not a "
                              f"base model; pass it to --load instead")
    request = model_sharded_state_dict(chunks)
    meta = dist_checkpointing.load_tensors_metadata(path)
    alias_norm_keys(request, meta)
    check_base_fits(request, meta, path)
    repadded = _vocab_repadding(request, meta)
    try:
        loaded = dist_checkpointing.load(request, path)
    except _load_failures() as e:
        raise CheckpointError(f"--pretrained-checkpoint {path}: does not fit this model "
                              f"({type(e).__name__}: {e}); check the model flags (layers, "
                              f"hidden size, experts, vocabulary) against the base") from e
    for key, target in repadded.items():
        _copy_vocab_rows(loaded[key], target)
    _assign({k: v for k, v in request.items() if k not in repadded}, loaded)


_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")

# Where a tensor that does not fit usually comes from: (part of its key, the flags to check).
_FLAG_HINTS = (
    ("word_embeddings", "--vocab-size, the tokenizer, --make-vocab-size-divisible-by"),
    ("output_layer.bias", "--add-output-layer-bias"),
    ("output_layer", "--vocab-size, --untie-embeddings-and-output-weights"),
    ("shared_experts", "--moe-shared-expert-intermediate-size, --moe-shared-expert-gate"),
    ("experts", "--num-experts, --moe-ffn-hidden-size, --swiglu"),
    ("router", "--num-experts, --moe-router-enable-expert-bias"),
    ("q_layernorm", "--qk-layernorm, --qk-layernorm-scope"),
    ("k_layernorm", "--qk-layernorm, --qk-layernorm-scope"),
    ("linear_qkv.bias", "--add-qkv-bias"),
    ("linear_qkv", "--hidden-size, --num-attention-heads, --num-query-groups, --kv-channels"),
    ("linear_proj.bias", "--add-attention-output-bias"),
    ("linear_proj", "--hidden-size, --num-attention-heads, --kv-channels"),
    ("linear_fc", "--ffn-hidden-size, --swiglu, --moe-layer-freq"),
    ("norm", "--normalization"),
)


# Megatron-Core's local spec saves an MoE layer's pre-MLP norm as `mlp.linear_fc1.layer_norm_*`
# (its keys map), the Transformer Engine spec as `pre_mlp_layernorm.*`: a base made with one
# (e.g. converted on a CPU node) loads into a model built with the other.
_NORM_ALIASES = (("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
                 ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
                 ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                 ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"))


def alias_norm_keys(request: Dict, meta: Dict) -> int:
    """Request a norm the base holds under the other spec's name by that name; returns how
    many were renamed."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    renamed = 0
    for name, sh in list(request.items()):
        if not isinstance(sh, ShardedTensor) or sh.key in meta:
            continue
        for a, b in _NORM_ALIASES + tuple((b, a) for a, b in _NORM_ALIASES):
            other = sh.key[:-len(a)] + b
            if sh.key.endswith(a) and other in meta:
                request[name] = dataclasses.replace(sh, key=other)
                renamed += 1
                break
    return renamed


def _flags_for(key: str) -> str:
    for part, flags in _FLAG_HINTS:
        if part in key:
            return flags
    return "--num-layers, --hidden-size"


def _training_state(key: str) -> bool:
    """A saved key that is not the model's: optimizer state (`optimizer.*`, and
    `chained_N.optimizer.*` from a chained or distributed optimizer) or RNG state."""
    return re.match(r"(chained_\d+\.)?optimizer\.|rng_state", key) is not None


def _whole_model_keys(want: Dict) -> set:
    """The keys every rank requests together: a pipeline stage or an expert-parallel rank
    builds only part of the model, so what the base holds beyond one rank's part is used
    elsewhere. Only the key names travel (one gather at load time)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return set(want)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(want))
    return set().union(*parts)


def check_base_fits(request: Dict, meta: Dict, path: str) -> None:
    """Before loading: every tensor the model these flags build must be in the base with its
    shape (vocabulary rows aside: Megatron-LM repads them), and every model tensor of the base
    must be used; a base tensor the model lacks (a q/k norm, a bias) would otherwise be dropped
    without a word. The error names each tensor, both shapes and the flags to check."""
    from megatron_drlora.modeling import sharded_tensors

    want = {sh.key: tuple(sh.global_shape) for sh in sharded_tensors(request)}
    unused_check = _whole_model_keys(want)
    base = {k: tuple(v.global_shape) for k, v in meta.items() if not _training_state(k)}
    problems = []
    for key in sorted(set(want) - set(base)):
        problems.append(f"{key} {want[key]} is not in the base ({_flags_for(key)})")
    for key in sorted(set(base) - unused_check):
        problems.append(f"the base has {key} {base[key]}, which these flags do not build "
                        f"({_flags_for(key)})")
    for key in sorted(set(want) & set(base)):
        a, b = want[key], base[key]
        if a != b and not (key.endswith(_VOCAB_KEYS) and a[1:] == b[1:]):
            problems.append(f"{key}: {b} in the base, {a} with these flags ({_flags_for(key)})")
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(f"--pretrained-checkpoint {path} does not fit the model these "
                              f"flags build:\n  {shown}{more}\nUse the model flags the base was "
                              f"made with (the converter writes them to BASE/model.args).")


def _vocab_repadding(request: Dict, meta: Dict) -> Dict:
    """Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP, so
    a base saved at another TP has another number of padding rows. For those tensors the
    request becomes the whole saved tensor; returns {key: the rank's ShardedTensor} to fill
    from it (padding rows are zero)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for key, sharded in list(request.items()):
        if not isinstance(sharded, ShardedTensor) or not sharded.key.endswith(_VOCAB_KEYS):
            continue
        saved = meta.get(sharded.key)
        if saved is None or tuple(saved.global_shape) == tuple(sharded.global_shape):
            continue
        if tuple(saved.global_shape[1:]) != tuple(sharded.global_shape[1:]):
            continue  # a real mismatch: let the load report it
        whole = torch.empty(tuple(saved.global_shape), dtype=sharded.data.dtype)
        request[key] = ShardedTensor.from_rank_offsets(sharded.key, whole, replica_id=0)
        out[key] = sharded
    return out


@torch.no_grad()
def _copy_vocab_rows(whole: torch.Tensor, target) -> None:
    start, rows = target.global_offset[0], target.local_shape[0]
    piece = whole[start:start + rows]
    target.data.zero_()
    target.data[:piece.shape[0]].copy_(piece)


def load_adapters(path: str, chunks, handle, iteration: Optional[int] = None) -> Dict:
    """Adapters (+ trained router) and the rank map of a DR-LoRA checkpoint into `handle`'s
    model, under any parallel layout. Returns the DR-LoRA state."""
    from megatron.core import dist_checkpointing

    path = resolve(path, "--load", iteration)
    state = drlora_state(dist_checkpointing.load_common_state_dict(path))
    if state is None or "rank_map" not in state:
        raise CheckpointError(f"--load {path}: no DR-LoRA state (rank map) in the checkpoint; "
                              f"a base model goes to --pretrained-checkpoint")
    request = adapter_sharded_state_dict(handle)
    if handle.config.router != "frozen":
        for key, value in model_sharded_state_dict(handle.chunks).items():
            if ".mlp.router." in key:
                request[key] = value
    try:
        loaded = dist_checkpointing.load(request, path)
    except _load_failures() as e:
        raise CheckpointError(f"--load {path}: could not load the adapters "
                              f"({type(e).__name__}: {e}); was it saved for this model and "
                              f"these DR-LoRA settings?") from e
    _assign(request, loaded)
    handle.set_rank_map(torch.as_tensor(state["rank_map"], dtype=torch.int64))
    return state


# --- save (bases only) ------------------------------------------------------------------------
def _fsync_tree(path: str) -> None:
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_base_checkpoint(root: str, chunks, iteration: int = 0) -> str:
    """Write the whole model as a base under `root` (Megatron-LM's layout); returns the
    iteration directory. At every instant the tracker names nothing or a complete checkpoint;
    an existing iteration directory is never replaced."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if os.path.exists(final):  # replacing it could leave the tracker naming nothing
        raise CheckpointError(f"--save {root}: {final} already exists; write the base to a new "
                              f"directory")
    rank = comm.world_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed save
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save({"model": model_sharded_state_dict(chunks),
                             "iteration": iteration}, tmp)
    _barrier()
    if rank == 0:
        _fsync_tree(tmp)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as fh:
            fh.write(str(iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _barrier()
    return final


def _barrier():
    if comm.is_distributed():
        import torch.distributed as dist

        dist.barrier()
