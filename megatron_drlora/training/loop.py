"""pretrain(): the training run behind examples/pretrain_gpt.py.

Built from megatron-core's own parts (DDP, Megatron optimizer incl. the distributed one, the
LR scheduler, the pipeline schedules, GPTDataset, dist_checkpointing); this module only wires
them together with DR-LoRA. Per iteration:

    forward/backward over all micro-batches (Megatron schedule; finalize_model_grads reduces)
    -> DR-LoRA: statistics, saliency, growth (controller.after_gradients)
    -> optimizer step -> LR scheduler -> logs, eval, checkpoints, preemption check
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_drlora import comm
from megatron_drlora.training.arguments import parse_args
from megatron_drlora.training.progress import (MetricsLog, RankLog, Scalars, iteration_line,
                                                log0)


def _model_args(args, vocab_size: int):
    from megatron_drlora.modeling import MoEModelArgs

    return MoEModelArgs(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_router_topk=args.moe_router_topk,
        moe_layer_freq=args.moe_layer_freq,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        qk_layernorm=args.qk_layernorm, qk_layernorm_scope=args.qk_layernorm_scope,
        add_qkv_bias=args.add_qkv_bias, kv_channels=args.kv_channels,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        swiglu=args.swiglu, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        vocab_size=vocab_size, seq_length=args.max_position_embeddings,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        bf16=args.bf16, init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout)


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Pad the vocabulary to a multiple of lcm(divisible_by, TP).

    Megatron-LM pads to divisible_by x TP, which gives a TP2 checkpoint a different embedding
    shape than a TP1 model. With the lcm the padded size is the same for every TP that divides
    `divisible_by`, so checkpoints move between tensor-parallel sizes."""
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab / multiple) * multiple)


class _MockData:
    """--mock-data: counting sequences (each next token = previous + a per-sample stride, mod
    vocab) from a random start, so a model can learn them and losses fall. Reproducible from
    (seed, sample index), so a resumed run sees exactly the same data."""

    def __init__(self, vocab: int, seq_length: int, micro_batch: int, seed: int,
                 dp_rank: int, dp_size: int, consumed: int):
        self.vocab, self.seq, self.mbs, self.seed = vocab, seq_length, micro_batch, seed
        self.dp_rank, self.dp_size, self.next_sample = dp_rank, dp_size, consumed

    def __iter__(self):
        return self

    def __next__(self):
        first = self.next_sample + self.dp_rank * self.mbs
        rows = []
        for i in range(first, first + self.mbs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            start = int(torch.randint(0, self.vocab, (1,), generator=g))
            stride = int(torch.randint(1, 3, (1,), generator=g))
            rows.append((start + stride * torch.arange(self.seq + 1)) % self.vocab)
        self.next_sample += self.mbs * self.dp_size
        data = torch.stack(rows)
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        position_ids = torch.arange(self.seq).unsqueeze(0).expand(self.mbs, -1)
        return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens,
                                                                              dtype=torch.float),
                "attention_mask": None, "position_ids": position_ids}


def _data_iterators(args, tokenizer, global_batch: int, consumed: int, dp_rank: int,
                    dp_size: int, vocab: int):
    """Train iterator of micro-batch dicts (resuming at `consumed` samples) and a factory of
    validation iterators: every evaluation reads the same validation batches, so the losses
    before and after training compare like with like."""
    if args.mock_data:
        train = _MockData(vocab, args.seq_length, args.micro_batch_size, args.seed, dp_rank,
                          dp_size, consumed)
        valid = (lambda: _MockData(vocab, args.seq_length, args.micro_batch_size, args.seed + 1,
                                   dp_rank, dp_size, 0)) if args.eval_iters else None
        return train, valid
    from megatron_drlora.data.dataset import (build_data_iterator, build_gpt_datasets,
                                              train_valid_test_num_samples)

    samples = train_valid_test_num_samples(args.train_iters, global_batch,
                                           args.eval_interval or 0, args.eval_iters)
    train_ds, valid_ds, _ = build_gpt_datasets(
        args.data_path, args.split, args.seq_length, args.seed, tokenizer, samples,
        create_attention_mask=False)
    train = build_data_iterator(train_ds, args.micro_batch_size, dp_rank, dp_size, consumed,
                                num_workers=args.num_workers)
    valid = None
    if valid_ds is not None and args.eval_iters:
        valid = lambda: build_data_iterator(valid_ds, args.micro_batch_size, dp_rank,  # noqa
                                            dp_size, 0, cyclic=True)
    return train, valid


