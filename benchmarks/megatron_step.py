"""Training steps of the path users run, in one process, for benchmarks/step_time.py.

Everything a step does comes from Megatron-LM and the training entry, unchanged:
- arguments: Megatron-LM's parser with DR-LoRA's flags (`megatron_lm.setup.parse_args`, which
  also enables the CPU/gloo support), then `megatron.training.initialize_megatron`;
- the model: `megatron.training.training.setup_model_and_optimizer` with the entry's
  `model_provider` (GPTModel from Megatron's args, DR-LoRA applied by `DRLoRARun.adapt`),
  Megatron's DistributedDataParallel and `get_megatron_optimizer`;
- the step: `megatron.training.training.train_step` with examples/pretrain_gpt.py's
  `forward_step` and `get_forward_backward_func()`; DRLoRARun's finalize function (Megatron's
  `finalize_model_grads`, then `controller.collect`) and its wrapper of the optimizer step
  (`controller.finish`) run where they run in training.

Several variants (uniform LoRA at r_target, at r_max, DR-LoRA) live in one process: each has
its own DRLoRARun, model, DDP buffers and optimizer; the frozen base tensors of every variant
after the first point at the first one's (no copy), so all see the same weights and routing.
The benchmark's own additions are timers around those hooks (with a device synchronisation on
CUDA) and a fixed synthetic batch instead of a dataset.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_drlora.compat.megatron import prepare_import  # noqa: E402
from megatron_drlora.launch.ports import free_port  # noqa: E402

prepare_import()  # before megatron: Python 3.11 shim, triton stub on CPU

import torch  # noqa: E402


def have_cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if have_cuda():
        torch.cuda.synchronize()


def megatron_argv(s: Dict, *, bf16: bool, te: bool, log_dir: str,
                  extra: Optional[List[str]] = None) -> List[str]:
    """Megatron-LM flags of the benchmark model (the flags a user's script would pass).

    `s`: the size settings (see step_time.SIZES). CPU: examples/cpu.args (gloo, local
    transformer implementation, no CUDA fusions). CUDA: NCCL; Transformer Engine with grouped
    experts when `te`, else the local implementation with the same fusions off as on CPU (they
    need apex or TE)."""
    argv: List[str] = []
    if not have_cuda():
        argv.append("@" + os.path.join(REPO, "examples", "cpu.args"))
    elif te:
        # the frozen base has no weight gradients to accumulate: the fusion (apex's
        # fused_weight_gradient_mlp_cuda) buys nothing here and is one dependency less
        argv += ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm",
                 "--no-gradient-accumulation-fusion"]
    else:
        argv += [a for a in _cpu_args() if a not in ("--distributed-backend", "gloo")]
    mb = s["micro_batches"]
    argv += [
        "--num-layers", str(s["num_layers"]), "--hidden-size", str(s["hidden_size"]),
        "--num-attention-heads", str(s["num_attention_heads"]),
        "--num-experts", str(s["num_experts"]), "--moe-router-topk", str(s["moe_router_topk"]),
        "--moe-ffn-hidden-size", str(s["moe_ffn_hidden_size"]),
        "--ffn-hidden-size", str(s["ffn_hidden_size"]),
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--seq-length", str(s["seq_length"]), "--max-position-embeddings", str(s["seq_length"]),
        "--micro-batch-size", str(s["micro_batch"]),
        "--global-batch-size", str(s["micro_batch"] * mb),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(s["vocab_size"]),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
        # a tiny learning rate: the routing, and so the cost, stays where it starts
        "--lr", "1e-6", "--min-lr", "1e-6", "--weight-decay", "0",
        "--train-iters", str(s["train_iters"]), "--lr-warmup-iters", str(s["lr_warmup_iters"]),
        "--log-interval", str(10 ** 9), "--drlora-log-dir", log_dir, "--seed", str(s["seed"]),
    ]
    if bf16:
        argv.append("--bf16")
    return argv + list(extra or [])


def _cpu_args() -> List[str]:
    out = []
    with open(os.path.join(REPO, "examples", "cpu.args")) as fh:
        for line in fh:
            out += line.split("#", 1)[0].split()
    return out


class Megatron:
    """Megatron-LM initialised once in this process (world size 1) for the given flags."""

    def __init__(self, argv: List[str]):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        from megatron.training import training
        from megatron.training.global_vars import get_args

        from megatron_drlora.megatron_lm import setup

        saved = sys.argv
        sys.argv = [os.path.join(REPO, "examples", "pretrain_gpt.py")] + list(argv)
        try:
            setup.parse_args()  # Megatron-LM's parser + DR-LoRA's flags; CPU support
        finally:
            sys.argv = saved
        training.initialize_megatron()  # on CPU: allow_no_cuda (compat.cpu)
        if have_cuda():
            try:
                from megatron.training.initialize import set_jit_fusion_options

                set_jit_fusion_options(tp_size=1)
            except Exception:  # fusions are an optimisation; never fail the benchmark on them
                pass
        self.args = get_args()
        self.entry = _load_entry()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.forward_backward_func = get_forward_backward_func()


def _load_entry():
    """examples/pretrain_gpt.py as a module (its forward_step and loss function)."""
    path = os.path.join(REPO, "examples", "pretrain_gpt.py")
    spec = importlib.util.spec_from_file_location("drlora_pretrain_gpt_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(s: Dict, seed: int) -> Dict[str, torch.Tensor]:
    """One fixed micro-batch in the format of the entry's datasets (get_batch moves it to the
    GPU)."""
    g = torch.Generator().manual_seed(seed)
    b, n = s["micro_batch"], s["seq_length"]
    return {"tokens": torch.randint(0, s["vocab_size"], (b, n), generator=g),
            "labels": torch.randint(0, s["vocab_size"], (b, n), generator=g),
            "loss_mask": torch.ones(b, n),
            "position_ids": torch.arange(n).unsqueeze(0).expand(b, -1).contiguous()}


class Timers:
    """Seconds spent in the wrapped callables during one step (synchronised on CUDA)."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        timed.__wrapped__ = fn
        return timed


