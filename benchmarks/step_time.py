#!/usr/bin/env python
"""Step time and adapter memory of DR-LoRA against uniform LoRA, on the path users run.

    python benchmarks/step_time.py                      # GPU: OLMoE widths, 16,384 tokens/step
    python benchmarks/step_time.py --size tiny          # CPU smoke size
    python benchmarks/step_time.py --size olmoe-cpu     # OLMoE widths scaled to a CPU

One process initialises Megatron-LM (the training entry's arguments, model provider and
DRLoRARun, Megatron's DDP and optimizer, `train_step` with examples/pretrain_gpt.py's
forward step; see benchmarks/megatron_step.py) and builds three variants on the same frozen
base (same weights, same routing, same batch):

- uniform_r_target  LoRA at r_target on every expert (`--drlora-method uniform`): reference
- uniform_r_max     LoRA at r_max
- drlora            DR-LoRA, timed at rank maps along the planned trajectory (the schedule of
                    `--train-iters` / `--lr-warmup-iters`, maps made by the real allocator
                    from a synthetic saliency), at non-event steps

Variants are interleaved (order rotated and reversed every repetition) and every ratio is the
median of per-repetition ratios, so drift on a shared machine cancels. The run ratio
integrates DR-LoRA's step time over the planned rank trajectory (linear in the average rank
between the measured maps) plus the measured extra cost of the growth events. Adapter memory
is read from Megatron's DDP gradient buffers and optimizer (parameters, gradients, main
copies, optimizer state). Host syncs are DR-LoRA's calls that wait for the device in one
non-event training step (counted on any device, as tests/test_host_syncs.py does; on CUDA also
torch's own sync debug mode).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import megatron_step as ms  # noqa: E402  (prepares the megatron import)
from benchmarks import step_accounting as acc  # noqa: E402

REFERENCE = "uniform_r_target"
SAME_MAP = "drlora_at_uniform_map"

_OLMOE = dict(hidden_size=2048, num_attention_heads=16, num_experts=64, moe_router_topk=8,
              moe_ffn_hidden_size=1024, ffn_hidden_size=1024, r_init=32, r_target=64,
              r_max=128)
SIZES: Dict[str, Dict] = {
    # CPU CI: seconds per run.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_experts=8,
                 moe_router_topk=2, moe_ffn_hidden_size=64, ffn_hidden_size=128,
                 vocab_size=256, seq_length=64, micro_batch=8, micro_batches=1, r_init=4,
                 r_target=8, r_max=16, project_tokens=None),
    # OLMoE-1B-7B widths (hidden 2048, expert ffn 1024, 64 experts top-8, 16 heads, vocabulary
    # 50304), the paper's ranks 32 / 64 / 128 and tokens per GPU (1 x 4096 x 4 micro-batches =
    # 16,384); 4 of the 16 layers (--layers 16 for all).
    "olmoe": dict(_OLMOE, num_layers=4, vocab_size=50304, seq_length=4096, micro_batch=1,
                  micro_batches=4, project_tokens=None),
    # The same widths on a CPU: one layer, 256 tokens per step, vocabulary 1024; ratios also
    # projected to 16,384 tokens per step.
    "olmoe-cpu": dict(_OLMOE, num_layers=1, vocab_size=1024, seq_length=256, micro_batch=1,
                      micro_batches=1, project_tokens=16384),
}


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def settings(args) -> Dict:
    s = dict(SIZES[args.size])
    for key in ("num_layers", "seq_length", "vocab_size", "micro_batch", "micro_batches",
                "r_init", "r_target", "r_max", "project_tokens"):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    if args.tokens_per_step is not None:
        per_micro = s["micro_batch"] * s["seq_length"]
        if args.tokens_per_step % per_micro:
            raise SystemExit(f"error: --tokens-per-step {args.tokens_per_step} is not a multiple "
                             f"of micro-batch x sequence = {per_micro}")
        s["micro_batches"] = args.tokens_per_step // per_micro
    s.update(train_iters=args.train_iters, lr_warmup_iters=args.lr_warmup_iters, seed=args.seed,
             rank_pool=bool(args.rank_pool))
    s["tokens_per_step"] = s["micro_batch"] * s["seq_length"] * s["micro_batches"]
    return s


def build(mega, s):
    from megatron_drlora import DRLoRAConfig

    # plain LoRA: every expert's factors at its fixed rank (the dense bank)
    ref = ms.build_variant(mega, REFERENCE, DRLoRAConfig(budget=s["r_target"], method="uniform",
                                                         rank_pool=False))
    rmax = ms.build_variant(mega, "uniform_r_max", DRLoRAConfig(budget=s["r_max"],
                                                                method="uniform",
                                                                rank_pool=False), base=ref)
    dr = ms.build_variant(mega, "drlora", DRLoRAConfig(budget=s["r_target"], r_init=s["r_init"],
                                                       r_max=s["r_max"],
                                                       rank_pool=s.get("rank_pool", True)),
                          base=ref)
    return [ref, rmax, dr]


def measure(args, s) -> Dict:
    import torch

    mega = ms.Megatron(ms.megatron_argv(s, bf16=args.bf16, te=args.te, log_dir=ms.new_log_dir(),
                                        extra=args.megatron_args))
    import logging

    logging.getLogger("megatron").setLevel(logging.WARNING)
    variants = build(mega, s)
    ref, rmax, dr = variants
    batch = ms.make_batch(s, args.seed)
    first = [ms.train_step(mega, v, batch, 0) for v in variants]  # builds the controllers
    del first
    schedule = dr.controller.schedule
    step = schedule.t_warmup + 1  # router trainable, statistics on, never an event
    while schedule.is_event(step):
        step += 1
    for v in variants:
        for _ in range(args.warmup):
            ms.train_step(mega, v, batch, step)

    maps = acc.trajectory_maps(schedule, dr.handle.initial_rank_map(), args.points, args.seed)
    configs = [(REFERENCE, ref, None), ("uniform_r_max", rmax, None)]
    for events, rank_map in maps:
        configs.append((f"drlora@{events}", dr, rank_map))
    if args.same_map:  # DR-LoRA's bank at uniform LoRA's map: what the bank itself costs
        configs.append((SAME_MAP, dr, torch.full_like(maps[0][1], s["r_target"])))
    phases: Dict[str, List[Dict]] = {name: [] for name, _, _ in configs}
    for rep in range(args.reps):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        if rep % 2:
            order = order[::-1]
        for name, v, rank_map in order:
            if rank_map is not None:
                ms.set_rank_map(v, rank_map)
            runs = [ms.train_step(mega, v, batch, step) for _ in range(args.steps)]
            phases[name].append({k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})
        if args.verbose:
            print(f"rep {rep}: " + " ".join(f"{n}={1000 * p[-1]['step']:.1f}ms"
                                            for n, p in phases.items()), flush=True)

    # A growth event: DR-LoRA's finish() at an event step minus at a normal step, from a
    # middle map that can still grow (restored after every event, so each repetition starts
    # from the same state).
    event_steps = schedule.event_steps()
    middle = maps[max(0, min(len(maps) // 2, len(maps) - 2))][1]
    event_finish, normal_finish = [], []
    for _ in range(max(2, args.reps // 2) if event_steps else 0):
        for at, out in ((event_steps[len(event_steps) // 2], event_finish),
                        (step, normal_finish)):
            ms.set_rank_map(dr, middle)
            out.append(ms.train_step(mega, dr, batch, at)["finish"])
    ms.set_rank_map(dr, middle)

    memory = {v.name: acc.trainable_memory(v.model, v.optimizer,
                                           list(v.handle.lora_parameters())) for v in variants}
    syncs = host_syncs(mega, dr, batch, step)
    return dict(mega_args=mega.args, variants=variants, schedule=schedule, step=step,
                maps=maps, phases=phases, event_finish=event_finish,
                normal_finish=normal_finish, memory=memory, syncs=syncs,
                device=(torch.cuda.get_device_name(0) if ms.have_cuda() else
                        f"cpu ({os.cpu_count()} cores visible, torch threads "
                        f"{torch.get_num_threads()})"),
                torch=torch.__version__)


def host_syncs(mega, dr, batch, step) -> Dict:
    """DR-LoRA's device waits in one non-event step, in the steady state (after a step that
    follows the last rank-map change, which copies the new map to the device once). On CUDA
    also torch's sync debug mode over another step; `count` is then the larger of the two."""
    ms.train_step(mega, dr, batch, step)
    counter = acc.HostSyncCounter(host_tensors=[dr.controller.rank_map])
    try:
        with counter:
            ms.train_step(mega, dr, batch, step)
        out = {"count": len(counter.calls), "calls": counter.calls}
    except Exception as err:  # a diagnostic: never lose the timings to it
        out = {"count": None, "calls": [], "error": repr(err)}
    if ms.have_cuda():
        cuda = acc.CudaSyncCounter()
        try:
            with cuda:
                ms.train_step(mega, dr, batch, step)
            out["cuda_sync_debug_drlora"] = len(cuda.drlora)
            out["cuda_sync_debug_drlora_calls"] = cuda.drlora
            out["cuda_sync_debug_total_in_step"] = cuda.total
            if cuda.error:
                out["cuda_sync_debug_error"] = cuda.error
            elif out["count"] is not None:  # the larger of the two counts
                out["count"] = max(out["count"], len(cuda.drlora))
        except Exception as err:  # the count is a diagnostic: never lose the benchmark to it
            out["cuda_sync_debug_error"] = repr(err)
    return out


