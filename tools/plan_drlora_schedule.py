#!/usr/bin/env python
"""Print the DR-LoRA growth plan of a run before launching it.

Shows what the flags imply (t_warmup, t_end, T_events, quota, cap, event steps, when the budget
is reached, the planned rank trajectory) so a too-short run or a cap that cannot spend the quota
is caught on a laptop, not after hours on a cluster. Imports only the pure modules (config,
schedule): no torch, no Megatron.

Example (the paper's OLMoE setting, Table 10):
    python tools/plan_drlora_schedule.py --num-layers 16 --num-experts 64 --drlora-budget 64 \
        --drlora-rank-init 32 --drlora-rank-max 128 --train-iters 38000 --lr-warmup-iters 1140
or straight from a run's flags file (the Megatron flags the plan does not use are ignored):
    python tools/plan_drlora_schedule.py @examples/recipes/olmoe_1b_7b_drlora.args
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.config import DRLoRAConfig, add_drlora_args, config_from_args  # noqa: E402
from megatron_drlora.schedule import (GrowthSchedule, budget_shortfall_message,  # noqa: E402
                                      warmup_iterations)


def _args_from_line(line: str) -> List[str]:
    """Flags files as the training entry reads them: several flags a line, '#' comments."""
    line = line.split("#", 1)[0].strip()
    return shlex.split(line) if line else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plan the DR-LoRA growth schedule (events, quota, cap, rank trajectory).",
        fromfile_prefix_chars="@", allow_abbrev=False)
    parser.convert_arg_line_to_args = _args_from_line
    model = parser.add_argument_group("model and run (Megatron flags)")
    model.add_argument("--num-layers", type=int, required=True, help="MoE layers adapted.")
    model.add_argument("--num-experts", type=int, required=True, help="Routed experts per layer.")
    model.add_argument("--train-iters", type=int, required=True, help="T_total.")
    warm = model.add_mutually_exclusive_group()
    warm.add_argument("--lr-warmup-iters", type=int, default=None,
                      help="LR warm-up iterations = t_warmup (Megatron default 0).")
    warm.add_argument("--lr-warmup-fraction", type=float, default=None,
                      help="LR warm-up as a fraction of --lr-decay-iters (paper: 0.03).")
    model.add_argument("--lr-decay-iters", type=int, default=None,
                       help="LR decay iterations (Megatron default: --train-iters); the "
                            "warm-up fraction applies to it.")
    out = parser.add_argument_group("output")
    out.add_argument("--at", type=int, nargs="+", metavar="STEP", default=None,
                     help="Steps of the trajectory table (default: 0, t_warmup, evenly spaced "
                          "points, t_end).")
    out.add_argument("--json", action="store_true", help="Print one JSON object instead.")
    add_drlora_args(parser)
    return parser


def default_steps(schedule: GrowthSchedule) -> List[int]:
    """0, t_warmup, five evenly spaced points and t_end, clipped to the run's real steps."""
    last = schedule.train_iters - 1
    end = min(max(schedule.t_end, 0), last) if schedule.grows else last
    steps = {0, min(schedule.t_warmup, last), end}
    steps.update(end * k // 6 for k in range(1, 6))
    return sorted(steps)


def make_plan(config: DRLoRAConfig, schedule: GrowthSchedule, num_experts: int,
              steps: Sequence[int]) -> Dict[str, Any]:
    """Everything the tool reports, as plain JSON-ready values."""
    reached = schedule.target_reached_event()
    events = schedule.event_steps()
    return {
        "settings": {**config.to_dict(), "num_layers": schedule.num_layers,
                     "num_experts": num_experts, "train_iters": schedule.train_iters},
        "r_init": schedule.r_init, "r_target": schedule.r_target, "r_max": schedule.r_max,
        "modules_per_layer": list(schedule.modules_per_layer),
        "t_warmup": schedule.t_warmup, "t_end": schedule.t_end,
        "n_events": schedule.n_events, "num_event_steps": len(events),
        "quota": list(schedule.quotas), "cap": schedule.cap,
        "first_event_step": events[0] if events else None,
        "last_event_step": events[-1] if events else None,
        "event_steps": events,
        "initial_total_ranks": sum(schedule.layer_initial(l) for l in range(schedule.num_layers)),
        "target_total_ranks": sum(schedule.layer_target(l) for l in range(schedule.num_layers)),
        "target_reached_event": reached,
        "target_reached_step": schedule.event_step(reached) if reached else None,
        "budget_shortfall": budget_shortfall_message(schedule),
        "trajectory": [{"step": s, "events": schedule.events_through(s),
                        "total_active_ranks": schedule.planned_total_active(s),
                        "average_rank": round(schedule.planned_average_rank(s), 6)}
                       for s in steps],
    }


def format_plan(plan: Dict[str, Any]) -> str:
    st = plan["settings"]
    quotas = sorted(set(plan["quota"]))
    quota = (f"{quotas[0]}" if len(quotas) == 1 else
             "per layer " + ", ".join(str(q) for q in plan["quota"]))
    n_mod = plan["modules_per_layer"][0]
    if plan["target_reached_event"] is None:
        reached = "NOT reached by t_end (see the warning below)"
    elif plan["target_reached_event"] == 0:
        reached = "already at the start (no growth)"
    else:
        reached = (f"reached at event {plan['target_reached_event']} "
                   f"(step {plan['target_reached_step']})")
    if plan["num_event_steps"]:
        events = (f"T_events {plan['n_events']} (quota denominator); {plan['num_event_steps']} "
                  f"events, every {st['grow_interval']} steps: first {plan['first_event_step']}, "
                  f"last {plan['last_event_step']}")
    else:
        events = "none (this run does not grow)"
    lines = [
        "DR-LoRA growth schedule",
        f"  model       {st['num_layers']} layers x {st['num_experts']} experts x "
        f"{len(st['targets'])} modules ({','.join(st['targets'])}) = {n_mod} modules per layer",
        f"  ranks       r_init {plan['r_init']}, r_target {plan['r_target']} (budget), "
        f"r_max {plan['r_max']}",
        f"  settings    method {st['method']}, allocation {st['allocation']}, p_grow "
        f"{st['p_grow']}, T_grow {st['grow_interval']}, T_buffer {st['grow_buffer']}, "
        f"router {st['router']}",
        f"  steps       T_total {st['train_iters']}, t_warmup {plan['t_warmup']}, "
        f"t_end {plan['t_end']}",
        f"  events      {events}",
        f"  quota       {quota} module-ranks per layer per event (Eq. 11)",
        f"  cap         {plan['cap']} ranks per module per event (Eq. 12)",
        f"  target      {plan['target_total_ranks']:,} active ranks in all, {reached}",
    ]
    if plan["budget_shortfall"]:
        lines.append(f"  warning     {plan['budget_shortfall']}")
    lines += [
        "",
        f"  {'step':>8}  {'events':>6}  {'total active ranks':>18}  {'average rank':>12}",
    ]
    for row in plan["trajectory"]:
        lines.append(f"  {row['step']:>8}  {row['events']:>6}  {row['total_active_ranks']:>18,}"
                     f"  {row['average_rank']:>12.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("@") for a in argv):  # a run's flags file: skip what the plan ignores
        args, unused = parser.parse_known_args(argv)
        typos = [a for a in unused if a.startswith("--drlora")]
        if typos:
            parser.error(f"unrecognized arguments: {' '.join(typos)}")
    else:
        args = parser.parse_args(argv)
    try:
        for flag, value in (("--num-layers", args.num_layers), ("--num-experts", args.num_experts),
                            ("--train-iters", args.train_iters)):
            if value <= 0:
                raise ValueError(f"{flag} must be a positive integer, got {value}")
        config = config_from_args(args)
        warmup = warmup_iterations(args.train_iters, args.lr_warmup_iters,
                                   args.lr_warmup_fraction, args.lr_decay_iters)
        modules = [len(config.targets) * args.num_experts] * args.num_layers
        schedule = GrowthSchedule.build(config, args.train_iters, warmup, modules)
        steps = args.at if args.at is not None else default_steps(schedule)
        bad = [s for s in steps if not 0 <= s < args.train_iters]
        if bad:
            raise ValueError(f"--at steps must be iteration indices in [0, --train-iters="
                             f"{args.train_iters}), got {bad}")
    except ValueError as e:  # DRLoRAConfigError is a ValueError too
        # argparse's convention (exit 2), without the page-long usage of all --drlora-* flags.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(config, schedule, args.num_experts, steps)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