class Variant:
    """One trained configuration: its DRLoRARun, DDP chunks, optimizer and scheduler."""

    def __init__(self, name: str, run, model, optimizer, scheduler, config):
        self.name, self.run, self.model = name, run, model
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, config
        self.timers = Timers()
        self._instrumented = False

    @property
    def handle(self):
        return self.run.handle

    @property
    def controller(self):
        return self.run.controller

    def chunks(self):
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.model)


def build_variant(mega: Megatron, name: str, drlora_config, base: Optional[Variant] = None,
                  b_std: float = 1e-3) -> Variant:
    """setup_model_and_optimizer with a DRLoRARun of `drlora_config`; frozen base tensors
    shared with `base` (built without initialisation then)."""
    from megatron.core.enums import ModelType
    from megatron.core.utils import get_model_config
    from megatron.training.global_vars import get_timers
    from megatron.training.training import setup_model_and_optimizer

    from megatron_drlora.megatron_lm import run as run_module
    from megatron_drlora.megatron_lm.model_provider import model_provider

    args = mega.args
    run = run_module.start_run(drlora_config)
    args.perform_initialization = base is None
    args.pretrained_checkpoint = None  # the base keeps its (shared) initialisation
    model, optimizer, scheduler = setup_model_and_optimizer(ModelType.encoder_or_decoder,
                                                            model_provider)
    args.perform_initialization = True
    config = get_model_config(model[0])
    # What megatron.training.training.train() sets on the config before its loop.
    config.grad_scale_func = optimizer.scale_loss
    config.timers = get_timers()
    if args.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in model]
        if len(model) == 1:
            config.no_sync_func = config.no_sync_func[0]
        if args.align_grad_reduce:
            config.grad_sync_func = [m.start_grad_sync for m in model]
            if len(model) == 1:
                config.grad_sync_func = config.grad_sync_func[0]
    v = Variant(name, run, model, optimizer, scheduler, config)
    if base is not None:
        _share_frozen_base(v, base)
    _trained_like_b(v.handle, args.seed, b_std)
    if hasattr(optimizer, "reload_model_params"):  # main copies follow the changed params
        optimizer.reload_model_params()
    return v


