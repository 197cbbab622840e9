"""Data for megatron-drlora: a synthetic multi-domain corpus, a SentencePiece tokenizer wrapper
and Megatron GPT datasets with prompt loss masking.

Importing this package does not import megatron-core; `megatron_drlora.data.dataset` does
(it needs GPTDataset), so the corpus and tokenizer tools start fast.
"""

from megatron_drlora.data.synthetic import (
    DOMAINS,
    FORMATS,
    expected_response,
    generate,
    generate_mixed,
    is_correct,
    write_jsonl,
)
from megatron_drlora.data.tokenizer import SentencePieceTokenizer, load_tokenizer

__all__ = [
    "DOMAINS",
    "FORMATS",
    "SentencePieceTokenizer",
    "expected_response",
    "generate",
    "generate_mixed",
    "is_correct",
    "load_tokenizer",
    "write_jsonl",
]