def summarise(args, s, m) -> Dict:
    phases, schedule = m["phases"], m["schedule"]
    names = list(phases)
    k = (s["project_tokens"] / s["tokens_per_step"]) if s.get("project_tokens") else None

    def projected(p):
        return k * p["fwd_bwd"] + p["finalize"] + p["saliency"] + p["optimizer"]

    ref = phases[REFERENCE]
    result_variants = {}
    for name in names:
        ph = phases[name]
        entry = {"ms_per_step_median": 1000 * median([p["step"] for p in ph]),
                 "ratio_to_uniform_r_target": median([a["step"] / b["step"]
                                                      for a, b in zip(ph, ref)]),
                 "phase_ms_median": {key: 1000 * median([p[key] for p in ph]) for key in
                                     ("fwd_bwd", "finalize", "saliency", "optimizer")},
                 "saliency_fraction_of_step": median([p["saliency"] / p["step"] for p in ph]),
                 # robust to a loaded machine (contention only adds time): fastest / fastest
                 "ratio_of_fastest_steps": min(p["step"] for p in ph) / min(p["step"]
                                                                            for p in ref),
                 "phases_ms_every_repetition": [{key: 1000 * x for key, x in p.items()}
                                                for p in ph]}
        if k:
            fastest = {key: min(p[key] for p in ph) for key in ph[0]}
            fastest_ref = {key: min(p[key] for p in ref) for key in ref[0]}
            entry["projected_ratio_of_fastest_phases"] = projected(fastest) / projected(
                fastest_ref)
            entry["projected_ratio_to_uniform_r_target"] = median(
                [projected(a) / projected(b) for a, b in zip(ph, ref)])
            entry["projected_saliency_fraction_of_step"] = median(
                [p["saliency"] / projected(p) for p in ph])
        result_variants[name] = entry
    for events, rank_map in m["maps"]:
        e = result_variants[f"drlora@{events}"]
        e["events_done"] = events
        e["mean_rank"] = float(rank_map.double().mean())
        e["rank_min"], e["rank_max"] = int(rank_map.min()), int(rank_map.max())
    result_variants[REFERENCE]["mean_rank"] = float(s["r_target"])
    if SAME_MAP in result_variants:
        result_variants[SAME_MAP]["mean_rank"] = float(s["r_target"])
    result_variants["uniform_r_max"]["mean_rank"] = float(s["r_max"])

    ref_step = median([p["step"] for p in ref])
    dr_names = [n for n in names if n.startswith("drlora@")]
    event_extra = (max(0.0, median(m["event_finish"]) - median(m["normal_finish"]))
                   if m["event_finish"] else 0.0)

    def run_mean(key):
        pts = [(result_variants[n]["mean_rank"], result_variants[n][key]) for n in dr_names]
        return acc.integrate_run(pts, schedule, 0.0)["mean"]

    run = acc.integrate_run([(result_variants[n]["mean_rank"],
                              result_variants[n]["ratio_to_uniform_r_target"])
                             for n in dr_names], schedule, event_extra / ref_step)
    run_fastest = acc.integrate_run([(result_variants[n]["mean_rank"],
                                      result_variants[n]["ratio_of_fastest_steps"])
                                     for n in dr_names], schedule,
                                    event_extra / min(p["step"] for p in ref))
    out = {
        "tokens_per_step": s["tokens_per_step"],
        "run_ratio_vs_uniform_r_target": run["mean"],
        "run_ratio_vs_uniform_r_target_fastest_steps": run_fastest["mean"],
        "saliency_fraction_of_step": max(result_variants[n]["saliency_fraction_of_step"]
                                         for n in dr_names),
        "saliency_fraction_of_step_run_mean": run_mean("saliency_fraction_of_step"),
        "adapter_memory_ratio_vs_uniform_r_target":
            m["memory"]["drlora"]["adapters"]["total"]
            / m["memory"][REFERENCE]["adapters"]["total"],
        "host_syncs_per_step": m["syncs"]["count"],
        "uniform_r_max_ratio_vs_uniform_r_target":
            result_variants["uniform_r_max"]["ratio_to_uniform_r_target"],
        "uniform_r_max_memory_ratio_vs_uniform_r_target":
            m["memory"]["uniform_r_max"]["adapters"]["total"]
            / m["memory"][REFERENCE]["adapters"]["total"],
        "run": dict(run, event_extra_ms=1000 * event_extra,
                    event_extra_fraction_of_uniform_step=event_extra / ref_step),
        "variants": result_variants,
        "memory_bytes": m["memory"],
        "host_syncs": m["syncs"],
        "device": m["device"], "torch": m["torch"], "size": args.size, "settings": s,
        "dtype": "bf16" if args.bf16 else "fp32",
        "experts": "TEGroupedMLP (Transformer Engine)" if args.te else "SequentialMLP",
        "timed_iteration": m["step"], "reps": args.reps, "steps_per_rep": args.steps,
        "megatron_version": _megatron_version(),
    }
    if k:
        pts = [(result_variants[n]["mean_rank"],
                result_variants[n]["projected_ratio_to_uniform_r_target"]) for n in dr_names]
        ref_proj = median([projected(p) for p in ref])
        out["projected"] = {
            "tokens_per_step": s["project_tokens"],
            "run_ratio_vs_uniform_r_target":
                acc.integrate_run(pts, schedule, event_extra / ref_proj)["mean"],
            "run_ratio_vs_uniform_r_target_fastest_phases": acc.integrate_run(
                [(result_variants[n]["mean_rank"],
                  result_variants[n]["projected_ratio_of_fastest_phases"]) for n in dr_names],
                schedule, event_extra / ref_proj)["mean"],
            "saliency_fraction_of_step": max(
                result_variants[n]["projected_saliency_fraction_of_step"] for n in dr_names),
            "uniform_r_max_ratio_vs_uniform_r_target":
                result_variants["uniform_r_max"]["projected_ratio_to_uniform_r_target"]}
    for key in ("run_ratio_vs_uniform_r_target", "saliency_fraction_of_step",
                "adapter_memory_ratio_vs_uniform_r_target"):
        if not (math.isfinite(out[key]) and out[key] > 0):
            raise RuntimeError(f"{key} = {out[key]}: the measurement failed")
    return out


