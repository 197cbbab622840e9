"""Command line and the order of the runs of the quality benchmark."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Dict, List

from benchmarks.quality_bench import allocation, report, runs
from benchmarks.quality_bench.data import prepare_data
from benchmarks.quality_bench.runs import DRLORA_FAMILY, REPO, VARIANTS, say

# --quick: the CI smoke test (every control and DR-LoRA, 1 seed, a toy model), about a minute
# on 2 idle cores; `--quick --seeds 2` adds the paired intervals.
QUICK = {"seeds": 1, "variants": "uniform_r_target,uniform_flops,static_frequency,"
         "uniform_r_max,drlora", "num_layers": 2, "hidden_size": 32, "moe_ffn_hidden_size": 16,
         "num_experts": 8, "topk": 2, "base_iters": 8, "finetune_iters": 12, "batch_size": 4,
         "num_per_domain": 60, "frequent_base_factor": 2, "finetune_records": 80,
         "eval_prompts_rare": 12, "eval_prompts_frequent": 8, "probe_records": 16,
         "vocab_size": 256, "events": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DR-LoRA quality benchmark: DR-LoRA and its ablations against uniform "
                    "LoRA at r_target, at DR-LoRA's FLOPs and at r_max, and a static "
                    "frequency-proportional allocation, on a synthetic two-domain mix.")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "benchmarks", "quality"),
                   help="output folder (default under runs/, which git ignores)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: toy sizes, 2 seeds, the controls and DR-LoRA "
                        "(flags given explicitly still win)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per variant (0..N-1)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--frequent-domain", default="prose",
                   help="the mix's frequent domain (one the base already solves)")
    p.add_argument("--rare-domain", default="sort",
                   help="the mix's rare domain (one the base solves only partly)")
    p.add_argument("--rare-share", type=float, default=0.2,
                   help="share of the fine-tuning records from the rare domain")
    p.add_argument("--finetune-iters", type=int, default=100)
    p.add_argument("--base-iters", type=int, default=400,
                   help="base training iterations on all domains (short: the base knows the "
                        "rare domain only partly)")
    p.add_argument("--frequent-base-factor", type=int, default=4,
                   help="the base corpus holds this many times --num-per-domain records of "
                        "the frequent domain (so the base solves it)")
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="sequences of 64 tokens per "
                   "iteration")
    p.add_argument("--num-per-domain", type=int, default=1500,
                   help="base corpus records per domain")
    p.add_argument("--finetune-records", type=int, default=4000,
                   help="fine-tuning records (the mix)")
    p.add_argument("--eval-prompts-rare", type=int, default=1000,
                   help="held-out prompts of the rare domain")
    p.add_argument("--eval-prompts-frequent", type=int, default=200,
                   help="held-out prompts of the frequent domain")
    p.add_argument("--probe-records", type=int, default=400,
                   help="fine-tuning records whose routing is counted (static map, FLOPs)")
    for flag, default in (("--corpus-seed", 7), ("--vocab-size", 512), ("--num-layers", 4),
                          ("--hidden-size", 128), ("--moe-ffn-hidden-size", 64),
                          ("--num-experts", 64), ("--topk", 8), ("--r-init", 2),
                          ("--r-target", 4), ("--r-max", 8), ("--events", 10)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--p-grow", type=float, default=0.5)
    p.add_argument("--budget-at", type=float, default=0.5,
                   help="growth ends (the budget is reached) after this share of the run")
    p.add_argument("--grow-interval", type=int, default=None,
                   help="steps between growth events (default: --events events)")
    p.add_argument("--json", default=None, help="JSON path (default OUT/quality.json)")
    p.add_argument("--fresh", action="store_true",
                   help="retrain the base and every run even if cached")
    return p


def parse(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the preset fills what was not given on the command line
        words = sys.argv[1:] if argv is None else list(argv)
        explicit = {action.dest for action in parser._actions for opt in action.option_strings
                    if any(w == opt or w.startswith(opt + "=") for w in words)}
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "uniform_flops" in args.variants and "drlora" not in args.variants:
        parser.error("uniform_flops matches DR-LoRA's measured FLOPs: add drlora")
    if args.frequent_domain == args.rare_domain:
        parser.error("--frequent-domain and --rare-domain must differ")
    return args


SETTINGS = ("frequent_domain", "rare_domain", "rare_share", "frequent_base_factor",
            "finetune_iters", "base_iters", "lr", "batch_size", "num_per_domain",
            "finetune_records", "eval_prompts_rare",
            "eval_prompts_frequent", "probe_records", "corpus_seed", "vocab_size",
            "num_layers", "hidden_size", "moe_ffn_hidden_size", "num_experts", "topk",
            "r_init", "r_target", "r_max", "p_grow", "budget_at", "events", "jobs", "quick")


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.domains = [args.frequent_domain, args.rare_domain]

    # --- base -------------------------------------------------------------------------------
    def base(self) -> Dict:
        from megatron_drlora.data.tokenizer import file_sha256

        args, out = self.args, self.out
        self.base_dir = os.path.join(out, "base")
        self.base_flags = runs.base_flags(args, self.paths, self.base_dir)
        stamp = {"flags": self.base_flags,
                 "tokenizer_sha256": file_sha256(self.paths["tokenizer"]),
                 "data_settings": json.load(open(os.path.join(out, "data", "settings.json")))}
        stamp_path = os.path.join(self.base_dir, "bench_settings.json")
        if args.fresh or not (os.path.isfile(stamp_path)
                              and json.load(open(stamp_path)) == stamp):
            shutil.rmtree(self.base_dir, ignore_errors=True)
            say(f"> base: {args.base_iters} iterations on all domains -> {self.base_dir}")
            trained = runs.train(self.base_flags, self.base_dir, _port())
            with open(stamp_path, "w") as fh:
                json.dump(stamp, fh)
            say(f"  {trained['seconds']:.0f} s, validation loss {trained['valid_loss']}")
        else:
            say(f"> base: reusing {self.base_dir}")
        record_path = os.path.join(self.base_dir, "base_record.json")
        if os.path.isfile(record_path) and json.load(open(record_path))["stamp"] == stamp:
            record = json.load(open(record_path))["record"]  # evaluated before, same base
        else:
            model, _, _ = self.evaluator.load(self.base_flags, None)
            record = {"scores": self.evaluator.score(model),
                      "routing": self.evaluator.routing(model)}
            del model
            with open(record_path, "w") as fh:
                json.dump({"stamp": stamp, "record": record}, fh)
        say("> base model on held-out prompts: " + _scores_line(record["scores"]))
        return record

    # --- runs -------------------------------------------------------------------------------
    def flags(self, variant: str, seed: int) -> List[str]:
        return runs.finetune_flags(self.args, self.paths, self.base_dir,
                                   self.run_dir(variant, seed), variant, seed,
                                   flops_rank=self.flops.get("rank"),
                                   static_map=self.static_map_path)

    def run_dir(self, variant: str, seed: int) -> str:
        return os.path.join(self.out, "runs", f"{variant}_s{seed}")

    def cached(self, variant: str, seed: int, flags: List[str]):
        path = os.path.join(self.run_dir(variant, seed), "record.json")
        if self.args.fresh or not os.path.isfile(path):
            return None
        record = json.load(open(path))
        return record if record.get("flags") == flags else None

    def train_job(self, variant: str, seed: int, flags: List[str]) -> Dict:
        run_dir = self.run_dir(variant, seed)
        shutil.rmtree(run_dir, ignore_errors=True)  # no stale checkpoints or logs
        return runs.train(flags, run_dir, _port())

    def evaluate(self, variant: str, seed: int, flags: List[str], trained: Dict) -> Dict:
        from benchmarks.quality_bench.evaluation import adapter_widths

        args, run_dir = self.args, self.run_dir(variant, seed)
        record = {"variant": variant, "seed": seed, "run_dir": run_dir, "flags": flags}
        record.update(trained)
        model, handle, rank_map = self.evaluator.load(flags, run_dir)
        logged = record.pop("logged_rank_map")
        if logged is not None and logged != rank_map.tolist():
            raise RuntimeError(f"{run_dir}: the checkpoint's rank map differs from the last "
                               f"one in drlora_ranks.jsonl")
        record["scores"] = self.evaluator.score(model)
        routing = self.evaluator.routing(model)
        widths = adapter_widths(handle)
        L, E, M = handle.rank_map_shape()
        record["rank_map"] = rank_map.tolist()
        record["lora_params"] = sum(r * w for layer in record["rank_map"] for e in layer
                                    for r, w in zip(e, widths))
        record["final_mean_rank"] = int(rank_map.sum()) / (L * E * M)
        record["lora_flops_ratio"] = allocation.flops_ratio_to_uniform(
            record["rank_map"], routing["counts"], widths, args.r_target)
        record["routing_counts"] = routing["counts"]
        if variant in DRLORA_FAMILY or variant == "static_frequency":
            record["allocation"] = allocation.allocation_analysis(
                record["rank_map"], self.base_record["routing"], args.rare_domain, args.r_init)
        del model, handle
        with open(os.path.join(run_dir, "record.json"), "w") as fh:
            json.dump(record, fh)
        return record

    def run(self) -> Dict:
        args = self.args
        t_start = time.perf_counter()
        os.makedirs(self.out, exist_ok=True)
        self.paths = prepare_data(args, self.out)
        _single_process_world()
        from benchmarks.quality_bench.evaluation import Evaluator

        self.evaluator = Evaluator(self.paths, self.domains)
        self.base_record = self.base()
        # The static control: the base's routing on the target mix, measured once.
        self.static_map = allocation.static_frequency_map(
            self.base_record["routing"]["counts"], 2, args.r_init, args.r_target, args.r_max)
        self.static_map_path = os.path.join(self.out, "static_frequency_rank_map.json")
        text = json.dumps({"rank_map": self.static_map})
        if not (os.path.isfile(self.static_map_path)
                and open(self.static_map_path).read() == text):
            with open(self.static_map_path + ".tmp", "w") as fh:  # runs may be reading it
                fh.write(text)
            os.replace(self.static_map_path + ".tmp", self.static_map_path)
        self.plan = runs.plan(args)
        say(f"> growth plan ({self.plan['command']}): events at steps "
            f"{self.plan['first_event_step']}..{self.plan['last_event_step']} every "
            f"{runs.schedule(args)['interval']}, budget reached at step "
            f"{self.plan['target_reached_step']} of {args.finetune_iters}")
        self.flops: Dict = {}
        records = self.schedule_runs()
        results = {"settings": {k: getattr(args, k) for k in SETTINGS},
                   "base": self.base_record, "plan": self.plan, "flops_match": self.flops,
                   "static_map": self.static_map, "runs": records}
        results["settings"].update(seeds=list(range(args.seeds)), variants=args.variants,
                                   schedule=runs.schedule(args))
        results["wall_seconds"] = time.perf_counter() - t_start
        return results

    def schedule_runs(self) -> List[Dict]:
        args = self.args
        seeds = range(args.seeds)
        # DR-LoRA first (the FLOPs-matched control needs its maps), then the controls, then
        # the ablations: a run stopped early has the main comparisons complete.
        first = [("drlora", s) for s in seeds if "drlora" in args.variants]
        rest = [(v, s) for s in seeds for v in args.variants
                if v not in DRLORA_FAMILY + ("uniform_flops",)]
        rest += [(v, s) for s in seeds for v in args.variants
                 if v in DRLORA_FAMILY and v != "drlora"]
        later = [("uniform_flops", s) for s in seeds if "uniform_flops" in args.variants]
        records: Dict = {}
        pending = {}
        queue = first + rest
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            def submit(variant, seed) -> None:
                flags = self.flags(variant, seed)
                hit = self.cached(variant, seed, flags)
                if hit is not None:
                    say(f"> {variant} seed {seed}: reusing {self.run_dir(variant, seed)}")
                    records[(variant, seed)] = hit
                    return
                say(f"> fine-tune {variant} seed {seed} -> {self.run_dir(variant, seed)}")
                pending[pool.submit(self.train_job, variant, seed, flags)] = (variant, seed,
                                                                               flags)

            while True:
                # at most `jobs` runs queued in the pool, so the order above holds; the
                # FLOPs-matched runs go next as soon as every DR-LoRA run is measured
                while True:
                    if later and all((v, s) in records for v, s in first):
                        self.match_flops([records[k] for k in first])
                        queue, later = later + queue, []
                    if not queue or len(pending) >= max(1, args.jobs):
                        break
                    submit(*queue.pop(0))
                if not pending:
                    if queue or later:
                        continue
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    variant, seed, flags = pending.pop(future)
                    record = self.evaluate(variant, seed, flags, future.result())
                    records[(variant, seed)] = record
                    say(f"  {variant} seed {seed}: {record['seconds']:.0f} s; "
                        + _scores_line(record["scores"])
                        + f"; LoRA FLOPs/token x{record['lora_flops_ratio']:.2f} of r_target")
        order = {v: i for i, v in enumerate(args.variants)}
        return [records[k] for k in sorted(records, key=lambda k: (order[k[0]], k[1]))]

    def match_flops(self, drlora_records: List[Dict]) -> None:
        ratios = [r["lora_flops_ratio"] for r in drlora_records]
        self.flops.update(allocation.flops_matched_rank(ratios, self.args.r_target))
        say(f"> FLOPs-matched uniform rank: r_target x mean FLOPs ratio = "
            f"{self.flops['exact']:.2f} -> {self.flops['rank']} ({self.flops['rounding']})")


def _port() -> int:
    from megatron_drlora.launch.ports import free_port

    return free_port()


def _single_process_world() -> None:
    """One single-process world for the evaluation in this process (training runs under
    torchrun in subprocesses, without these variables)."""
    from megatron_drlora.launch.ports import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    for key in ("LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        os.environ.pop(key, None)


def _scores_line(scores: Dict) -> str:
    return ", ".join(f"{d}: loss {s['loss']:.3f} accuracy {100 * s['accuracy']:.1f}%"
                     for d, s in scores.items())


def main(argv=None) -> int:
    args = parse(argv)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        results = Benchmark(args).run()
    except RuntimeError as err:
        say(f"error: {err}")
        return 1
    import resource

    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    # CPU seconds of this process and of every run it waited for (not of cached runs)
    results["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in used)
    out = os.path.abspath(args.out)
    results["summary"] = report.summarize(results)
    text = report.markdown(results)
    pictures = report.pictures(results, out)
    results["pictures"] = pictures
    with open(os.path.join(out, "quality.md"), "w") as fh:
        fh.write(text + "\n")
    json_path = args.json or os.path.join(out, "quality.json")
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print("\n" + text)
    say(f"\nwrote {os.path.join(out, 'quality.md')}, {json_path} and "
        f"{', '.join(pictures.values()) or 'no pictures (matplotlib missing)'} "
        f"({results['wall_seconds']:.0f} s)")
    return 0
