"""Everything Megatron-Core needs to run on a CPU-only machine with the gloo backend.

Megatron-Core assumes CUDA in a handful of places. This module is the only place in the project
that works around that; nothing here runs when CUDA is available (`enable_cpu_support` returns
without touching anything). Each patch names the Megatron code that needs it. Measured with
megatron-core 0.16.1 and 0.19.x on torch 2.13.

Use:
    from megatron_drlora.compat import cpu
    cpu.preimport()              # before the first `import megatron.core` (0.19 without triton)
    import megatron.core
    cpu.enable_cpu_support()     # after importing megatron.core, before building models
    ...initialize_model_parallel(...)
    cpu.model_parallel_seed(seed) # instead of tensor_parallel.model_parallel_cuda_manual_seed
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
import types

import torch

_ENABLED = False


def cuda_missing() -> bool:
    return not torch.cuda.is_available()


class _NoStream:
    """Stands in for torch.cuda.Stream: every operation is already synchronous on CPU."""

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _PagedStashStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides `megatron.core.transformer.moe.ops.paged_stash` without triton, when (and
    only when) Megatron imports it."""

    NAME = "megatron.core.transformer.moe.ops.paged_stash"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.NAME:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        def _cuda_only(*args, **kwargs):
            raise RuntimeError("paged_stash triton kernels need CUDA (megatron-drlora CPU stub)")

        module.GLOBAL_BLOCK_SIZE = 1024
        module.paged_stash_copy_kernel = _cuda_only
        module.paged_stash_pop_kernel = _cuda_only


def preimport() -> None:
    """megatron-core 0.19 imports `moe/ops/paged_stash.py`, which imports triton unconditionally.

    Its CUDA kernels never run on CPU, so an import hook supplies a stub module instead of
    installing triton (~1 GB); nothing of megatron is imported here. Must run before the first
    `import megatron.core`.
    """
    if not cuda_missing() or importlib.util.find_spec("triton") is not None:
        return
    if not any(isinstance(f, _PagedStashStub) for f in sys.meta_path):
        sys.meta_path.insert(0, _PagedStashStub())


def enable_cpu_support() -> bool:
    """Apply all CPU workarounds once. Returns True when they are active (no CUDA)."""
    global _ENABLED
    if _ENABLED:
        return True
    if not cuda_missing():
        return False
    _ENABLED = True
    # Megatron allocates buffers and router weights on torch.cuda.current_device()
    # (tensor_parallel/mappings.py, layers.py, GlobalMemoryBuffer, moe/router.py).
    torch.cuda.current_device = lambda: torch.device("cpu")
    # dist_checkpointing's torch_dist writer synchronises after its device-to-host copies.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # 0.19 DDP (ParamAndGradBucketGroup.start_grad_sync) asks for the current stream.
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    _install_cpu_rng_tracker()
    _patch_alltoall_dispatcher()
    _patch_missing_te_gemm()
    _patch_torch_norm_sequence_parallel()
    _patch_schedules_device()
    _patch_megatron_optimizer()
    _patch_uneven_allgather()
    _patch_default_causal_mask()
    _patch_checkpoint_results_queue()
    return True