def _next_batch(iterator):
    batch = next(iterator)
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def _forward_step(data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = _next_batch(data_iterator)
    device = next(model.parameters()).device
    if device.type != "cpu":
        tokens, labels, loss_mask, position_ids = (t.to(device) for t in
                                                   (tokens, labels, loss_mask, position_ids))
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, functools.partial(_loss_func, loss_mask)


def _loss_func(loss_mask, output_tensor):
    """Mean per-token loss over the tokens the mask keeps (response tokens for instructions)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1).to(losses.device)
    loss = (losses * mask).sum() / mask.sum().clamp_min(1.0)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _step_loss(losses: List[Dict]) -> torch.Tensor:
    if not losses:
        return torch.zeros(2, dtype=torch.float64)
    values = torch.stack([d["lm loss"].double().cpu() for d in losses])
    return torch.stack([values.mean(), torch.ones((), dtype=torch.float64)])


def pretrain(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run training; returns a summary (losses, rank maps, paths) for tests and tools."""
    args = parse_args(argv)
    from megatron_drlora.launch.preemption import PreemptionHandler, requeue_hint
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    handler = PreemptionHandler().install() if args.exit_signal_handler else None
    initialize_megatron_parallel(ParallelSizes(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size), seed=args.seed)
    try:
        return _run(args, handler)
    finally:
        if handler is not None:
            handler.uninstall()


def _run(args, handler) -> Dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_drlora import checkpoint as ckpt
    from megatron_drlora.compat.megatron import build_optimizer
    from megatron_drlora.controller import DRLoRAController
    from megatron_drlora.inject import apply_drlora
    from megatron_drlora.launch.preemption import requeue_hint
    from megatron_drlora.modeling import build_gpt_moe, init_from_global_identity

    world = dist.get_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp):
        raise SystemExit(f"--global-batch-size {global_batch} is not a multiple of "
                         f"--micro-batch-size x data-parallel size = {args.micro_batch_size} x {dp}")
    num_micro = global_batch // (args.micro_batch_size * dp)
    log0(f"> world size {world}: TP {args.tensor_model_parallel_size} PP "
         f"{args.pipeline_model_parallel_size} EP {args.expert_model_parallel_size} ETP "
         f"{ps.get_expert_tensor_parallel_world_size()} DP {dp}; {num_micro} micro-batches of "
         f"{args.micro_batch_size} per step; global batch {global_batch}")
    log0(f"> {requeue_hint()}")

    tokenizer = None
    if args.tokenizer_model:
        from megatron_drlora.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_model)
    vocab = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    padded_vocab = padded_vocab_size(vocab, args.tensor_model_parallel_size,
                                     args.make_vocab_size_divisible_by)

    chunks = build_gpt_moe(_model_args(args, padded_vocab))
    if args.init_from_identity:
        init_from_global_identity(chunks, seed=args.seed, std=args.init_method_std)
    if args.pretrained_checkpoint:
        ckpt.load_base_checkpoint(args.pretrained_checkpoint, chunks)
        log0(f"> loaded the base from {args.pretrained_checkpoint}")
    handle = None
    if args.drlora is not None:
        log0(f"> {args.drlora.summary()}")
        handle = apply_drlora(chunks, args.drlora, log=lambda s: log0(f"> {s}"))
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c)
             for c in chunks]
    optimizer = build_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=False,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer), model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * global_batch,
        lr_decay_steps=args.lr_decay_iters * global_batch, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * global_batch, wd_incr_style="constant")
    controller = None
    if handle is not None:
        controller = DRLoRAController(handle, args.train_iters, args.lr_warmup_iters,
                                      ddp_models=model)
        sched = controller.schedule
        log0(f"> DR-LoRA schedule: {sched.num_event_steps} growth events "
             f"(first {sched.event_steps()[0] if sched.grows else '-'}, every "
             f"{sched.grow_interval}), quota/layer {sched.quotas[0] if sched.quotas else 0}, "
             f"cap {sched.cap}, router trainable from iteration "
             f"{sched.t_warmup if args.drlora.router == 'warmup_frozen' else args.drlora.router}")

    iteration, consumed = 0, 0
    if args.load and os.path.isdir(args.load) and ckpt.latest_iteration(args.load) is not None:
        loaded = ckpt.load_checkpoint(args.load, chunks, handle, optimizer,
                                      load_optimizer=not args.no_load_optim)
        iteration = int(loaded["iteration"])
        consumed = int(loaded.get("consumed_samples", iteration * global_batch))
        if not args.no_load_optim and loaded.get("scheduler"):
            scheduler.load_state_dict(loaded["scheduler"])
        if controller is not None and loaded.get("drlora"):
            controller.load_state_dict(loaded["drlora"])
        if not args.no_load_rng:
            ckpt.restore_rng_state(loaded.get("rng_file"))
        log0(f"> resumed from {args.load} at iteration {iteration} ({consumed} samples)")

    train_iter, valid_iter = _data_iterators(args, tokenizer, global_batch, consumed, dp_rank,
                                             dp, vocab)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    forward_backward = get_forward_backward_func()

    log_dir = args.drlora_log_dir or args.save or "runs"
    rank_log = None
    if controller is not None:
        rank_log = RankLog(log_dir, handle.projections, handle.moe_layer_numbers)
        if iteration == 0:
            rank_log.write(0, controller.rank_map, kind="initial")
    scalars = Scalars(args.tensorboard_dir)
    metrics = MetricsLog(log_dir, append=iteration > 0)
    history: List[Dict] = []
    window_start, window_iters = time.perf_counter(), 0

    def run_batches(iterator, forward_only: bool, n_micro: int):
        iters = [iterator] * len(model) if len(model) > 1 else iterator
        return forward_backward(
            forward_step_func=_forward_step, data_iterator=iters,
            model=model if len(model) > 1 else model[0], num_microbatches=n_micro,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            forward_only=forward_only)

    def save(it: int) -> None:
        extra = {"consumed_samples": consumed, "scheduler": scheduler.state_dict(),
                 "drlora": controller.state_dict() if controller is not None else None}
        path = ckpt.save_checkpoint(args.save, it, chunks, handle, optimizer, extra)
        log0(f"> saved checkpoint at iteration {it} to {path}")

    initial_valid = None
    if valid_iter is not None and args.eval_iters and iteration == 0:
        initial_valid = evaluate(model, valid_iter, run_batches, args.eval_iters, num_micro)
        log0(f" validation loss at iteration 0 (before training): {initial_valid:.6E}")
    stop_reason = None
    while iteration < args.train_iters:
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        step_start = time.perf_counter()
        losses = run_batches(train_iter, False, num_micro)
        report = controller.after_gradients(iteration) if controller is not None else None
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=global_batch)
        consumed += global_batch
        # One small all-reduce per step: the loss for the log (from the last pipeline stage)
        # and the preemption flag (any rank signalled -> every rank stops here).
        local = _step_loss(losses) if ps.is_pipeline_last_stage() and \
            ps.get_tensor_model_parallel_rank() == 0 else torch.zeros(2, dtype=torch.float64)
        flag = float(handler.local_flag()) if handler is not None else 0.0
        loss_sum, loss_count, stop = comm.reduce_step_statistics(
            local[:1], local[1:], torch.tensor([flag], dtype=torch.float64))
        loss = float(loss_sum.item() / max(loss_count.item(), 1.0))
        iteration += 1
        window_iters += 1
        record = {"iteration": iteration, "loss": loss, "grad_norm": grad_norm,
                  "lr": scheduler.get_lr(optimizer.param_groups[0]),
                  "seconds": time.perf_counter() - step_start}
        if report is not None:
            record["drlora_seconds"] = report.seconds
            if report.event:
                log0(report.log_line())
                rank_log.write(report.step, controller.rank_map,
                               saliency=controller.events[-1]["saliency"])
                record["event_step"] = report.step
        history.append(record)
        metrics.write(record)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            elapsed = time.perf_counter() - window_start
            ms = 1000.0 * elapsed / window_iters
            ranks = ""
            if controller is not None:
                rm = controller.rank_map.double()
                ranks = (f"ranks avg {rm.mean():.2f} min {int(rm.min())} max {int(rm.max())} |")
            log0(iteration_line(iteration, args.train_iters, consumed, ms, record["lr"],
                                global_batch, loss, grad_norm,
                                global_batch * args.seq_length * window_iters / elapsed, ranks))
            scalars.add({"lm loss": loss, "grad norm": grad_norm, "learning rate": record["lr"],
                         "drlora/average rank": float(controller.rank_map.double().mean())
                         if controller is not None else None}, iteration)
            window_start, window_iters = time.perf_counter(), 0
        if args.eval_interval and valid_iter is not None and args.eval_iters and \
                iteration % args.eval_interval == 0:
            record["valid_loss"] = evaluate(model, valid_iter, run_batches, args.eval_iters,
                                            num_micro)
            log0(f" validation loss at iteration {iteration}: {record['valid_loss']:.6E}")
            scalars.add({"validation loss": record["valid_loss"]}, iteration)
        if stop.item() > 0:
            stop_reason = "signal"
        elif args.exit_interval and iteration % args.exit_interval == 0:
            stop_reason = "exit-interval"
        if args.save and (stop_reason or iteration == args.train_iters or
                          (args.save_interval and iteration % args.save_interval == 0)):
            save(iteration)
        if stop_reason:
            log0(f"> stopping at iteration {iteration} ({stop_reason}); resume with --load")
            break
    scalars.close()
    summary = {"history": history, "iteration": iteration, "stopped": stop_reason,
               "log_dir": log_dir, "initial_valid_loss": initial_valid}
    if controller is not None:
        summary["rank_map"] = controller.rank_map.clone()
        summary["rank_log"] = rank_log.path
        summary["events"] = [r["event_step"] for r in history if "event_step" in r]
    if valid_iter is not None and args.eval_iters:
        last = history[-1] if history else {}
        summary["final_valid_loss"] = last["valid_loss"] if "valid_loss" in last else \
            evaluate(model, valid_iter, run_batches, args.eval_iters, num_micro)
        log0(f" validation loss at iteration {iteration} (end): "
             f"{summary['final_valid_loss']:.6E}")
    _write_summary(summary, args)
    return summary


