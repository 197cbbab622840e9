#!/usr/bin/env python
"""Step time, memory and LoRA FLOPs of DR-LoRA against uniform LoRA (GitHub issue 8).

    python benchmarks/step_time.py --size tiny [--reps 7] [--json out.json]
    python benchmarks/step_time.py --size olmoe-like            # on a GPU
    python benchmarks/step_time.py --size olmoe-like --layers 1 --seq-length 256 \
        --vocab-size 1024 --reps 5                              # FLOP-bound run on a CPU

One process times optimizer steps (forward + backward + AdamW) of the same MoE model (same
frozen base weights, same batch) under these variants, interleaved across repetitions so that
drift on a shared machine cancels in the per-repetition ratios:

- base               frozen base, no adapters: only the routers are trainable (DR-LoRA trains
                     them after warm-up too) and the first layer's MLP input requires grad, so
                     backward computes the input gradients of every expert of every layer (what
                     LoRA on all experts needs, plus layer 0's fc1 input gradient): the floor of
                     any expert adapter.
- uniform_r_target   plain LoRA at r_target on every expert's up/down projection
                     (method='uniform', budget=r_target): the reference (b), ratio 1.00.
- uniform_r_max      plain LoRA at r_max.
- drlora_init        DR-LoRA (allocated at r_max) with every module at r_init,
- drlora_mid         ... a random heterogeneous rank map averaging (r_init + r_target) / 2,
- drlora_final       ... a skewed final map averaging r_target (a third of the modules at r_max,
                     the rest at r_init: where the paper's allocation tends to end up).
                     DR-LoRA steps include the routing hook and controller.after_gradients
                     (saliency statistics + reduction + EMA update) at a non-event step.

Also measured: the saliency update as a share of a step, the extra cost of one growth event,
a whole-run estimate (step time interpolated along GrowthSchedule.planned_total_active over a
paper-like schedule, plus the events) and, in fresh subprocesses (one per variant), peak memory
(CPU: parameter bytes + the peak RSS increase while training, VmHWM reset after the build;
CUDA: torch.cuda.max_memory_allocated while training).
LoRA FLOPs per token are analytic: 2 * r * (k + d) per adapted module per routed token, times
top-k, forward only, with r the mean active rank (uniform routing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VARIANTS = ("base", "uniform_r_target", "uniform_r_max", "drlora_init", "drlora_mid",
            "drlora_final")
REFERENCE = "uniform_r_target"

SIZES: Dict[str, Dict] = {
    # CPU CI: small enough that a whole run takes seconds.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_experts=8,
                 moe_router_topk=2, moe_ffn_hidden_size=64, ffn_hidden_size=128,
                 vocab_size=256, seq_length=64, micro_batch=8, r_init=4, r_target=8, r_max=16),
    # OLMoE-1B-7B widths (hidden 2048, expert ffn 1024, 64 experts, top-8, 16 heads, vocab
    # 50304, sequence 4096) with fewer layers; the paper's ranks 32 / 64 / 128.
    "olmoe-like": dict(num_layers=4, hidden_size=2048, num_attention_heads=16, num_experts=64,
                       moe_router_topk=8, moe_ffn_hidden_size=1024, ffn_hidden_size=1024,
                       vocab_size=50304, seq_length=4096, micro_batch=1, r_init=32,
                       r_target=64, r_max=128),
}


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_single_process(seed: int) -> None:
    """Megatron-Core with world size 1 (TP = PP = EP = 1), on a free port."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    initialize_megatron_parallel(ParallelSizes(), seed=seed)


def settings(args) -> Dict:
    s = dict(SIZES[args.size])
    for key in ("num_layers", "seq_length", "vocab_size", "micro_batch", "r_init", "r_target",
                "r_max"):
        value = getattr(args, key.replace("num_", "") if key == "num_layers" else key)
        if value is not None:
            s[key] = value
    return s


