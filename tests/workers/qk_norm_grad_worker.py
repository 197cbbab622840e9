"""One forward+backward of a tiny MoE with OLMoE's whole-projection q/k norm under a given TP
size, then Megatron's own finalize_model_grads; rank 0 saves the q/k norm weights and their
gradients gathered to full size, for comparison with the TP=1 run of the same script.

Usage: torchrun --nproc_per_node N qk_norm_grad_worker.py OUT [--tp N]
"""

import argparse
import faulthandler

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(200, exit=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1)
    args = p.parse_args()

    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    initialize_megatron_parallel(ParallelSizes(tensor_model_parallel_size=args.tp))
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_drlora.projection_qk_norm import ProjectionRMSNorm
    from tests.tiny import batch, build, tiny_args

    margs = tiny_args(tensor_model_parallel_size=args.tp, num_query_groups=2, qk_layernorm=True,
                      qk_layernorm_scope="projection")
    chunks, _ = build(margs)  # the same global weights under every TP size, all trainable
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    model = DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_cfg, module=chunks[0])
    model.zero_grad_buffer()
    tokens, pos, labels = batch(margs, batch_size=2, seed=5)
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([model])

    tp_group = ps.get_tensor_model_parallel_group()
    results = {"loss": loss.detach().double(), "weights": {}, "grads": {}}
    for name, module in chunks[0].named_modules():
        if not isinstance(module, ProjectionRMSNorm):
            continue
        for kind, t in (("weights", module.weight.detach()),
                        ("grads", module.weight.main_grad.view_as(module.weight))):
            t = t.double().contiguous()
            if t.numel() != module.full_size:  # TP-sharded: gather the shards in rank order
                parts = [torch.empty_like(t) for _ in range(args.tp)]
                dist.all_gather(parts, t, group=tp_group)
                t = torch.cat(parts)
            results[kind][name] = t
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
