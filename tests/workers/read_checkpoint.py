"""Read every tensor and the DR-LoRA state of a Megatron-LM checkpoint, independently of the
model code: `python read_checkpoint.py CKPT_ITER_DIR OUT.pt` (one gloo process)."""

import sys

import torch

import megatron_drlora  # noqa: F401  (Python 3.11 shim before megatron)


def main(path: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    port = sys.argv[3] if len(sys.argv) > 3 else "29533"  # never the parent's MASTER_PORT
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    meta = dist_checkpointing.load_tensors_metadata(path)
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(v.global_shape, dtype=v.dtype))
               for k, v in meta.items()}
    tensors = dist_checkpointing.load(request, path)
    common = dist_checkpointing.load_common_state_dict(path)
    state = common["model"]["drlora_state"] if "model" in common else \
        common["model0"]["drlora_state"]
    torch.save({"tensors": {k: tensors[k] for k in meta}, "drlora": state, "iteration": common["iteration"]}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
