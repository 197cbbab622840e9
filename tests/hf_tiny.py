"""Tiny random-weight Hugging Face MoE models (one per supported family) for the interop tests.

Weights are drawn far from HF's init (norm weights around 1 with noise, biases non-zero, larger
matrices) so that a wrong mapping (per-head vs whole-projection q/k norm, gate vs up, a missing
bias, unnormalised vs normalised top-k) changes the logits visibly. Sizes make every dimension
distinct where it matters: 2 x expert ffn != hidden, GQA (4 heads, 2 groups), Qwen3-MoE with a
head_dim that is not hidden / heads and tied embeddings.
"""

from __future__ import annotations

import json
import os

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
VOCAB = 100
SEQ = 16


def hf_config(family: str, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                  rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if family == "mixtral":
        cfg = dict(intermediate_size=24, num_local_experts=4, rope_theta=1000000.0)
        cls = MixtralConfig
    elif family == "qwen2_moe":
        cfg = dict(intermediate_size=48, moe_intermediate_size=24,
                   shared_expert_intermediate_size=40, num_experts=4, norm_topk_prob=False)
        cls = Qwen2MoeConfig
    elif family == "qwen3_moe":
        cfg = dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=12,
                   norm_topk_prob=True, tie_word_embeddings=True)
        cls = Qwen3MoeConfig
    else:
        cfg = dict(intermediate_size=24, num_experts=4, norm_topk_prob=False)
        cls = OlmoeConfig
    common.update(cfg)
    common.update(overrides)
    return cls(**common)


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.15 * noise)


def make_hf_model(family: str, path: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random model of `family` to `path` (config written so transformers 4 reads
    it too); returns path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                             dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(path)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as fh:
        cfg = json.load(fh)
    if family == "qwen3_moe" and "num_experts" not in cfg:  # transformers 4 reads this key
        cfg["num_experts"] = cfg["num_local_experts"]
        with open(cfg_file, "w") as fh:
            json.dump(cfg, fh, indent=2)
    return path


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