def _write_summary(summary: Dict, args) -> None:
    """run_summary.json on rank 0: what a demo, a benchmark or a person wants to know last."""
    import json

    if comm.world_rank() != 0:
        return
    history = summary["history"]
    out = {"iteration": summary["iteration"], "stopped": summary["stopped"],
           "initial_valid_loss": summary.get("initial_valid_loss"),
           "final_valid_loss": summary.get("final_valid_loss"),
           "first_train_loss": history[0]["loss"] if history else None,
           "last_train_loss": history[-1]["loss"] if history else None,
           "seconds_per_iteration": (sum(h["seconds"] for h in history) / len(history))
           if history else None,
           "checkpoint": args.save}
    if "rank_map" in summary:
        rm = summary["rank_map"]
        out["rank_log"] = summary["rank_log"]
        out["events"] = summary["events"]
        out["final_ranks_per_layer"] = [
            {"moe_layer": l, "mean": float(rm[l].double().mean()), "min": int(rm[l].min()),
             "max": int(rm[l].max())} for l in range(rm.shape[0])]
    os.makedirs(summary["log_dir"], exist_ok=True)
    with open(os.path.join(summary["log_dir"], "run_summary.json"), "w") as fh:
        json.dump(out, fh, indent=2)


def evaluate(model, valid_iters, run_batches, eval_iters: int, num_micro: int) -> float:
    """Mean validation loss over the first eval_iters validation batches (forward only)."""
    from megatron.core import parallel_state as ps

    valid_iter = valid_iters()
    for m in model:
        m.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(eval_iters):
            losses = run_batches(valid_iter, True, num_micro)
            if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
                total += _step_loss(losses)
    for m in model:
        m.train()
    loss_sum, count = comm.reduce_step_statistics(total[:1], total[1:])
    return float(loss_sum.item() / max(count.item(), 1.0))


def main(argv: Optional[Sequence[str]] = None) -> int:
    summary = pretrain(argv)
    from megatron_drlora.parallel_setup import shutdown

    shutdown()
    return 0 if summary.get("stopped") in (None, "signal", "exit-interval") else 1
