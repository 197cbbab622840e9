#!/usr/bin/env python
"""Convert a local Hugging Face MoE checkpoint into a Megatron-Core base checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path OLMoE-1B-7B --save bases/olmoe
    torchrun --nproc_per_node 2 tools/convert_hf_to_megatron.py --hf-path DIR --save OUT \
        --expert-model-parallel-size 2

Writes OUT/iter_0000000/ (+ tracker), OUT/model.args (the model flags, and the HF tokenizer
when DIR has one, for `examples/pretrain_gpt.py @OUT/model.args --pretrained-checkpoint OUT
...`) and OUT/hf_source.json. Weights keep the checkpoint's dtype unless --dtype fp32|bf16|fp16;
peak memory is the rank's share of the base plus less than a layer (logged at the end).
Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Phi-MoE (megatron_drlora/hf/, docs/hf_interop.md).
"""

import os
import sys

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.hf.importer import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import __main__
    sys.exit(main())