def _install_cpu_rng_tracker() -> None:
    """CudaRNGStatesTracker stores CUDA generator states; this one forks the CPU generator.

    Activation recompute saves/restores the "cuda" RNG state through two module functions,
    which are pointed at the CPU generator too.
    """
    from megatron.core.tensor_parallel import random as mrand

    class CPURNGStatesTracker(mrand.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrand._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrand.CPURNGStatesTracker = CPURNGStatesTracker
    mrand._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrand._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def model_parallel_seed(seed: int) -> None:
    """CPU version of `tensor_parallel.model_parallel_cuda_manual_seed` (same seed offsets)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrand

    if not cuda_missing():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrand.CPURNGStatesTracker()
    mrand._CUDA_RNG_STATE_TRACKER = tracker
    mrand._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    tracker.add(mrand._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrand._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrand._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def _patch_alltoall_dispatcher() -> None:
    """MoEAlltoAllTokenDispatcher creates a CUDA stream and syncs device-to-host on it.

    On CPU the split sizes are turned into Python lists directly (all_to_all_single on gloo
    wants List[int]).
    """
    from megatron.core.transformer.moe import token_dispatcher as td

    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def _as_list(x):
        return x.tolist() if torch.is_tensor(x) else x

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = _as_list(self.input_splits)
            self.output_splits = _as_list(self.output_splits)
            if torch.is_tensor(self.output_splits_tp):
                self.output_splits_tp = self.output_splits_tp.numpy()
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def _patch_missing_te_gemm() -> None:
    """megatron-core 0.16 references an undefined `te_general_gemm` without TE (fixed in 0.19)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_torch_norm_sequence_parallel() -> None:
    """The local spec's WrappedTorchNorm refuses sequence parallelism, which MoE with TP > 1
    requires. Build it without the assert and tag its parameters `sequence_parallel` so
    finalize_model_grads all-reduces their gradients over TP, as for Megatron's own norms."""
    from megatron.core.transformer import torch_norm

    if getattr(torch_norm.WrappedTorchNorm, "_drlora_cpu_patched", False):
        return
    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            module = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in module.parameters():
            setattr(param, "sequence_parallel", sequence_parallel)
        return module

    torch_norm.WrappedTorchNorm.__new__ = __new__
    torch_norm.WrappedTorchNorm._drlora_cpu_patched = True


def _torch_with_cuda_factories_on_cpu() -> types.ModuleType:
    """A stand-in for the `torch` module whose tensor factories map device="cuda" to CPU.

    Given to the few Megatron modules that allocate small bookkeeping tensors with a hard-coded
    device="cuda"; torch itself is untouched.
    """

    def _cpu_device(kwargs):
        device = kwargs.get("device")
        if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    proxy = types.ModuleType("torch_on_cpu")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    for fn_name in ("zeros", "ones", "empty", "tensor", "full"):
        fn = getattr(torch, fn_name)
        setattr(proxy, fn_name, (lambda f: lambda *a, **k: f(*a, **_cpu_device(k)))(fn))
    return proxy


def _patch_schedules_device() -> None:
    """The pipeline schedules allocate `torch.zeros([], device="cuda")` for token counts."""
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _torch_with_cuda_factories_on_cpu()


def _patch_megatron_optimizer() -> None:
    """Let Megatron's own optimizer (plain and distributed) run on CPU.

    - optimizer.py, clip_grads.py, grad_scaler.py, distrib_optimizer.py and core/utils.py
      (local multi-tensor l2 norm) allocate found-inf flags, norms and scales on "cuda": they get
      the CPU factory proxy.
    - The optimizers accept parameters by their type name ('torch.cuda.FloatTensor', ...) and
      grad clipping asserts it. On a CPU-only machine `Tensor.type()` without arguments reports
      CPU tensors under the CUDA name, so those checks accept them; `type(dtype)` conversions
      are untouched.
    """
    import megatron.core.utils as mcore_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer

    proxy = _torch_with_cuda_factories_on_cpu()
    for module in (optimizer, clip_grads, grad_scaler, distrib_optimizer, mcore_utils):
        module.torch = proxy
    _patch_fresh_distributed_optimizer_state(distrib_optimizer.DistributedOptimizer)
    if getattr(torch.Tensor.type, "_drlora_cpu", False):
        return
    original_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    type_._drlora_cpu = True
    torch.Tensor.type = type_


def _patch_fresh_distributed_optimizer_state(cls) -> None:
    """Let a distributed-optimizer checkpoint resume exactly without Apex/Transformer Engine
    (CPU), where Megatron uses plain torch optimizers whose states carry a per-parameter `step`.

    - distrib_optimizer.py `state_dict` (0.19.2 line 838) asserts that all parameter states
      share one `step`; a resumed run asks for the state dict of its fresh optimizer (no state,
      no step) to build the load request, so every resume failed there. A fresh optimizer first
      gets torch Adam's own initial state (step 0, zero moments: what `init_state_fn` allocates
      next and what Adam's first step would create); the checkpoint then overwrites it.
    - `_set_main_param_and_optimizer_states` (line 1225) copies the loaded shard into the fp32
      main param, a view of an fp32 model param that requires grad: autograd refuses the
      in-place copy outside no_grad.
    - `load_state_dict` (line 1027) hands every parameter the same `step` tensor, which the
      parameter-state load (line 1225, `copy_` of every tensor state) then overwrites with the
      shard's placeholder; torch's Adam also increments a shared tensor once per parameter. After
      the load each parameter gets its own `step` with the checkpoint's value (the param groups'
      `step`, saved by `state_dict`), as an uninterrupted run has it."""
    if getattr(cls.state_dict, "_drlora_cpu", False):
        return
    original = cls.state_dict

    def state_dict(self):
        inner = self.optimizer
        if len(inner.state) == 0 and getattr(self, "init_state_fn", None) is not None:
            self.init_state_fn(inner, self.config)
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param].setdefault("step", torch.tensor(0.0))
        return original(self)

    original_load = cls.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        steps = {group.get("step") for group in state_dict["optimizer"]["param_groups"]}
        if len(steps) == 1 and None not in steps:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step)

    state_dict._drlora_cpu = True
    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict
    if hasattr(cls, "_set_main_param_and_optimizer_states"):  # megatron-core >= 0.17
        cls._set_main_param_and_optimizer_states = torch.no_grad()(
            cls._set_main_param_and_optimizer_states)


