"""comm.sum_replicated_gradients in real gloo processes (no Megatron): 4 ranks as 2 expert-TP
groups {0, 1} and {2, 3}; each bank's gradients are summed within its group in one all-reduce.

Usage: torchrun --nproc_per_node 4 replicated_grad_worker.py
"""

import faulthandler

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(100, exit=True)


def main():
    dist.init_process_group("gloo")
    from megatron_drlora import comm

    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]

    def grads(seed):  # a bank's replicated gradients: different shapes, one a view, one None
        g = torch.Generator().manual_seed(seed)
        buffer = torch.randn(40, generator=g)
        return [torch.randn(3, 4, 5, generator=g), buffer[8:32].view(2, 3, 4), None]

    banks = [(group, grads(10 * rank + b)) for b in range(3)] + [(None, grads(99))]
    before = [[t.clone() if t is not None else None for t in ts] for _, ts in banks]
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(k.get("group")) or original(*a, **k)
    issued = comm.sum_replicated_gradients(banks)
    dist.all_reduce = original
    peer = rank ^ 1
    for b in range(3):
        expected = [m + p for m, p in zip(before[b][:2], grads(10 * peer + b)[:2])]
        for got, want in zip(banks[b][1][:2], expected):
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (rank, b)
        assert banks[b][1][2] is None
    assert all(torch.equal(g, w) for g, w in zip(banks[3][1][:2], before[3][:2]))  # no group
    assert issued == 3 and len(calls) == 3 and all(c is group for c in calls), (issued, calls)
    print(f"RANK{rank} REPLICATED_OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
