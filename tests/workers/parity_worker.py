"""One forward+backward (+ DR-LoRA statistics, a growth decision and an optimizer step) of the
same global tiny MoE under a given parallel layout; rank 0 saves everything gathered to global
expert indices, for comparison with the single-process run of the same script.

Usage: torchrun --nproc_per_node N parity_worker.py OUT [--tp 2] [--ep 2] [--etp 1] [--pp 2]
       [--vpp 2] [--dispatcher alltoall|allgather] [--perturb-rank R] [--dist-opt] [--overlap]
       [--micro 2]

DR-LoRA's collect() runs inside Megatron's finalize_model_grads_func, as in Megatron-LM's loop;
every all-reduce DR-LoRA issues on the expert-TP group during the step is counted.
"""

import argparse
import faulthandler
import sys

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(200, exit=True)


# Ranks within the layer budget (4 experts x 2 x 8 = 64; at EP2 within each rank's pool of
# 64 - 2 x 2 x 4 = 48), at least r_init, heterogeneous: what --rank-pool can hold.
FIT_MAP = [[[4, 16], [4, 5], [12, 9], [4, 6]], [[4, 4], [16, 12], [5, 4], [7, 4]]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--dispatcher", default="alltoall")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--perturb-rank", type=int, default=-1)
    p.add_argument("--saliency", default="full")
    p.add_argument("--allocation", default="layer")
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--overlap", action="store_true", help="overlap_grad_reduce")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size")
    p.add_argument("--rank-pool", action="store_true", help="--drlora-rank-pool (implies "
                   "--fit-budget: the pool holds only the budget's ranks)")
    p.add_argument("--fit-budget", action="store_true",
                   help="FIT_MAP (within the layer budget) instead of grown_rank_map")
    args = p.parse_args()
    args.fit_budget = args.fit_budget or args.rank_pool

    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    initialize_megatron_parallel(ParallelSizes(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp))
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_drlora import DRLoRAConfig, comm
    from megatron_drlora.controller import DRLoRAController
    from tests.tiny import batch, build, grown_rank_map, randomize_adapters, tiny_args

    margs = tiny_args(num_layers=args.layers, tensor_model_parallel_size=args.tp,
                      pipeline_model_parallel_size=args.pp,
                      virtual_pipeline_model_parallel_size=args.vpp,
                      expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp,
                      moe_token_dispatcher_type=args.dispatcher)
    cfg = DRLoRAConfig(budget=8, grow_interval=1, grow_buffer=0, warmup_iters=0,
                       saliency=args.saliency, allocation=args.allocation,
                       rank_pool=args.rank_pool)
    chunks, handle = build(margs, cfg)
    if args.fit_budget:  # ranks first: a pool holds values of active ranks only
        handle.set_rank_map(torch.tensor(FIT_MAP))
        randomize_adapters(handle)
    else:
        randomize_adapters(handle)
        handle.set_rank_map(grown_rank_map(handle))
    config = chunks[0].config
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                            overlap_grad_reduce=args.overlap,
                                            use_distributed_optimizer=args.dist_opt)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=c)
             for c in chunks]
    if args.overlap:  # as megatron.training does: reduce once, after the last micro-batch
        config.no_sync_func = model[0].no_sync if len(model) == 1 else [m.no_sync for m in model]

    def finalize_then_collect(*a, **k):  # megatron_lm/run.py's finalize_model_grads_func
        finalize_model_grads(*a, **k)
        controller.collect(0)

    config.finalize_model_grads_func = finalize_then_collect
    start_map = torch.tensor(FIT_MAP) if args.fit_budget else grown_rank_map(handle)
    controller = DRLoRAController(handle, train_iters=10, warmup_iters=0, ddp_models=model,
                                  rank_map=start_map)

    # The same global batch everywhere; each DP rank takes its contiguous slice.
    global_batch, micro = 8, args.micro
    tokens, pos, labels = batch(margs, batch_size=global_batch, seed=5)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_dp = global_batch // dp
    sl = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    tokens, pos, labels = tokens[sl], pos[sl], labels[sl]
    n_micro = per_dp // micro
    micro_batches = [(tokens[i * micro:(i + 1) * micro], pos[i * micro:(i + 1) * micro],
                      labels[i * micro:(i + 1) * micro]) for i in range(n_micro)]
    captured = []

    def forward_step(data_iterator, chunk):
        tk, ps_, lb = next(data_iterator)
        logits = chunk(tk, ps_, None)

        def loss_func(output):
            unwrapped = chunk.module
            # cloned first: with one sequence per micro-batch the transpose is already
            # contiguous and Megatron's cross entropy shifts the logits in place
            logits_copy = output.detach().clone()
            loss_tok = unwrapped.compute_language_model_loss(lb, output.transpose(0, 1)
                                                             .contiguous())
            captured.append((logits_copy, loss_tok.detach().clone()))
            loss = loss_tok.float().mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    # Single process: capture every experts call (input, routing probs, output gradient) for
    # the independent plain-PyTorch gradient reference below.
    expert_calls = {l.moe_index: [] for l in handle.layers}
    forward_map = controller.rank_map.clone()
    if dist.get_world_size() == 1:
        for layer in handle.layers:
            def capture(module, inputs, output, calls=expert_calls[layer.moe_index]):
                x, counts, probs = inputs
                record = {"x": x.detach().clone(), "counts": [int(c) for c in counts],
                          "probs": probs.detach().clone()}
                calls.append(record)
                output[0].register_hook(lambda g: record.__setitem__("grad", g.detach().clone()))

            layer.experts.register_forward_hook(capture)

    results = {}
    for m in model:
        m.zero_grad_buffer()
    data = iter(micro_batches)
    fb = get_forward_backward_func()
    with CountExpertTPReductions() as etp_reductions:
        fb(forward_step_func=forward_step,
           data_iterator=[iter(micro_batches) for _ in model] if args.vpp else data,
           model=model if args.vpp else model[0], num_microbatches=n_micro,
           seq_length=margs.seq_length, micro_batch_size=micro, forward_only=False)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (etp_reductions.count, len(handle.layers), n_micro,
                                    ps.get_expert_tensor_parallel_world_size()))
    results["etp_reductions"] = counts

    # --- gather logits and per-token loss (vocab over TP, batch over DP, last PP stage) ---
    last_stage = ps.is_pipeline_last_stage()
    if last_stage and captured:
        logits = torch.cat([c[0] for c in captured])      # [per_dp, S, V/tp]
        loss_tok = torch.cat([c[1] for c in captured])    # [per_dp, S]
        if args.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(args.tp)]
            dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        mine = (logits, loss_tok)
    else:
        mine = None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dp_rank, ps.get_tensor_model_parallel_rank(), mine))
    pieces = {}
    for d, t, m in gathered:
        if m is not None and t == 0:
            pieces[d] = m
    results["logits"] = torch.cat([pieces[d][0] for d in sorted(pieces)])
    results["loss"] = torch.cat([pieces[d][1] for d in sorted(pieces)])

    # --- adapter gradients at global expert index -----------------------------------------
    edp_rank = ps.get_expert_data_parallel_rank()
    grads = {}
    for moe_index in range(handle.num_moe_layers):
        for name in handle.projections:
            for which in ("A", "B"):
                grads[(moe_index, name, which)] = None
    local = {l.moe_index: l for l in handle.layers}
    shapes = {}
    probe = handle.layers[0].bank
    for name in handle.projections:
        spec = probe.specs[name]
        shapes[(name, "A")] = (handle.num_experts, probe.r_max, spec.in_features)
        shapes[(name, "B")] = (handle.num_experts, spec.out_features, probe.r_max)
    for key in grads:
        moe_index, name, which = key
        full = torch.zeros(shapes[(name, which)], dtype=torch.float64)
        layer = local.get(moe_index)
        if layer is not None and (edp_rank == 0 or args.dist_opt):
            bank = layer.bank
            spec = bank.specs[name]
            if bank.pooled:  # slot gradients mapped to the dense layout
                param = bank.side(name, which)
            else:
                param = bank.factor(name, which)
            g = param.main_grad.view_as(param).double()
            if args.dist_opt:  # only this rank's shard of the reduced gradient is valid
                g = g * controller._grad_masks[param]
            if bank.pooled:
                g = bank.dense_from(name, which, {"slots_hidden": g, "slots_ffn": g})
            ids = torch.tensor(bank.global_expert_ids)
            if which == "A" and spec.a_sharded:
                w = spec.in_local
                full[ids, :, spec.tp_rank * w:(spec.tp_rank + 1) * w] = g
            elif which == "B" and spec.b_sharded:
                w = spec.out_local
                full[ids, spec.tp_rank * w:(spec.tp_rank + 1) * w] = g
            elif spec.tp_rank == 0:
                full[ids] = g
        dist.all_reduce(full)
        grads[key] = full
    results["grads"] = grads
    if dist.get_world_size() == 1:
        results["reference_grads"] = reference_adapter_grads(handle, cfg, expert_calls,
                                                             forward_map)

    # --- DR-LoRA statistics and a growth decision (event at step 0) ------------------------
    own_choice = {}
    broadcast = comm.broadcast_rank_map

    def broadcast_recording(rank_map, *a, **k):
        own_choice["rank_map"] = rank_map.clone()  # what this rank's own allocator chose
        return broadcast(rank_map, *a, **k)

    comm.broadcast_rank_map = broadcast_recording
    if dist.get_rank() == args.perturb_rank:
        original = controller.saliency.saliency

        def perturbed(*a, **k):
            scores = original(*a, **k).clone()
            scores[0] = -scores[0]  # this rank's layer-0 saliency order is reversed
            return scores

        controller.saliency.saliency = perturbed
    snapshot = {}
    reset = controller.saliency.reset_importance

    def reset_with_snapshot(*a, **k):
        snapshot["importance"] = controller.saliency.importance.clone()
        return reset(*a, **k)

    controller.saliency.reset_importance = reset_with_snapshot
    try:
        report = controller.finish(0, stepped=True)  # collect(0) ran in finalize
    except comm.RankMapDisagreement as e:
        print(f"RANK{dist.get_rank()} DISAGREEMENT: {e}", flush=True)
        dist.barrier()
        dist.destroy_process_group()
        sys.exit(0)
    results["frequency"] = controller.saliency.frequency.clone()
    results["importance"] = snapshot["importance"]
    results["saliency"] = controller.events[-1]["saliency"]
    results["rank_map"] = controller.rank_map.clone()
    results["event"] = report.event
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (controller.rank_map.clone(), handle.local_rank_map(),
                                      own_choice.get("rank_map")))
    results["rank_maps_per_rank"] = [m for m, _, _ in per_rank]
    results["applied_maps_per_rank"] = [h for _, h, _ in per_rank]
    results["own_choice_per_rank"] = [c for _, _, c in per_rank]

    # --- optimizer step, then every replica of a replicated tensor must be identical -------
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=False, fp16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=args.dist_opt,
                        clip_grad=1.0), model)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    results["grad_norm"] = grad_norm
    mismatches = []
    for chunk in chunks:
        for pname, p_ in chunk.named_parameters():
            if not p_.requires_grad:
                continue
            if getattr(p_, "drlora", False):
                group = ps.get_expert_data_parallel_group()
            else:
                group = ps.get_data_parallel_group()
            n = dist.get_world_size(group)
            copies = [torch.empty_like(p_.data) for _ in range(n)]
            dist.all_gather(copies, p_.data.contiguous(), group=group)
            if not all(torch.equal(copies[0], c) for c in copies):
                mismatches.append(pname)
            if getattr(p_, "drlora", False) and not p_.drlora_sharded:
                etp_group = ps.get_expert_tensor_parallel_group()
                n = dist.get_world_size(etp_group)
                copies = [torch.empty_like(p_.data) for _ in range(n)]
                dist.all_gather(copies, p_.data.contiguous(), group=etp_group)
                if not all(torch.equal(copies[0], c) for c in copies):
                    mismatches.append(pname + " (expert-TP replicas)")
    all_mismatches = [None] * dist.get_world_size()
    dist.all_gather_object(all_mismatches, mismatches)
    results["replica_mismatches"] = sorted({m for ms in all_mismatches for m in ms})

    if dist.get_rank() == 0:
        torch.save(results, args.out)
        print("PARITY_WORKER_DONE", flush=True)
    dist.barrier()
    dist.destroy_process_group()