def _share_frozen_base(v: Variant, base: Variant) -> None:
    """Point every frozen tensor of `v` at `base`'s storage; trainable non-adapter tensors
    (the routers) get a copy of its values."""
    mine = [(n, p) for c in v.chunks() for n, p in c.named_parameters()
            if ".drlora." not in n]
    theirs = [(n, p) for c in base.chunks() for n, p in c.named_parameters()
              if ".drlora." not in n]
    assert [n for n, _ in mine] == [n for n, _ in theirs], "variants differ in their base"
    with torch.no_grad():
        for (_, p), (_, q) in zip(mine, theirs):
            if p.requires_grad:
                p.copy_(q)
            else:
                p.data = q.data


def _trained_like_b(handle, seed: int, std: float) -> None:
    """B = 0 (the init) makes every A gradient ~0, and AdamW then crawls through denormal
    floats on CPU; a trained-looking small random B gives realistic gradients and timings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in handle.layers:
            for name in layer.bank.projection_names:  # a pooled bank keeps the active ranks
                b = layer.bank.dense_factor(name, "B")
                layer.bank.write_dense_factor(
                    name, "B", (torch.randn(b.shape, generator=g) * std).to(b.dtype))


def activate(v: Variant) -> None:
    """Make `v`'s run the one Megatron-LM's providers and the loss function see."""
    from megatron_drlora.megatron_lm import run as run_module

    run_module._RUN = v.run


def set_rank_map(v: Variant, rank_map: torch.Tensor) -> None:
    """Put DR-LoRA at a given rank map (what the growth events would have made)."""
    v.controller.rank_map = rank_map.clone()
    v.handle.set_rank_map(v.controller.rank_map)


def _instrument(v: Variant) -> None:
    """Timers around the hooks of the run (once the controller and the optimizer wrapper
    exist, i.e. after the first step)."""
    if v._instrumented:
        return
    c, t = v.controller, v.timers
    c.collect = t.wrap("collect", c.collect)
    c.finish = t.wrap("finish", c.finish)
    v.optimizer.step = t.wrap("optimizer", v.optimizer.step)  # DRLoRARun's wrapper inside
    v.config.finalize_model_grads_func = t.wrap("finalize", v.config.finalize_model_grads_func)
    v._instrumented = True


def train_step(mega: Megatron, v: Variant, batch: Dict, iteration: int) -> Dict[str, float]:
    """One Megatron-LM training iteration of `v` at `iteration`; seconds of its phases:
    step (the whole train_step), fwd_bwd (forward + backward of every micro-batch and the
    rest of train_step), finalize (Megatron's finalize_model_grads), saliency (DR-LoRA's
    controller.collect + finish), optimizer (Megatron's optimizer step)."""
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.training.training import train_step as megatron_train_step

    activate(v)
    mega.args.curr_iteration = iteration
    v.timers.reset()
    sync()
    t0 = time.perf_counter()
    megatron_train_step(mega.entry.forward_step, RerunDataIterator(itertools.repeat(batch)),
                        v.model, v.optimizer,
                        v.scheduler, v.config, mega.forward_backward_func, iteration=iteration)
    sync()
    total = time.perf_counter() - t0
    _instrument(v)
    sec = v.timers.seconds
    collect, finish = sec.get("collect", 0.0), sec.get("finish", 0.0)
    finalize, optimizer = sec.get("finalize", 0.0), sec.get("optimizer", 0.0)
    return {"step": total, "fwd_bwd": total - finalize - optimizer,
            "finalize": max(0.0, finalize - collect), "saliency": collect + finish,
            "optimizer": max(0.0, optimizer - finish), "finish": finish}


def new_log_dir() -> str:
    """Where the runs' drlora_ranks.jsonl / drlora_steps.jsonl go; removed at exit."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="drlora_step_time_")
    atexit.register(shutil.rmtree, path, True)
    return path