def _megatron_version() -> str:
    try:
        import megatron.core

        return megatron.core.__version__.split("+")[0]  # "+<hash>" is the cwd's git commit
    except Exception:
        return "?"


def format_report(r: Dict) -> str:
    s = r["settings"]
    proj = r.get("projected")
    lines = [f"DR-LoRA step time on Megatron-LM's training step: size {r['size']} "
             f"({s['num_layers']} layer(s), hidden {s['hidden_size']}, {s['num_experts']} "
             f"experts top-{s['moe_router_topk']}, expert ffn {s['moe_ffn_hidden_size']}, ranks "
             f"{s['r_init']}/{s['r_target']}/{s['r_max']}), {r['device']}, {r['dtype']}, "
             f"{r['experts']}, megatron-core {r['megatron_version']}, "
             f"{'rank pool' if s.get('rank_pool', True) else '--no-drlora-rank-pool'}, "
             f"{r['tokens_per_step']} "
             f"tokens/step ({s['micro_batches']} micro-batch(es)), median of {r['reps']} "
             f"interleaved repetitions x {r['steps_per_rep']} step(s)", "",
             "| variant | mean rank (min-max) | ms/step | fwd+bwd / finalize / saliency / "
             "optimizer ms | ratio to uniform r_target (fastest steps) | "
             + (f"projected to {proj['tokens_per_step']} tokens | " if proj else "")
             + "saliency % of step |",
             "|---|---|---|---|---|" + ("---|" if proj else "") + "---|"]
    for name, v in r["variants"].items():
        ph = v["phase_ms_median"]
        span = (f" ({v['rank_min']}-{v['rank_max']})" if "rank_min" in v else "")
        lines.append(
            f"| {name} | {v['mean_rank']:.2f}{span} | {v['ms_per_step_median']:.1f} | "
            f"{ph['fwd_bwd']:.1f} / {ph['finalize']:.1f} / {ph['saliency']:.1f} / "
            f"{ph['optimizer']:.1f} | {v['ratio_to_uniform_r_target']:.3f}x "
            f"({v['ratio_of_fastest_steps']:.3f}x) | "
            + (f"{v['projected_ratio_to_uniform_r_target']:.3f}x | " if proj else "")
            + f"{100 * v['saliency_fraction_of_step']:.2f}% |")
    mem = r["memory_bytes"]
    lines += ["", "adapter memory (parameters + gradients + main copies + optimizer state, "
              "from Megatron's DDP buffers and optimizer), MiB:"]
    for name, m in mem.items():
        a = m["adapters"]
        lines.append(f"  {name}: {a['total'] / 2 ** 20:.1f} = " + " + ".join(
            f"{a[p] / 2 ** 20:.1f} {p.replace('_', ' ')}" for p in acc.MEMORY_PARTS))
    run = r["run"]
    lines += [
        "",
        f"whole run ({run['train_iters']} iterations, {run['events']} growth events every "
        f"{run['grow_interval']} from {run['warmup_iters']}, time-weighted mean rank "
        f"{run['time_weighted_average_rank']:.2f}; growth event +{run['event_extra_ms']:.2f} ms)",
        f"  run_ratio_vs_uniform_r_target            {r['run_ratio_vs_uniform_r_target']:.3f}"
        f"   (of the fastest steps: {r['run_ratio_vs_uniform_r_target_fastest_steps']:.3f})"
        + (f"   (projected to {proj['tokens_per_step']} tokens/step: "
           f"{proj['run_ratio_vs_uniform_r_target']:.3f}, of the fastest phases: "
           f"{proj['run_ratio_vs_uniform_r_target_fastest_phases']:.3f})" if proj else ""),
        f"  saliency_fraction_of_step (worst map)    {r['saliency_fraction_of_step']:.4f}"
        + (f"   (projected: {proj['saliency_fraction_of_step']:.4f})" if proj else ""),
        f"  adapter_memory_ratio_vs_uniform_r_target {r['adapter_memory_ratio_vs_uniform_r_target']:.3f}"
        f"   (uniform r_max: {r['uniform_r_max_memory_ratio_vs_uniform_r_target']:.3f})",
        f"  host_syncs_per_step                      {r['host_syncs_per_step']}"
        + (f"   ({'; '.join(r['host_syncs']['calls'][:4])})" if r['host_syncs']['calls'] else "")
        + (f"   (CUDA sync debug mode: {r['host_syncs']['cuda_sync_debug_drlora']} from DR-LoRA, "
           f"{r['host_syncs']['cuda_sync_debug_total_in_step']} in the whole step)"
           if "cuda_sync_debug_drlora" in r["host_syncs"] else ""),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="default: olmoe with CUDA, tiny without")
    p.add_argument("--layers", dest="num_layers", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="sets --micro-batches to this / (micro-batch x sequence); default of "
                        "the olmoe size: 16384 (the paper's tokens per GPU)")
    p.add_argument("--project-tokens", type=int, default=None, metavar="TOKENS",
                   help="also report ratios projected to this many tokens per step (forward + "
                        "backward scaled, the per-step work not): for CPUs")
    p.add_argument("--r-init", type=int, default=None)
    p.add_argument("--r-target", type=int, default=None)
    p.add_argument("--r-max", type=int, default=None)
    p.add_argument("--points", type=int, default=4,
                   help="rank maps timed along the planned trajectory (initial ... final)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant and repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--train-iters", type=int, default=38000,
                   help="the run whose rank trajectory is integrated (paper's OLMoE: 38,000)")
    p.add_argument("--lr-warmup-iters", type=int, default=1140,
                   help="LR warm-up = first growth event (3%%)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with CUDA, off on CPU")
    p.add_argument("--te", action=argparse.BooleanOptionalAction, default=None,
                   help="Transformer Engine grouped experts (default: when CUDA and TE are "
                        "there)")
    p.add_argument("--megatron-args", default="", metavar="'FLAGS'",
                   help="more Megatron-LM flags, e.g. '--use-distributed-optimizer'")
    p.add_argument("--rank-pool", action=argparse.BooleanOptionalAction, default=True,
                   help="DR-LoRA with the rank pool (the default; --no-rank-pool: the dense "
                        "bank, --no-drlora-rank-pool); uniform LoRA is always the dense bank")
    p.add_argument("--same-map", action="store_true",
                   help=f"also time DR-LoRA at uniform LoRA's rank map (every expert at "
                        f"r_target: '{SAME_MAP}', not part of the run): the cost of DR-LoRA's "
                        f"bank and hooks themselves against plain LoRA")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    import shlex
    import warnings

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_drlora.compat.megatron import have_transformer_engine

    cuda = ms.have_cuda()
    args.size = args.size or ("olmoe" if cuda else "tiny")
    args.bf16 = cuda if args.bf16 is None else args.bf16
    te_detected = args.te is None
    args.te = (cuda and have_transformer_engine()) if args.te is None else args.te
    args.megatron_args = shlex.split(args.megatron_args)
    s = settings(args)
    try:
        result = summarise(args, s, measure(args, s))
    except Exception:
        if not (args.te and te_detected):
            raise
        # TE was detected, not asked for: never let it cost the measurement. This process's
        # Megatron state is spent, so a fresh one runs without it.
        import subprocess
        import traceback

        traceback.print_exc()
        print("step_time: the run with Transformer Engine failed (above); running again "
              "with --no-te (SequentialMLP experts)", flush=True)
        rest = list(sys.argv[1:] if argv is None else argv)
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + rest + ["--no-te"])
    print(format_report(result), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
