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
# Phi-MoE is tested in tests/test_phimoe.py (LayerNorm, biases, sparsemixer, sliding window),
# GLM-4.5 in tests/test_glm4_moe.py (partial RoPE, dense first layer, sigmoid router).
# DeepSeek-V2/V3 (multi-latent attention) in tests/test_deepseek.py.
ALL_FAMILIES = FAMILIES + ("phimoe", "glm4_moe", "deepseek_v2", "deepseek_v3")
VOCAB = 100
SEQ = 16


def hf_config(family: str, **overrides):
    from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, MixtralConfig, OlmoeConfig, PhimoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

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
    elif family == "phimoe":  # a wide sparsemixer window: the masked softmax keeps several experts
        cfg = dict(intermediate_size=24, num_local_experts=4, attention_bias=True,
                   lm_head_bias=True, router_jitter_noise=0.2, input_jitter_noise=0.01)
        cls = PhimoeConfig
    elif family == "glm4_moe":  # 3 layers: one dense, two MoE; 8 experts in 4 groups, top-4
        cfg = dict(num_hidden_layers=3, head_dim=16, intermediate_size=48,
                   moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                   num_experts_per_tok=4, first_k_dense_replace=1, partial_rotary_factor=0.5,
                   attention_bias=True, use_qk_norm=True, n_group=4, topk_group=2,
                   routed_scaling_factor=1.5, norm_topk_prob=True, num_nextn_predict_layers=0)
        cls = Glm4MoeConfig
    elif family in ("deepseek_v2", "deepseek_v3"):  # MLA: q/k head 8+4, v head 6; 1 dense layer
        cfg = dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=40,
                   moe_intermediate_size=12, n_routed_experts=8, n_shared_experts=1,
                   first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
        if family == "deepseek_v2":  # groups ranked by their best expert: top-2 of 2 groups
            cfg.update(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                       routed_scaling_factor=1.5, norm_topk_prob=False)
            cls = DeepseekV2Config
        else:
            cfg.update(n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
                       norm_topk_prob=True, num_nextn_predict_layers=0)
            cls = DeepseekV3Config
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
    for name, b in sorted(model.named_buffers()):  # GLM-4.5's router bias is a buffer
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_hf_model(family: str, path: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                  name_or_path=None, **overrides) -> str:
    """Save a tiny random model of `family` to `path` (config written so transformers 4 reads
    it too) in `dtype`; `name_or_path` goes to config.json's `_name_or_path` (what
    from_pretrained of a hub id leaves there); returns path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                             dtype=torch.float32)
    randomize(model, seed)
    model = model.to(dtype)
    model.save_pretrained(path)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as fh:
        cfg = json.load(fh)
    if family == "qwen3_moe" and "num_experts" not in cfg:  # transformers 4 reads this key
        cfg["num_experts"] = cfg["num_local_experts"]
    if name_or_path is not None:
        cfg["_name_or_path"] = name_or_path
    with open(cfg_file, "w") as fh:
        json.dump(cfg, fh, indent=2)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(path: str, size: int = VOCAB - 10) -> str:
    """A word-level Hugging Face tokenizer of `size` tokens (< the tiny models' VOCAB rows, as
    real tokenizers often are) with a chat template, saved into `path` the way save_pretrained
    does (tokenizer.json, tokenizer_config.json); returns path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = [f"w{i}" for i in range(size - len(special))]
    vocab = {tok: i for i, tok in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>",
                                   additional_special_tokens=special[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def make_chat_data(hf_dir: str, directory, n: int = 48, seed: int = 0) -> str:
    """Chat JSONL (system/user/assistant turns in make_tokenizer's words) rendered with the
    tokenizer's chat template by tools/preprocess_data.py; returns the --data-path prefix."""
    import json
    import os
    import random

    from tests import prefork
    from tests.dist_harness import REPO

    rng = random.Random(seed)
    say = lambda k: " ".join(f"w{rng.randrange(40)}" for _ in range(k))  # noqa: E731
    os.makedirs(directory, exist_ok=True)
    chat = os.path.join(directory, "chat.jsonl")
    with open(chat, "w") as fh:
        for _ in range(n):
            messages = [{"role": "system", "content": say(3)}]
            for _ in range(rng.randint(1, 2)):
                messages += [{"role": "user", "content": say(rng.randint(2, 5))},
                             {"role": "assistant", "content": say(rng.randint(2, 6))}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    prefix = os.path.join(directory, "chat")
    # the command as a user types it, forked from the pre-imported server (tests/prefork.py)
    proc = prefork.launch(REPO / "tools" / "preprocess_data.py",
                          ["--input", chat, "--output-prefix", prefix, "--append-eod",
                           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                           hf_dir], 1, 300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return f"{prefix}_text_document"
