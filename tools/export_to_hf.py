#!/usr/bin/env python
"""Export a DR-LoRA checkpoint to Hugging Face (merged model or PEFT adapter).

    python tools/export_to_hf.py --load runs/olmoe_drlora --pretrained-checkpoint bases/olmoe \
        --hf-path OLMoE-1B-7B --format merged --save olmoe-drlora-merged --verify
    python tools/export_to_hf.py --load runs/olmoe_drlora --hf-path OLMoE-1B-7B \
        --format peft --save olmoe-drlora-peft            # transformers 5 fused layout
    ... --format peft --peft-layout per-expert             # transformers 4 per-expert modules

CPU only, one process (no torchrun), one layer in memory at a time. --verify compares the
export's logits with the Megatron model with the adapters and exits 2 if they disagree;
--hf-model-id ORG/NAME names the base in the PEFT config and the model card (a local path never
is). --save appears complete or not at all. See megatron_drlora/hf/, docs/hf_interop.md.
"""

import os
import sys

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.hf.exporter import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import __main__
    sys.exit(main())
