"""The rank-map broadcast and the exact agreement check of megatron_drlora.comm in real gloo
processes (no Megatron): prints one line per finding for tests/test_comm_agreement.py.

Usage: torchrun --nproc_per_node 2 agreement_worker.py
"""

import faulthandler

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(100, exit=True)


def main():
    dist.init_process_group("gloo")
    from megatron_drlora import comm

    rank = dist.get_rank()
    base = torch.randint(1, 33, (3, 4, 2), generator=torch.Generator().manual_seed(0))

    # Equal maps pass.
    comm.check_rank_map_agreement(base.clone(), step=7)
    print(f"RANK{rank} EQUAL_OK", flush=True)

    # One entry of MoE layer 2 differs by one on rank 1: every rank stops, naming layer 2.
    mine = base.clone()
    if rank == 1:
        mine[2, 1, 0] += 1
    try:
        comm.check_rank_map_agreement(mine, step=7)
        print(f"RANK{rank} MISSED", flush=True)
    except comm.RankMapDisagreement as e:
        print(f"RANK{rank} CAUGHT {e}", flush=True)

    # Maps that a weighted float checksum can confuse: two swapped entries of layer 0 (same
    # sum) and an entry moved by one between modules.
    mine = base.clone()
    if rank == 1:
        mine[0, 0, 0], mine[0, 3, 1] = base[0, 3, 1], base[0, 0, 0]
        if torch.equal(mine, base):
            mine[0, 0, 0] += 1
    try:
        comm.check_rank_map_agreement(mine, step=8)
        print(f"RANK{rank} SWAP_MISSED", flush=True)
    except comm.RankMapDisagreement as e:
        print(f"RANK{rank} SWAP_CAUGHT {e}", flush=True)

    # The broadcast hands every rank global rank 0's map (int64), whatever this rank chose.
    chosen = base.clone() if rank == 0 else base.flip(1).to(torch.int32)
    got = comm.broadcast_rank_map(chosen, src=0)
    ok = got.dtype == torch.int64 and torch.equal(got, base) and torch.equal(chosen if rank == 0
                                                                              else got, base)
    print(f"RANK{rank} BROADCAST_{'OK' if ok else 'WRONG'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
