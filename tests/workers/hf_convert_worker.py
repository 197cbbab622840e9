"""Convert tiny HF models at multi-process layouts (2 gloo processes) and compare the Megatron
logits at that layout with the HF logits; rank 0 writes {family/layout: max |diff|} to OUT.

Usage: torchrun --nproc_per_node 2 hf_convert_worker.py HF_ROOT SAVE_ROOT OUT \
       --layouts ep2:mixtral,qwen2_moe tp2:olmoe
Each checkpoint goes to SAVE_ROOT/<layout>/<family> (the test loads the EP2 ones at EP1).
"""

import faulthandler
import json
import os
import sys


faulthandler.dump_traceback_later(200, exit=True)

LAYOUTS = {"ep2": dict(expert_model_parallel_size=2), "tp2": dict(tensor_model_parallel_size=2)}


def main():
    hf_root, save_root, out = sys.argv[1:4]
    plan = [item.split(":") for item in sys.argv[sys.argv.index("--layouts") + 1:]]

    import torch.distributed as dist

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from tests.hf_tiny import VOCAB, SEQ, tokens

    results = {}
    for layout, families in plan:
        sizes = LAYOUTS[layout]
        for family in families.split(","):
            hf_dir = os.path.join(hf_root, family)
            save = os.path.join(save_root, layout, family)
            convert(hf_dir, save, log=lambda s: None, **sizes)
            margs = verify.model_args_from_file(
                os.path.join(save, "model.args"), SEQ,
                tensor_model_parallel_size=sizes.get("tensor_model_parallel_size", 1),
                expert_model_parallel_size=sizes.get("expert_model_parallel_size", 1))
            chunks, _ = verify.build_megatron(margs, save)
            t = tokens()
            mlogits = verify.megatron_logits(chunks, t, VOCAB)
            if dist.get_rank() == 0:
                hlogits = verify.hf_logits(hf_dir, t)
                results[f"{family}/{layout}"] = verify.max_abs_diff(mlogits, hlogits)
            dist.barrier()
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
    from megatron_drlora.parallel_setup import shutdown

    shutdown()


if __name__ == "__main__":
    main()