def model_args(s: Dict, bf16: bool):
    from megatron_drlora.modeling import MoEModelArgs

    return MoEModelArgs(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"],
        ffn_hidden_size=s["ffn_hidden_size"], num_attention_heads=s["num_attention_heads"],
        num_experts=s["num_experts"], moe_router_topk=s["moe_router_topk"],
        moe_ffn_hidden_size=s["moe_ffn_hidden_size"], vocab_size=s["vocab_size"],
        seq_length=s["seq_length"], bf16=bf16)


def drlora_config(s: Dict, method: str, budget: Optional[int] = None):
    from megatron_drlora import DRLoRAConfig

    if method == "uniform":
        return DRLoRAConfig(budget=budget, method="uniform", seed=1234)
    return DRLoRAConfig(budget=s["r_target"], r_init=s["r_init"], r_max=s["r_max"],
                        seed=1234)


class Variant:
    """One model (sharing the frozen base tensors of the others), its optimizer and driver."""

    def __init__(self, name: str, chunks, handle, controller, optimizer, rank_map=None):
        self.name, self.chunks, self.handle = name, chunks, handle
        self.controller, self.optimizer, self.rank_map = controller, optimizer, rank_map
        self.model = chunks[0]


def _share_base(model, base) -> None:
    """Point every frozen base tensor of `model` at `base`'s storage (no copy, no extra memory);
    routers get their own copy because they train."""
    import torch

    mine = list(model.named_parameters())
    theirs = [(n, q) for n, q in base.named_parameters() if ".drlora." not in n]
    assert [n for n, _ in mine] == [n for n, _ in theirs], "models differ"
    with torch.no_grad():
        for (name, p), (_, q) in zip(mine, theirs):
            if ".router." in name:
                p.copy_(q)
            else:
                p.data = q.data


def _first_mlp_input_requires_grad(model) -> None:
    """Make the input of the first layer's MLP (the pre-MLP norm output, which feeds router
    and experts) require grad, so backward computes the input gradients of every expert of
    every layer, as LoRA on all experts does, and nothing below the first MLP (neither does
    LoRA). Trainable routers alone would skip the experts' backward entirely."""
    import torch

    layer = model.decoder.layers[0]
    module = getattr(layer, "pre_mlp_layernorm", None)
    if module is None or isinstance(module, torch.nn.Identity):
        module = model.embedding  # fused norm (TE): fall back to the embedding output

    def hook(mod, args, output):
        if torch.is_grad_enabled() and torch.is_tensor(output) and not output.requires_grad:
            output.requires_grad_(True)
        return output

    module.register_forward_hook(hook)


def _optimizer(params, device):
    import torch

    params = list(params)
    kw = dict(lr=1e-6, weight_decay=0.0)  # tiny lr: the routing (and so the cost) stays put
    if device.type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(params, **kw)


def build_variant(name: str, s: Dict, args, base=None):
    """Build one variant; returns (Variant, base model)."""
    from megatron_drlora.controller import DRLoRAController
    from megatron_drlora.inject import apply_drlora
    from megatron_drlora.modeling import build_gpt_moe, transformer_config

    margs = model_args(s, args.bf16)
    config = transformer_config(margs)
    if base is not None:
        config.perform_initialization = False  # every tensor is replaced by the base's
    chunks = build_gpt_moe(margs, config)
    model = chunks[0]
    device = next(model.parameters()).device
    if base is None:
        base = model
    else:
        _share_base(model, base)
    model.train()
    if name == "base":
        for n, p in model.named_parameters():
            p.requires_grad_(".router." in n)
        _first_mlp_input_requires_grad(model)
        return Variant(name, chunks, None, None,
                       _optimizer((p for p in model.parameters() if p.requires_grad), device)), base
    if name.startswith("uniform"):
        budget = s["r_target"] if name == "uniform_r_target" else s["r_max"]
        handle = apply_drlora(chunks, drlora_config(s, "uniform", budget), log=lambda _: None)
        controller = None  # plain LoRA: no routing hook, no statistics
    else:
        handle = apply_drlora(chunks, drlora_config(s, "drlora"), log=lambda _: None)
        controller = DRLoRAController(handle, args.train_iters, args.warmup_iters)
    _trained_like_b(handle, args.seed)
    opt = _optimizer((p for p in model.parameters() if p.requires_grad), device)
    return Variant(name, chunks, handle, controller, opt), base


