"""Megatron-Core GPT (MoE) training with DR-LoRA.

    torchrun --nproc_per_node 8 examples/pretrain_gpt.py <Megatron-LM flags> --drlora-budget 16

Without --drlora-budget (or --drlora-config) the whole model trains, which is how a base for a
demo or a test is made. `python examples/pretrain_gpt.py --help` lists every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.training.loop import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing spawns workers that re-import __main__
    sys.exit(main())
