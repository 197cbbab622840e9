"""Megatron-LM-style command-line flags for examples/pretrain_gpt.py, plus every --drlora-*.

Everything is validated here, before any process group exists, so a typo or an impossible
combination fails in a second with a message naming the flag, not after minutes of startup.
Flags may also come from files: `@file.args` (one or more flags per line, `#` comments).
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import List, Optional, Sequence

from megatron_drlora.config import add_drlora_args, config_from_args, drlora_flags_given


class ArgumentError(ValueError):
    """A bad flag value; the message names the flag and the fix."""


class _Parser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, line: str) -> List[str]:
        line = line.split("#", 1)[0].strip()
        return shlex.split(line) if line else []


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Megatron-Core GPT MoE training with DR-LoRA (dynamic-rank LoRA)",
                fromfile_prefix_chars="@", allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, required=True)
    m.add_argument("--hidden-size", type=int, required=True)
    m.add_argument("--ffn-hidden-size", type=int, default=None)
    m.add_argument("--num-attention-heads", type=int, required=True)
    m.add_argument("--num-query-groups", type=int, default=None)
    m.add_argument("--group-query-attention", action="store_true")
    m.add_argument("--num-experts", type=int, default=None)
    m.add_argument("--moe-router-topk", type=int, default=2)
    m.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    m.add_argument("--moe-layer-freq", type=int, default=1)
    m.add_argument("--moe-grouped-gemm", action="store_true")
    m.add_argument("--moe-token-dispatcher-type", default="alltoall",
                   choices=["alltoall", "allgather", "flex"])
    m.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    m.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "none", "sinkhorn"])
    m.add_argument("--moe-router-pre-softmax", action="store_true")
    m.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"])
    m.add_argument("--qk-layernorm", action="store_true")
    m.add_argument("--qk-layernorm-scope", default="head", choices=["head", "projection"],
                   help="head: Megatron's per-head q/k norm (Qwen3-MoE); projection: one norm "
                        "over the whole q/k projection (OLMoE).")
    m.add_argument("--add-qkv-bias", action="store_true",
                   help="Bias on the q/k/v projections only (Qwen2-MoE).")
    m.add_argument("--kv-channels", type=int, default=None,
                   help="Attention head size (default hidden size / heads).")
    m.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    m.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="Sigmoid gate on the shared expert's output (Qwen2-MoE).")
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    m.add_argument("--norm-epsilon", type=float, default=1e-5)
    m.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    m.add_argument("--rotary-base", type=int, default=10000)
    m.add_argument("--max-position-embeddings", type=int, default=None)
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--disable-bias-linear", action="store_true",
                   help="Accepted for Megatron compatibility; MoE models here never use biases.")
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--hidden-dropout", type=float, default=0.0)
    m.add_argument("--attention-dropout", type=float, default=0.0)
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of lcm(this, TP).")
    m.add_argument("--vocab-size", type=int, default=None,
                   help="Only without a tokenizer (synthetic data); else from the tokenizer.")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--overlap-grad-reduce", action="store_true")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, required=True)
    t.add_argument("--global-batch-size", type=int, default=None)
    t.add_argument("--train-iters", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    t.add_argument("--lr-decay-iters", type=int, default=None)
    t.add_argument("--lr-warmup-iters", type=int, default=None)
    t.add_argument("--lr-warmup-fraction", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    t.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    t.add_argument("--recompute-num-layers", type=int, default=None)
    t.add_argument("--init-from-identity", action="store_true",
                   help="Initialise the base from (seed, tensor name) so every parallel layout "
                        "starts identical (used to build demo/test bases).")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None)
    d.add_argument("--split", default="98,2,0")
    d.add_argument("--seq-length", type=int, required=True)
    d.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "NullTokenizer"])
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--mock-data", action="store_true",
                   help="Synthetic counting sequences instead of --data-path (smoke tests, "
                        "benchmarks).")
    d.add_argument("--num-workers", type=int, default=0)

    c = p.add_argument_group("checkpoints")
    c.add_argument("--save", default=None)
    c.add_argument("--load", default=None)
    c.add_argument("--save-interval", type=int, default=None)
    c.add_argument("--pretrained-checkpoint", default=None,
                   help="Frozen base model checkpoint (dist_checkpointing) for fine-tuning.")
    c.add_argument("--no-load-optim", action="store_true")
    c.add_argument("--no-load-rng", action="store_true")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="Save and stop after this many iterations (like Megatron).")

    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=10)
    lg.add_argument("--eval-interval", type=int, default=None)
    lg.add_argument("--eval-iters", type=int, default=0)
    lg.add_argument("--tensorboard-dir", default=None)
    lg.add_argument("--drlora-log-dir", default=None,
                    help="Where metrics, the rank-map JSONL and plots go (default: --save, else runs/)")
    lg.add_argument("--exit-signal-handler", action="store_true", default=True,
                    help="Save at the next step boundary on SIGTERM/SIGUSR1 and exit 0.")
    add_drlora_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ArgumentError as e:
        parser.error(str(e))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Check values and combinations; fill derived defaults (Megatron semantics)."""
    def positive(flag, value):
        if value is None or value <= 0:
            raise ArgumentError(f"{flag} must be a positive integer, got {value}")

    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--micro-batch-size",
                 "--train-iters", "--seq-length", "--tensor-model-parallel-size",
                 "--pipeline-model-parallel-size", "--expert-model-parallel-size",
                 "--log-interval"):
        positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                            f"--num-attention-heads {args.num_attention_heads}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.num_attention_heads % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible "
                            f"by --tensor-model-parallel-size {tp}")
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = args.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage must divide the layers "
                                f"per pipeline stage ({per_stage})")
        args.virtual_pipeline_model_parallel_size = \
            per_stage // args.num_layers_per_virtual_pipeline_stage
    if tp > 1:
        args.sequence_parallel = True  # Megatron's MoE layer requires it with TP > 1
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--seq-length {args.seq_length} must be divisible by "
                            f"--tensor-model-parallel-size {tp} with sequence parallelism")
    if args.num_experts is not None:
        positive("--num-experts", args.num_experts)
        if args.num_experts % args.expert_model_parallel_size:
            raise ArgumentError(f"--num-experts {args.num_experts} is not divisible by "
                                f"--expert-model-parallel-size {args.expert_model_parallel_size}")
        if args.moe_router_topk > args.num_experts:
            raise ArgumentError(f"--moe-router-topk {args.moe_router_topk} exceeds "
                                f"--num-experts {args.num_experts}")
    elif args.expert_model_parallel_size > 1:
        raise ArgumentError("--expert-model-parallel-size > 1 needs --num-experts")
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        raise ArgumentError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_fraction is not None:
        if not 0 <= args.lr_warmup_fraction < 1:
            raise ArgumentError("--lr-warmup-fraction must be in [0, 1)")
        args.lr_warmup_iters = int(round(args.lr_warmup_fraction * args.train_iters))
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = 0
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ArgumentError(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr}) and --lr > 0")
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                            f"--micro-batch-size {args.micro_batch_size}")
    if not args.mock_data:
        if not args.data_path:
            raise ArgumentError("--data-path is required (or --mock-data for random tokens)")
        if args.tokenizer_type == "SentencePieceTokenizer":
            if not args.tokenizer_model:
                raise ArgumentError("--tokenizer-model is required with "
                                    "--tokenizer-type SentencePieceTokenizer")
            if not os.path.isfile(args.tokenizer_model):
                raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    elif args.vocab_size is None and args.tokenizer_model is None:
        raise ArgumentError("--mock-data needs --vocab-size (or --tokenizer-model)")
    for flag in ("pretrained_checkpoint", "load"):
        path = getattr(args, flag)
        if path and flag == "pretrained_checkpoint" and not os.path.isdir(path):
            raise ArgumentError(f"--pretrained-checkpoint {path}: no such directory")
    if args.save_interval is not None and args.save_interval <= 0:
        raise ArgumentError("--save-interval must be positive")
    if args.save_interval and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.eval_interval is not None and args.eval_interval <= 0:
        raise ArgumentError("--eval-interval must be positive")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_granularity == "full" and args.recompute_num_layers is None:
        args.recompute_num_layers = 1
    # DR-LoRA: validated through the dataclass (unknown values already refused by argparse).
    args.drlora = None
    if drlora_flags_given(args):
        if args.num_experts is None:
            raise ArgumentError("--drlora-* settings need an MoE model (--num-experts)")
        try:
            args.drlora = config_from_args(args)
        except ValueError as e:
            raise ArgumentError(str(e)) from e