def _patch_uneven_allgather() -> None:
    """gloo cannot all_gather tensors of different sizes; the alltoall dispatcher does so with
    expert-tensor-parallel size > 1. Pad to the largest, gather, slice."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        largest = max(sizes)
        x = input_.contiguous()
        if x.shape[0] < largest:
            x = torch.cat([x, x.new_zeros((largest - x.shape[0],) + tuple(x.shape[1:]))])
        gathered = x.new_empty((largest * len(sizes),) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(gathered, x, group=group)
        return torch.cat([gathered[i * largest: i * largest + n] for i, n in enumerate(sizes)])

    mappings._gather_along_first_dim = _gather_along_first_dim


def _patch_default_causal_mask() -> None:
    """Without an explicit attention mask, the local attention builds its causal mask with
    device="cuda" (transformer/utils.py get_default_causal_mask)."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = get_default_causal_mask
    if hasattr(fused_softmax, "get_default_causal_mask"):
        fused_softmax.get_default_causal_mask = get_default_causal_mask

    # The same for the sliding-window mask (--window-size, Phi-MoE's sliding_window).
    @functools.lru_cache(maxsize=32)
    def get_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    utils.get_sliding_window_causal_mask = get_sliding_window_causal_mask
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):
        fused_softmax.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def _patch_checkpoint_results_queue() -> None:
    """dist_checkpointing's torch_dist writer (strategies/filesystem_async.py) collects write
    results through a multiprocessing Manager started with the 'spawn' context: a fresh
    interpreter that re-imports the training script, several seconds per process on a small
    CPU box. Without CUDA nothing forbids 'fork', which starts it in milliseconds."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = getattr(filesystem_async, "get_write_results_queue", None)
    if original is None:  # megatron-core 0.16 keeps no such queue
        return
    filesystem_async.get_write_results_queue = lambda mp_mode="spawn": original("fork")


def adjust_model_config(config) -> None:
    """Settings of a TransformerConfig that must differ on CPU/gloo.

    batch_p2p_comm: with PP = 2 the previous and next stage are the same rank, and gloo matches
    batched isend/irecv to one peer in issue order, so an activation and a gradient of the same
    shape can be swapped (silently wrong losses with virtual pipelining). Megatron's unbatched
    path sends the two directions over two different groups, which is exact.
    """
    if not cuda_missing():
        return
    config.batch_p2p_comm = False


def _pretend_one_device(function):
    """Run `function` with torch.cuda.device_count() == 1 and set_device a no-op."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        saved = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda *a, **k: None
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = saved

    return wrapper


