"""Hugging Face tokenizer directories with chat templates, built locally (no downloads) for the
chat-data tests: a byte-level BPE trained with the `tokenizers` library on a made-up corpus,
wrapped in transformers.PreTrainedTokenizerFast and written with save_pretrained.

Each template comes in two forms: the plain one a model ships (what preprocess_data renders
with) and the same text with `{% generation %}` markers around what counts as the assistant's
reply, from which transformers' own `return_assistant_tokens_mask` gives an independent loss
mask. The marked span is the reply plus what the template closes the turn with, up to the end
of that turn's rendering (Tulu: reply + eos_token; ChatML: reply + '<|im_end|>\\n').
"""

from __future__ import annotations

import json
import random

WORDS = ("the cat sat on a mat while two dogs ran past seven red boxes and one green lamp "
         "what is sum of three plus four answer equals please tell me about rivers lakes "
         "hello world this is test assistant user system helpful you are a kind bot").split()

# open-instruct's Tulu template (OLMoE-Instruct's), with bos first as Llama-style models do.
TULU = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}")
TULU_MARKED = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}")

# Qwen2's ChatML template (default system prompt when none is given).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_MARKED = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Mixtral-Instruct's template: user/assistant only, alternating (it raises otherwise), no
# generation prompt of its own (a user turn ends with ' [/INST]').
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")
MIXTRAL_MARKED = MIXTRAL.replace(
    "{{ message['content'] + eos_token }}",
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}")

SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, n)))


def corpus(n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    return [sentence(rng, 12) for _ in range(n)] + [
        "<|user|>\n<|assistant|>\n<|system|>\n", "[INST] [/INST]"]


def build_chat_tokenizer(directory, template=None, *, bos_post_processor=False,
                         eos="</s>", bos="<s>", metaspace=False, vocab_size=300):
    """Save a tokenizer directory (tokenizer.json, tokenizer_config.json and, with `template`,
    chat_template.jinja, as save_pretrained writes them); returns its path as a string.
    Byte-level BPE (GPT-2 / Qwen / OLMoE style), or with `metaspace` SentencePiece-style
    ('\u2581' for spaces, Llama / Mixtral tokenizer.json style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
        show_progress=False))
    if bos_post_processor:  # every encode(..., add_special_tokens=True) starts with bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token="<unk>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(directory))
    return str(directory)


def chat_records(n: int, seed: int = 0, system: bool = True):
    """Multi-turn chat records in the open-instruct form: optional system, 1-3 exchanges,
    sometimes ending with an unanswered user turn."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = []
        if rng.random() < 0.4 and system:
            messages.append({"role": "system", "content": sentence(rng)})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": sentence(rng)})
            messages.append({"role": "assistant", "content": sentence(rng, 9)})
        if rng.random() < 0.15:
            messages.append({"role": "user", "content": sentence(rng)})
        records.append({"id": f"r{i}", "messages": messages})
    return records


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