class CountExpertTPReductions:
    """Counts torch.distributed.all_reduce calls made from megatron_drlora code on a group of
    exactly the expert-TP ranks (the statistics reduction uses the world group: not counted)."""

    def __enter__(self):
        from megatron.core import parallel_state as ps

        self.count = 0
        self.ranks = sorted(dist.get_process_group_ranks(ps.get_expert_tensor_parallel_group()))
        self.original = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            caller = sys._getframe(1).f_code.co_filename
            if ("megatron_drlora" in caller and group is not None
                    and sorted(dist.get_process_group_ranks(group)) == self.ranks):
                self.count += 1
            return self.original(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def reference_adapter_grads(handle, cfg, expert_calls, rank_map):
    """Adapter gradients from a plain-PyTorch MoE-experts block with LoRA on each expert,
    written without megatron_drlora.adapters: per expert, fc1 = W1 (+ s B A on gate/up halves),
    SwiGLU or GeLU, routing prob, fc2 = W2 (+ s B A), each active rank r a prefix of the r_max
    factors, recomputed in float64 from the captured expert inputs and back-propagated from the
    captured expert-output gradients of every micro-batch."""
    import torch.nn.functional as F

    scale = cfg.lora_alpha / cfg.rank_max
    out = {}
    for layer in handle.layers:
        l = layer.moe_index
        experts = layer.experts.local_experts
        leaves = {}
        for name in handle.projections:
            for which in ("A", "B"):
                value = layer.bank.dense_factor(name, which).double()
                leaves[(name, which)] = value.requires_grad_(True)
        total = 0.0
        for call in expert_calls[l]:
            xs = torch.split(call["x"].double(), call["counts"])
            ps_ = torch.split(call["probs"].double(), call["counts"])
            gs = torch.split(call["grad"].double(), call["counts"])
            for e, (x, p, g) in enumerate(zip(xs, ps_, gs)):
                def delta(inp, name):
                    r = int(rank_map[l, e, handle.projections.index(name)])
                    a = leaves[(name, "A")][e, :r]
                    b = leaves[(name, "B")][e, :, :r]
                    return scale * (inp @ a.T) @ b.T

                mlp = experts[e]
                h = x @ mlp.linear_fc1.weight.detach().double().T
                gated = cfg_gated(mlp)
                if gated:
                    gate, up = h.chunk(2, dim=-1)
                    if "gate" in handle.projections:
                        gate = gate + delta(x, "gate")
                    if "up" in handle.projections:
                        up = up + delta(x, "up")
                    act = F.silu(gate) * up
                else:
                    if "up" in handle.projections:
                        h = h + delta(x, "up")
                    act = F.gelu(h)
                act = act * p.unsqueeze(-1)
                y = act @ mlp.linear_fc2.weight.detach().double().T
                if "down" in handle.projections:
                    y = y + delta(act, "down")
                total = total + (y * g).sum()
        total.backward()
        for (name, which), leaf in leaves.items():
            out[(l, name, which)] = leaf.grad.clone()
    return out


def cfg_gated(mlp) -> bool:
    return bool(mlp.config.gated_linear_unit)


if __name__ == "__main__":
    main()