def enable_training_loop_cpu_support() -> bool:
    """Let Megatron-LM's own loop (`megatron.training.pretrain`, megatron-core >= 0.17) run on
    CPU/gloo, on top of enable_cpu_support(). Each patch names the megatron/training code it
    works around (0.19.2 line numbers). Returns True when active (no CUDA)."""
    global _TRAINING_ENABLED
    if not enable_cpu_support():
        return False
    if _TRAINING_ENABLED:
        return True
    _TRAINING_ENABLED = True
    import functools

    from megatron.core import parallel_state as mpu
    from megatron.core import rerun_state_machine
    from megatron.training import arguments, checkpointing, initialize, training

    proxy = _torch_with_cuda_factories_on_cpu()
    # arguments.validate_args asks the GPU architecture when TP or CP > 1 (to check
    # CUDA_DEVICE_MAX_CONNECTIONS, which CPU runs do not have): answer "no such limit".
    arguments.get_device_arch_version = lambda: 10
    # training.py pretrain -> initialize_megatron asserts torch.cuda.is_available().
    training.initialize_megatron = functools.partial(initialize.initialize_megatron,
                                                     allow_no_cuda=True)
    # initialize._initialize_distributed builds the model-parallel groups only when
    # device_count() > 0 and calls torch.cuda.set_device.
    initialize._initialize_distributed = _pretend_one_device(initialize._initialize_distributed)
    # initialize._set_random_seed seeds the model-parallel RNG tracker only with CUDA devices.
    original_seed = initialize._set_random_seed

    def _set_random_seed(seed_, data_parallel_random_init=False, *args, **kwargs):
        original_seed(seed_, data_parallel_random_init, *args, **kwargs)
        seed = seed_ + 100 * mpu.get_pipeline_model_parallel_rank()
        if data_parallel_random_init:
            seed += 10 * mpu.get_data_parallel_rank()
        model_parallel_seed(seed)

    initialize._set_random_seed = _set_random_seed
    # initialize._warmup_jit_function allocates device="cuda" tensors for the fusions.
    initialize._warmup_jit_function = lambda *args, **kwargs: None
    # training.py, rerun_state_machine.py and checkpointing.py allocate small bookkeeping
    # tensors with device="cuda" (iteration counters, loss reductions, rerun flags).
    training.torch = proxy
    rerun_state_machine.torch = proxy
    checkpointing.torch = proxy
    # training.get_model: model_module.cuda(...) and DDP construction on a side CUDA stream.
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.cuda.Stream = lambda *args, **kwargs: _NoStream()
    # rerun_state_machine._save_state and checkpointing.get_rng_state read the "cuda" RNG state
    # (torch.cuda.set_rng_state is already a lazy no-op on a CPU build).
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    # On CPU the "cuda" generator dropout draws from is the CPU one, which a DataLoader also
    # draws its base seed from when its iterator is made: after a resume that happens once
    # more after the RNG state was restored, shifting every later dropout mask. Loaders get a
    # generator of their own (with CUDA, dropout never shared one with them).
    training.build_pretraining_data_loader = _own_generator(training.build_pretraining_data_loader)
    return True


def _own_generator(build):
    @functools.wraps(build)
    def wrapped(dataset, consumed_samples, *args, **kwargs):
        loader = build(dataset, consumed_samples, *args, **kwargs)
        if loader is not None and getattr(loader, "generator", None) is None:
            loader.generator = torch.Generator().manual_seed(1234)  # only the base seed
        return loader
    return wrapped


_TRAINING_ENABLED = False
