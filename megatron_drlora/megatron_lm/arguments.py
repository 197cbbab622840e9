"""The flags DR-LoRA adds to Megatron-LM's parser, and their checks against Megatron's args.

`add_arguments` is passed to Megatron-LM as `extra_args_provider`: every Megatron-LM flag keeps
its meaning, `--drlora-*` (and `--drlora-config FILE.yaml`) configure DR-LoRA, and arguments may
also come from files (`@BASE/model.args`, one or more flags per line, `#` comments), which is how
`tools/convert_hf_to_megatron.py` hands a converted model's shape to a run.

`validate` runs right after Megatron-LM parsed and validated its own args, before any process
group or model exists, so a bad combination fails in a second naming the flag.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from megatron_drlora.config import (
    DRLoRAConfig,
    DRLoRAConfigError,
    add_drlora_args,
    config_from_args,
    drlora_flags_given,
)


def _args_from_line(line: str) -> List[str]:
    line = line.split("#", 1)[0].strip()
    return shlex.split(line) if line else []


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`."""
    parser.fromfile_prefix_chars = "@"
    parser.convert_arg_line_to_args = _args_from_line
    add_drlora_args(parser)
    group = parser.add_argument_group("DR-LoRA run")
    group.add_argument("--drlora-log-dir", default=None,
                       help="Where drlora_ranks.jsonl and the rank pictures go "
                            "(default: --save, else ./runs).")
    group.add_argument("--qk-layernorm-scope", default="head", choices=["head", "projection"],
                       help="With --qk-layernorm: Megatron's per-head q/k norm (head; Qwen3-MoE) "
                            "or one norm over the whole q/k projection (projection; OLMoE).")
    group.add_argument("--init-from-identity", action="store_true",
                       help="Initialise the base from (--seed, tensor name) so every parallel "
                            "layout starts identical (demo and test bases).")
    from megatron_drlora.model_features import add_arguments as add_model_feature_arguments

    add_model_feature_arguments(parser)
    return parser


def parse_megatron_args(argv) -> argparse.Namespace:
    """Megatron-LM's parser plus these flags over `argv` (e.g. a converter's `@model.args`),
    without Megatron's validation or global state: for tools that build a model from the flags
    a run would use."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    return parser.parse_args(list(argv))


class DRLoRAArgumentError(ValueError):
    """A flag combination DR-LoRA cannot run; the message names the flag and the fix."""


def validate(args: argparse.Namespace) -> Optional[DRLoRAConfig]:
    """The DR-LoRA config of this run (None: no --drlora-* flag, the whole model trains).

    Raises DRLoRAArgumentError / DRLoRAConfigError naming the flag."""
    if args.qk_layernorm_scope == "projection" and not args.qk_layernorm:
        raise DRLoRAArgumentError("--qk-layernorm-scope projection needs --qk-layernorm")
    if not drlora_flags_given(args):
        return None
    config = config_from_args(args)
    if not args.num_experts:
        raise DRLoRAArgumentError("--drlora-* flags need an MoE model: give --num-experts "
                                  "(DR-LoRA adapts routed experts)")
    if config.rank_map is not None and len(config.rank_map[0]) != args.num_experts:
        raise DRLoRAArgumentError(f"--drlora-rank-map lists {len(config.rank_map[0])} experts "
                                  f"per layer but --num-experts is {args.num_experts}")
    _check_shared_experts(config, args)
    base = args.pretrained_checkpoint
    if not base:
        raise DRLoRAArgumentError("DR-LoRA fine-tunes a frozen base: give "
                                  "--pretrained-checkpoint BASE (a Megatron checkpoint "
                                  "directory, e.g. from tools/convert_hf_to_megatron.py)")
    if not os.path.isdir(base):
        raise DRLoRAArgumentError(f"--pretrained-checkpoint {base}: no such directory")
    if (args.save or args.load) and args.ckpt_format != "torch_dist":
        raise DRLoRAArgumentError(f"--ckpt-format {args.ckpt_format}: DR-LoRA checkpoints hold "
                                  "only what trains, through the model's sharded state dict; "
                                  "use --ckpt-format torch_dist")
    if getattr(args, "context_parallel_size", 1) > 1:
        raise DRLoRAArgumentError("--context-parallel-size > 1 is not supported with DR-LoRA "
                                  "yet (its routing statistics are untested under context "
                                  "parallelism); use 1")
    for flag in ("use_torch_fsdp2", "use_megatron_fsdp"):
        if getattr(args, flag, False):
            raise DRLoRAArgumentError(f"--{flag.replace('_', '-')} is not supported with "
                                      "DR-LoRA; use Megatron's DDP (with "
                                      "--use-distributed-optimizer if you want sharding)")
    if getattr(args, "moe_use_upcycling", False):
        raise DRLoRAArgumentError("--moe-use-upcycling and DR-LoRA cannot be combined")
    _check_checkpoints(base, args.load, config)
    return config


def _check_shared_experts(config: DRLoRAConfig, args: argparse.Namespace) -> None:
    """--drlora-shared-experts uniform needs shared experts, and their plain (not overlapped)
    forward."""
    if config.shared_experts != "uniform":
        return
    if not getattr(args, "moe_shared_expert_intermediate_size", None):
        raise DRLoRAArgumentError("--drlora-shared-experts uniform: this model has no shared "
                                  "experts (--moe-shared-expert-intermediate-size is not set); "
                                  "use --drlora-shared-experts none")
    if getattr(args, "moe_shared_expert_overlap", False):
        raise DRLoRAArgumentError("--drlora-shared-experts uniform cannot be combined with "
                                  "--moe-shared-expert-overlap (the overlapped shared expert "
                                  "runs its linears outside their usual TP communication); "
                                  "drop --moe-shared-expert-overlap")


def _check_checkpoints(base: str, load: Optional[str],
                       config: Optional[DRLoRAConfig] = None) -> None:
    """The base must be a model checkpoint, and what --load holds (if anything) a DR-LoRA one:
    read from the checkpoints' small metadata before anything starts."""
    from megatron_drlora.checkpoint import (TRACKER, CheckpointError, drlora_state,
                                            read_common_state, resolve)

    try:
        resolve(base, "--pretrained-checkpoint")
        if load and os.path.isfile(os.path.join(load, TRACKER)):
            path = resolve(load, "--load")
            state = drlora_state(read_common_state(path))
            if state is None:
                raise CheckpointError(f"--load {load} holds a model without DR-LoRA state (a "
                                      f"base?): a base goes to --pretrained-checkpoint; --load "
                                      f"resumes a DR-LoRA run")
            saved = (state.get("config") or {}).get("shared_experts", "none")
            if config is not None and saved != config.shared_experts:
                raise CheckpointError(
                    f"--load {load} was trained with --drlora-shared-experts {saved}, this run "
                    f"asks for {config.shared_experts}: the adapters it holds differ; keep "
                    f"--drlora-shared-experts {saved} (or --load another directory)")
    except CheckpointError as err:
        raise DRLoRAArgumentError(str(err)) from None


def validate_or_exit(args: argparse.Namespace) -> Optional[DRLoRAConfig]:
    """validate(), turning a refusal into `error: ...` and exit status 2 like argparse."""
    try:
        return validate(args)
    except (DRLoRAArgumentError, DRLoRAConfigError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
