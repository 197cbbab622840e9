"""The shared expert's uniform LoRA under TP2 + sequence parallelism, then TP1 (DP2), in one
2-rank launch: the same global model (identity-seeded base, identical non-zero adapters) on
the same global batch, one forward/backward, Megatron's DDP and finalize_model_grads (which
sums the sequence-parallel factors over TP). Rank 0 saves, per layout, the logits, the loss,
every shared-adapter gradient gathered to full size and their grad norm as Megatron counts it.

The TP2 adapters are also saved with dist_checkpointing under their layout-independent keys
and loaded into the TP1 model (whose shared factors were zeroed): `resharded` says whether every
factor came back equal to the values TP1 was given.

Usage: torchrun --nproc_per_node 2 shared_lora_worker.py OUT
"""

import faulthandler
import hashlib
import os
import sys

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(200, exit=True)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8],
                          "little") & ((1 << 63) - 1)


@torch.no_grad()
def _fill(handle) -> None:
    """Non-zero factors from a full draw per (layer, projection), this rank's slice kept."""
    for layer in handle.layers:
        adapter = layer.shared
        for name in adapter.projection_names:
            spec = adapter.specs[name]
            g = torch.Generator().manual_seed(_seed("shared", layer.layer, name))
            a = torch.randn(adapter.rank, spec.in_features, generator=g) * 0.2
            b = torch.randn(spec.out_features, adapter.rank, generator=g) * 0.2
            if spec.a_sharded:
                a = a.chunk(spec.tp_size, dim=1)[spec.tp_rank]
            if spec.b_sharded:
                b = b.chunk(spec.tp_size, dim=0)[spec.tp_rank]
            adapter.factor(name, "A").copy_(a)
            adapter.factor(name, "B").copy_(b)


def _gather(t, dim, group, size):
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _checkpoint(handle, path: str, save: bool) -> bool:
    """Save (TP2) or load (TP1, into zeroed shared factors) the adapters' sharded tensors;
    on load, whether the shared factors equal `_fill`'s values again."""
    from megatron.core import dist_checkpointing

    from megatron_drlora.checkpoint import adapter_sharded_state_dict

    request = adapter_sharded_state_dict(handle)
    if save:
        dist_checkpointing.save(request, path)
        return True
    expect = {k: v.data.clone() for k, v in request.items() if k.startswith("drlora.shared.")}
    with torch.no_grad():
        for p in handle.shared_parameters():
            p.zero_()
    loaded = dist_checkpointing.load(request, path)
    return all(torch.equal(loaded[k], v) for k, v in expect.items()) and len(expect) == 12


def run(tp: int, ckpt: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_drlora import DRLoRAConfig
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel
    from tests.tiny import batch, build, tiny_args

    initialize_megatron_parallel(ParallelSizes(tensor_model_parallel_size=tp))
    margs = tiny_args(tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                      moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)
    config = DRLoRAConfig(budget=4, targets=("gate", "up", "down"), shared_experts="uniform",
                          p_grow=0.5)
    chunks, handle = build(margs, config)
    _fill(handle)
    resharded = _checkpoint(handle, ckpt, save=tp > 1)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    model = DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_cfg, module=chunks[0])
    model.zero_grad_buffer()
    tokens, pos, labels = batch(margs, batch_size=2, seed=5)
    logits = model(tokens, pos, None)
    if tp > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    loss = logits.float().log_softmax(-1)[..., 0].mean()  # the same scalar on every rank
    loss.backward()
    finalize_model_grads([model])

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    grads, counted = {}, []
    for layer in handle.layers:
        adapter = layer.shared
        for name in adapter.projection_names:
            spec = adapter.specs[name]
            for which, sharded, dim in (("A", spec.a_sharded, 1), ("B", spec.b_sharded, 0)):
                param = adapter.factor(name, which)
                g = param.main_grad.view_as(param).double()
                if getattr(param, "tensor_model_parallel", False) or rank == 0:
                    counted.append(param.main_grad)
                grads[f"{layer.layer}.{name}_{which}"] = (
                    _gather(g, dim, group, tp) if sharded else g)
    norm = get_grad_norm_fp32(counted, grad_stats_parallel_group=ps.get_model_parallel_group())
    out = {"logits": logits.detach().double(), "loss": loss.detach().double(), "grads": grads,
           "grad_norm": float(norm), "resharded": resharded}
    ps.destroy_model_parallel()
    return out


def main():
    out_path = sys.argv[1]
    from megatron_drlora.parallel_setup import init_distributed

    init_distributed()
    ckpt = out_path + ".ckpt"
    if dist.get_rank() == 0:
        os.makedirs(ckpt)
    dist.barrier()
    results = {2: run(2, ckpt), 1: run(1, ckpt)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
