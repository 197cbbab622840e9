"""Checkpoint scenarios under any layout, driven by tests/test_checkpoint.py.

  logits OUT --load CKPT [layout flags]   load adapters saved at another layout; save logits
  crash CKPT WHERE [layout flags]         save iteration 1, then die (SIGKILL) during the save
                                          of iteration 2: WHERE = inside | before-rename
The model flags are tests/train_flags.py's, parsed by the real entry point's parser.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist


def build(extra):
    from megatron_drlora.inject import apply_drlora
    from megatron_drlora.modeling import build_gpt_moe, init_from_global_identity
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel
    from megatron_drlora.training.arguments import parse_args
    from megatron_drlora.training.loop import _model_args, padded_vocab_size
    from tests.train_flags import DRLORA, TINY_MODEL

    args = parse_args(TINY_MODEL + DRLORA + ["--train-iters", "12"] + extra)
    initialize_megatron_parallel(ParallelSizes(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size), seed=args.seed)
    vocab = padded_vocab_size(args.vocab_size, args.tensor_model_parallel_size)
    chunks = build_gpt_moe(_model_args(args, vocab))
    init_from_global_identity(chunks, seed=args.seed, std=args.init_method_std)
    return args, chunks, apply_drlora(chunks, args.drlora, log=lambda s: None)


def logits(out, extra):
    from megatron.core import parallel_state as ps

    from megatron_drlora.checkpoint import load_adapters

    args, chunks, handle = build(extra)
    loaded = load_adapters(args.load, chunks, handle)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, args.vocab_size, (4, args.seq_length), generator=g)
    pos = torch.arange(args.seq_length).expand(4, -1)
    model = chunks[0]
    model.eval()
    with torch.no_grad():
        out_logits = model(tokens, pos, None)
    if ps.get_tensor_model_parallel_world_size() > 1:
        parts = [torch.empty_like(out_logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out_logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        out_logits = torch.cat(parts, dim=-1)
    if dist.get_rank() == 0:
        torch.save({"logits": out_logits[..., :args.vocab_size],
                    "rank_map": torch.as_tensor(loaded["drlora"]["rank_map"])}, out)


def crash(root, where, extra):
    from megatron.core import dist_checkpointing

    from megatron_drlora import checkpoint as ckpt

    args, chunks, handle = build(extra)
    ckpt.save_checkpoint(root, 1, chunks, handle, extra={"drlora": {"rank_map": handle.initial_rank_map()}})
    with torch.no_grad():
        for p in handle.lora_parameters():
            p.add_(1.0)  # iteration 2 differs, so loading it by mistake would show
    if where == "inside":
        original = dist_checkpointing.save

        def dying_save(state, path, *a, **k):
            original(state, path, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # the data is half way to its final place

        dist_checkpointing.save = dying_save
    else:
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_checkpoint(root, 2, chunks, handle, extra={"drlora": {"rank_map": handle.initial_rank_map()}})
    raise SystemExit("the save should have been killed")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "logits":
        logits(sys.argv[2], sys.argv[3:])
    else:
        crash(sys.argv[2], sys.argv[3], sys.argv[4:])
    dist.barrier()
    dist.destroy_process_group()
