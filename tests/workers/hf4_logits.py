"""Logits of an HF model (optionally with a PEFT adapter) under whatever transformers the
PYTHONPATH provides (the per-expert PEFT layout is for transformers 4). Writes a torch file.

Usage: python hf4_logits.py HF_DIR ADAPTER_DIR|- TOKENS.pt OUT.pt
"""

import sys

import torch


def main():
    hf_dir, adapter, tokens_file, out = sys.argv[1:5]
    import transformers
    from transformers import AutoModelForCausalLM

    tokens = torch.load(tokens_file)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    if adapter != "-":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    torch.save({"logits": logits, "transformers": transformers.__version__}, out)


if __name__ == "__main__":
    main()