def _trained_like_b(handle, seed: int, std: float = 1e-3) -> None:
    """B = 0 (the init) makes every A gradient ~0, and AdamW then crawls through denormal
    floats on CPU; a trained-looking small random B gives realistic gradients and timings."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in handle.layers:
            for name in layer.bank.projection_names:
                b = layer.bank.factor(name, "B")
                b.copy_((torch.randn(b.shape, generator=g) * std).to(b.dtype))


# --------------------------------------------------------------------------------------------
# rank maps
# --------------------------------------------------------------------------------------------
def mid_rank_map(shape, r_init: int, r_target: int, r_max: int, cap: int, seed: int):
    """Random heterogeneous map: every layer's mean is (r_init + r_target) / 2 (rounded to
    whole module-ranks), grown in random chunks of at most `cap` like real events."""
    import torch

    L, E, M = shape
    rng = random.Random(seed)
    rank = torch.full(shape, r_init, dtype=torch.int64)
    for l in range(L):
        extra = round(E * M * (r_target - r_init) / 2)
        while extra > 0:
            e, m = rng.randrange(E), rng.randrange(M)
            n = min(cap, r_max - int(rank[l, e, m]), extra)
            rank[l, e, m] += n
            extra -= n
    return rank


def final_rank_map(shape, r_init: int, r_target: int, r_max: int, seed: int):
    """Skewed final map at the budget: experts (both projections together) in a random order
    are raised to r_max until the layer's extra ranks N_mod * (r_target - r_init) are spent;
    all others stay at r_init. With the paper's ratios a third of the experts end at r_max."""
    import torch

    L, E, M = shape
    rank = torch.full(shape, r_init, dtype=torch.int64)
    for l in range(L):
        order = list(range(E))
        random.Random(seed * 1000 + l).shuffle(order)
        extra = E * M * (r_target - r_init)
        for e in order:
            for m in range(M):
                n = min(r_max - r_init, extra)
                rank[l, e, m] += n
                extra -= n
            if extra == 0:
                break
    return rank


def lora_flops_per_token(s: Dict, mean_rank: float) -> float:
    """Forward LoRA FLOPs per token: sum over MoE layers and adapted modules (up: k=h, d=f;
    down: k=f, d=h) of 2 * r * (k + d), times top-k routed experts."""
    h, f = s["hidden_size"], s["moe_ffn_hidden_size"]
    per_module = 2.0 * mean_rank * (h + f)
    return s["num_layers"] * s["moe_router_topk"] * 2 * per_module


def base_expert_flops_per_token(s: Dict) -> float:
    """Forward FLOPs of the routed experts per token (SwiGLU: fc1 h->2f, fc2 f->h)."""
    h, f = s["hidden_size"], s["moe_ffn_hidden_size"]
    return s["num_layers"] * s["moe_router_topk"] * 2.0 * (h * 2 * f + f * h)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(s: Dict, device, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, n = s["micro_batch"], s["seq_length"]
    tokens = torch.randint(0, s["vocab_size"], (b, n), generator=g)
    position_ids = torch.arange(n).unsqueeze(0).expand(b, -1).contiguous()
    labels = torch.randint(0, s["vocab_size"], (b, n), generator=g)
    return tokens.to(device), position_ids.to(device), labels.to(device)


def run_step(v: Variant, batch, step_arg: int, device, micro_batches: int = 1) -> Dict:
    """One optimizer step (zero grads, forward+backward of every micro-batch, DR-LoRA's
    after_gradients, AdamW); returns the seconds of its phases."""
    tokens, pos, labels = batch
    _sync(device)
    t0 = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    for _ in range(micro_batches):
        loss = v.model(tokens, pos, None, labels=labels).float().mean() / micro_batches
        loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    if v.controller is not None:
        v.controller.after_gradients(step_arg)
        _sync(device)
    t2 = time.perf_counter()
    v.optimizer.step()
    _sync(device)
    t3 = time.perf_counter()
    return {"fwd_bwd": t1 - t0, "saliency": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def set_map(v: Variant, rank_map) -> None:
    v.controller.rank_map = rank_map.clone()
    v.handle.set_rank_map(rank_map)


def time_variant(v: Variant, rank_map, batch, steps: int, step_arg: int, device,
                 micro_batches: int = 1) -> Dict:
    """Mean phase seconds per step over `steps` steps."""
    if rank_map is not None:
        set_map(v, rank_map)
    total: Dict[str, float] = {}
    for _ in range(steps):
        for key, sec in run_step(v, batch, step_arg, device, micro_batches).items():
            total[key] = total.get(key, 0.0) + sec
    return {k: x / steps for k, x in total.items()}


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def whole_run_ratio(points, schedule, event_extra_ratio: float) -> Dict:
    """Mean step-time ratio over a run: each step at the planned average rank (ranks active in
    its forward are those after the events of earlier steps), ratio interpolated linearly
    between the measured (average rank, ratio) points, plus the growth events."""
    points = sorted(points)

    def ratio_at(rank: float) -> float:
        if rank <= points[0][0]:
            return points[0][1]
        for (r0, t0), (r1, t1) in zip(points, points[1:]):
            if rank <= r1:
                return t0 + (t1 - t0) * (rank - r0) / (r1 - r0) if r1 > r0 else t1
        return points[-1][1]

    total_modules = schedule.total_modules
    T = schedule.train_iters
    boundaries = [0] + [e + 1 for e in schedule.event_steps()] + [T]
    acc, weighted_rank = 0.0, 0.0
    for lo, hi in zip(boundaries, boundaries[1:]):
        if hi <= lo:
            continue
        rank = (schedule.planned_total_active(lo - 1) if lo > 0 else
                schedule.planned_total_active(-1)) / total_modules
        acc += (hi - lo) * ratio_at(rank)
        weighted_rank += (hi - lo) * rank
    events = schedule.num_event_steps
    return {"train_iters": T, "warmup_iters": schedule.t_warmup,
            "grow_interval": schedule.grow_interval, "events": events,
            "time_weighted_average_rank": weighted_rank / T,
            "steps_only_ratio": acc / T,
            "ratio_to_uniform_r_target": (acc + events * event_extra_ratio) / T}


# --------------------------------------------------------------------------------------------
# memory (fresh subprocess per variant)
# --------------------------------------------------------------------------------------------
def _maxrss_mb() -> float:
    """Peak RSS: VmHWM (reset by clear_refs; getrusage also keeps the peak of exited threads,
    which clear_refs does not reset), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _maxrss_mb()


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5) and return the
    baseline to subtract: the current RSS, or the unresettable peak so far elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _maxrss_mb()


def probe_memory(args) -> Dict:
    """Run inside a fresh process: build one variant and train a few steps; peak memory."""
    import torch

    _init_single_process(args.seed)
    s = settings(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _reset_peak_rss()
    v, _ = build_variant(args.probe, s, args)
    # Peak while training, not while building (Megatron's CPU init holds a full master copy of
    # every weight for a moment): reset the peak after the build, keep the model's own size.
    model_mb = _rss_mb() - before
    after_build = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if v.controller is not None:
        L, E, M = v.handle.rank_map_shape()
        rank_map = {"drlora_init": v.handle.initial_rank_map(),
                    "drlora_mid": mid_rank_map((L, E, M), s["r_init"], s["r_target"], s["r_max"],
                                               max(1, v.controller.schedule.cap), args.seed),
                    "drlora_final": final_rank_map((L, E, M), s["r_init"], s["r_target"],
                                                   s["r_max"], args.seed)}[args.probe]
        set_map(v, rank_map)
    batch = make_batch(s, device, args.seed)
    step_arg = v.controller.schedule.t_warmup + 1 if v.controller is not None else 0
    for _ in range(3):
        run_step(v, batch, step_arg, device, args.micro_batches)
    _sync(device)
    # RSS right after the build is noisy (how much of the init transient the allocator kept),
    # so the model counts with its exact parameter bytes; the training part is measured.
    param_mb = sum(p.numel() * p.element_size() for c in v.chunks for p in c.parameters()) / 2 ** 20
    out = {"variant": args.probe, "parameter_mb": param_mb, "cpu_model_rss_mb": model_mb,
           "cpu_training_peak_over_model_mb": _maxrss_mb() - after_build,
           "cpu_peak_mb": param_mb + _maxrss_mb() - after_build}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def measure_memory(args, names: List[str]) -> Dict[str, Dict]:
    results = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", name, "--size", args.size,
               "--seed", str(args.seed), "--train-iters", str(args.train_iters),
               "--micro-batches", str(args.micro_batches),
               "--warmup-iters", str(args.warmup_iters)]
        for key in ("layers", "seq_length", "vocab_size", "micro_batch", "r_init", "r_target",
                    "r_max"):
            value = getattr(args, key)
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        if args.bf16:
            cmd.append("--bf16")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory probe {name} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1])
    return results


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def run(args) -> Dict:
    import torch

    _init_single_process(args.seed)
    s = settings(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n for n in VARIANTS if n in args.variants]
    if REFERENCE not in names:
        names.insert(1 if "base" in names else 0, REFERENCE)
    t0 = time.perf_counter()
    variants: Dict[str, Variant] = {}
    base = None
    drlora = None
    for name in names:
        if name.startswith("drlora_") and drlora is not None:
            variants[name] = drlora
            continue
        v, base = build_variant(name, s, args, base)
        variants[name] = v
        if name.startswith("drlora_"):
            drlora = v
    build_seconds = time.perf_counter() - t0
    maps = {}
    if drlora is not None:
        shape = drlora.handle.rank_map_shape()
        cap = max(1, drlora.controller.schedule.cap)
        maps = {"drlora_init": drlora.handle.initial_rank_map(),
                "drlora_mid": mid_rank_map(shape, s["r_init"], s["r_target"], s["r_max"], cap,
                                           args.seed),
                "drlora_final": final_rank_map(shape, s["r_init"], s["r_target"], s["r_max"],
                                               args.seed)}
    schedule = drlora.controller.schedule if drlora is not None else None
    step_arg = schedule.t_warmup + 1 if schedule is not None else 0  # never an event step
    batch = make_batch(s, device, args.seed)

    mb = args.micro_batches
    projection = args.project_micro_batches
    for name in names:  # warm-up: first-touch allocations, optimizer state, autotuning
        time_variant(variants[name], maps.get(name), batch, args.warmup, step_arg, device, mb)

    per_rep: Dict[str, List[float]] = {n: [] for n in names}
    saliency_rep: Dict[str, List[float]] = {n: [] for n in names}
    phases: Dict[str, List[Dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: cancel drift
        if rep % 2:
            order = order[::-1]
        for name in order:
            ph = time_variant(variants[name], maps.get(name), batch, args.steps, step_arg,
                              device, mb)
            per_rep[name].append(ph["step"])
            saliency_rep[name].append(ph["saliency"])
            phases[name].append(ph)
        if args.verbose:
            print(f"rep {rep}: " + " ".join(f"{n}={1000 * per_rep[n][-1]:.1f}ms" for n in names),
                  flush=True)

    ratios = {n: [per_rep[n][i] / per_rep[REFERENCE][i] for i in range(args.reps)]
              for n in names}
    result: Dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})",
        "torch": torch.__version__,
        "size": args.size, "settings": s, "dtype": "bf16" if args.bf16 else "fp32",
        "micro_batches_per_step": mb,
        "tokens_per_step": s["micro_batch"] * s["seq_length"] * mb,
        "reps": args.reps, "steps_per_rep": args.steps, "warmup_steps": args.warmup,
        "build_seconds": build_seconds, "reference": REFERENCE, "variants": {},
    }
    expert_flops = base_expert_flops_per_token(s)
    ref_rank = s["r_target"]
    for name in names:
        if name == "base":
            mean_rank = 0.0
        elif name == "uniform_r_target":
            mean_rank = float(s["r_target"])
        elif name == "uniform_r_max":
            mean_rank = float(s["r_max"])
        else:
            mean_rank = float(maps[name].double().mean())
        flops = lora_flops_per_token(s, mean_rank)
        entry = {"mean_rank": mean_rank,
                 "ms_per_step_median": 1000 * median(per_rep[name]),
                 "ms_per_step_all": [1000 * t for t in per_rep[name]],
                 "ratio_to_uniform_r_target": median(ratios[name]),
                 "ratio_min": min(ratios[name]), "ratio_max": max(ratios[name]),
                 "ratio_of_fastest_steps": min(per_rep[name]) / min(per_rep[REFERENCE]),
                 "lora_fwd_flops_per_token": flops,
                 "lora_flops_ratio_to_uniform_r_target": flops / lora_flops_per_token(s, ref_rank),
                 "lora_flops_over_expert_flops": flops / expert_flops}
        entry["phase_ms_median"] = {k: 1000 * median([p[k] for p in phases[name]])
                                    for k in ("fwd_bwd", "saliency", "optimizer")}
        if projection:
            # The same step with `projection` micro-batches: fwd+bwd scales, the per-step work
            # (after_gradients, optimizer) does not; per-repetition ratios, then the median.
            k = projection / mb

            def projected(p):
                return k * p["fwd_bwd"] + p["saliency"] + p["optimizer"]

            proj = [projected(a) / projected(b) for a, b in zip(phases[name],
                                                                  phases[REFERENCE])]
            entry["projected_ratio_to_uniform_r_target"] = median(proj)
            if name.startswith("drlora_"):
                entry["projected_saliency_pct_of_step"] = 100 * median(
                    [p["saliency"] / projected(p) for p in phases[name]])
        if name.startswith("drlora_"):
            entry["saliency_update_ms_median"] = 1000 * median(saliency_rep[name])
            entry["saliency_update_pct_of_step"] = 100 * median(
                [a / b for a, b in zip(saliency_rep[name], per_rep[name])])
        result["variants"][name] = entry

    if drlora is not None:
        # Saliency update + reduction at a non-event step, as a share of the DR-LoRA step.
        pcts = [result["variants"][n]["saliency_update_pct_of_step"] for n in names
                if n.startswith("drlora_")]
        result["saliency_update"] = {
            "ms_median": median([result["variants"][n]["saliency_update_ms_median"]
                                 for n in names if n.startswith("drlora_")]),
            "pct_of_step_max": max(pcts), "target_pct": 1.0, "meets_target": max(pcts) < 1.0}
        if projection:
            ppcts = [result["variants"][n]["projected_saliency_pct_of_step"] for n in names
                     if n.startswith("drlora_")]
            result["saliency_update"]["projected_pct_of_step_max"] = max(ppcts)
        # One growth event: after_gradients at an event step minus at a normal step, from the
        # mid-growth map (restored after every event so each repetition sees the same state).
        event_step = schedule.t_warmup if schedule.grows else None
        start_map = maps.get("drlora_mid", drlora.handle.initial_rank_map())
        event_s, normal_s = [], []
        for _ in range(max(3, args.reps) if event_step is not None else 0):
            for which, target in (("event", event_s), ("normal", normal_s)):
                set_map(drlora, start_map)
                tokens, pos, labels = batch
                drlora.optimizer.zero_grad(set_to_none=True)
                drlora.model(tokens, pos, None, labels=labels).float().mean().backward()
                _sync(device)
                t = time.perf_counter()
                drlora.controller.after_gradients(event_step if which == "event" else step_arg)
                _sync(device)
                target.append(time.perf_counter() - t)
        drlora.optimizer.zero_grad(set_to_none=True)
        set_map(drlora, start_map)
        if event_s:
            ref_step = median(per_rep[REFERENCE])
            extra = max(0.0, median(event_s) - median(normal_s))
            result["growth_event"] = {"after_gradients_ms_median": 1000 * median(event_s),
                                      "extra_ms_over_normal_step": 1000 * extra,
                                      "extra_pct_of_step": 100 * extra / ref_step}
            points = [(float(maps[n].double().mean()), result["variants"][n]
                       ["ratio_to_uniform_r_target"]) for n in names if n.startswith("drlora_")]
            run_est = whole_run_ratio(points, schedule, extra / ref_step)
            run_est["target"] = "<= 1.00"
            run_est["meets_target"] = run_est["ratio_to_uniform_r_target"] <= 1.0
            run_est["interpolated_from"] = [{"mean_rank": r, "ratio": t} for r, t in points]
            result["whole_run"] = run_est
            if projection:
                ref_proj = median([projection / mb * p["fwd_bwd"] + p["optimizer"]
                                   for p in phases[REFERENCE]])
                ppoints = [(r, result["variants"][n]["projected_ratio_to_uniform_r_target"])
                           for (r, _), n in zip(points, [n for n in names
                                                         if n.startswith("drlora_")])]
                proj = whole_run_ratio(ppoints, schedule, extra / ref_proj)
                result["whole_run"]["projected"] = {
                    "micro_batches_per_step": projection,
                    "tokens_per_step": projection * s["micro_batch"] * s["seq_length"],
                    "ratio_to_uniform_r_target": proj["ratio_to_uniform_r_target"],
                    "meets_target": proj["ratio_to_uniform_r_target"] <= 1.0}
        if projection:
            result["projection"] = {"micro_batches_per_step": projection,
                                    "tokens_per_step": projection * s["micro_batch"]
                                    * s["seq_length"]}

    if args.memory:
        del variants, drlora, base
        mem = measure_memory(args, names)
        key = "cuda_max_allocated_mb" if device.type == "cuda" else "cpu_peak_mb"
        ref = mem[REFERENCE][key]
        for name in names:
            result["variants"][name]["peak_memory_mb"] = mem[name][key]
            result["variants"][name]["peak_memory_ratio_to_uniform_r_target"] = \
                mem[name][key] / ref if ref > 0 else None
            result["variants"][name]["memory_probe"] = mem[name]
        result["memory_metric"] = key
    return result


def format_table(result: Dict) -> str:
    proj = result.get("projection")
    lines = [f"DR-LoRA step-time benchmark: size {result['size']}, {result['device']}, "
             f"{result['dtype']}, {result['tokens_per_step']} tokens/step "
             f"({result['micro_batches_per_step']} micro-batch(es)), median of "
             f"{result['reps']} interleaved repetitions x {result['steps_per_rep']} steps",
             "",
             "| variant | mean rank | ms/step (median) | fwd+bwd / after_gradients / AdamW ms | "
             "ratio to uniform r_target: median (min-max) | ratio of fastest steps | "
             + (f"ratio projected to {proj['tokens_per_step']} tokens/step | " if proj else "")
             + "LoRA fwd MFLOPs/token | LoRA/expert FLOPs | peak memory MB (ratio) |",
             "|---|---|---|---|---|---|" + ("---|" if proj else "") + "---|---|---|"]
    for name, v in result["variants"].items():
        mem = "-"
        if "peak_memory_mb" in v:
            r = v["peak_memory_ratio_to_uniform_r_target"]
            mem = f"{v['peak_memory_mb']:.1f} ({r:.2f}x)" if r is not None else \
                f"{v['peak_memory_mb']:.1f}"
        ph = v["phase_ms_median"]
        lines.append(f"| {name} | {v['mean_rank']:.2f} | {v['ms_per_step_median']:.2f} | "
                     f"{ph['fwd_bwd']:.1f} / {ph['saliency']:.1f} / {ph['optimizer']:.1f} | "
                     f"{v['ratio_to_uniform_r_target']:.3f}x ({v['ratio_min']:.3f}-"
                     f"{v['ratio_max']:.3f}) | {v['ratio_of_fastest_steps']:.3f}x | "
                     + (f"{v['projected_ratio_to_uniform_r_target']:.3f}x | " if proj else "")
                     + f"{v['lora_fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{100 * v['lora_flops_over_expert_flops']:.1f}% | {mem} |")
    if "saliency_update" in result:
        su = result["saliency_update"]
        lines.append("")
        lines.append(f"saliency update + reduction (after_gradients, non-event step): "
                     f"{su['ms_median']:.3f} ms = {su['pct_of_step_max']:.2f}% of a DR-LoRA step "
                     f"(worst map; target < 1%: {'met' if su['meets_target'] else 'NOT met'})"
                     + (f"; projected to {proj['tokens_per_step']} tokens/step: "
                        f"{su['projected_pct_of_step_max']:.2f}%" if proj else ""))
    if "growth_event" in result:
        ge = result["growth_event"]
        lines.append(f"growth event: after_gradients {ge['after_gradients_ms_median']:.3f} ms, "
                     f"{ge['extra_ms_over_normal_step']:.3f} ms more than a normal step "
                     f"({ge['extra_pct_of_step']:.2f}% of a uniform r_target step)")
    if "whole_run" in result:
        wr = result["whole_run"]
        lines.append(f"whole run ({wr['train_iters']} iterations, warm-up {wr['warmup_iters']}, "
                     f"{wr['events']} events every {wr['grow_interval']}, time-weighted mean "
                     f"rank {wr['time_weighted_average_rank']:.2f}): DR-LoRA / uniform r_target "
                     f"= {wr['ratio_to_uniform_r_target']:.3f}x (target <= 1.00: "
                     f"{'met' if wr['meets_target'] else 'NOT met'})"
                     + (f"; projected to {wr['projected']['tokens_per_step']} tokens/step: "
                        f"{wr['projected']['ratio_to_uniform_r_target']:.3f}x"
                        if "projected" in wr else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DR-LoRA step time / memory / FLOPs benchmark",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[1])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--reps", type=int, default=None,
                   help="interleaved repetitions; ratios are medians of per-repetition ratios "
                        "(default: tiny 25, olmoe-like 7)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant per repetition (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (the reference "
                        f"{REFERENCE} is always included)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches (gradient accumulation) per optimizer step: DR-LoRA's "
                        "statistics and AdamW run once per step (default: tiny 1, olmoe-like 4 "
                        "as in the paper's OLMoE runs)")
    p.add_argument("--project-micro-batches", type=int, default=None, metavar="K",
                   help="also report ratios projected to K micro-batches per step from the "
                        "measured phases (fwd+bwd x K/measured + after_gradients + optimizer): "
                        "for CPU runs that cannot afford realistic tokens per step")
    p.add_argument("--r-init", type=int, default=None)
    p.add_argument("--r-target", type=int, default=None)
    p.add_argument("--r-max", type=int, default=None)
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 parameters (default: on CUDA yes, on CPU no)")
    p.add_argument("--train-iters", type=int, default=38000,
                   help="schedule of the whole-run estimate (paper: OLMoE, 38,000)")
    p.add_argument("--warmup-iters", type=int, default=1140,
                   help="LR warm-up = first growth event of the whole-run schedule (3%%)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON ('-': print JSON to stdout instead)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # memory subprocess
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import torch

    if args.reps is None:
        args.reps = 25 if args.size == "tiny" else 7
    if args.steps is None:
        args.steps = 2
    if args.micro_batches is None:
        args.micro_batches = 1 if args.size == "tiny" else 4
    if args.bf16 is None:
        args.bf16 = torch.cuda.is_available()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if args.probe:
        print(json.dumps(probe_memory(args)), flush=True)
        return 0
    result = run(args)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
