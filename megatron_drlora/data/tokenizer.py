"""Tokenizers for the data tools: Megatron's own builder, and a small SentencePiece wrapper.

`build_megatron_tokenizer` builds a tokenizer exactly as Megatron-LM's training does
(`megatron.core.tokenizers.utils.build_tokenizer.build_tokenizer` on an argparse Namespace of
the `--tokenizer-*` flags), so tools/preprocess_data.py writes the ids and eod training uses.
`DocumentEncoder` turns JSONL records into documents with it, in worker processes too.

`SentencePieceTokenizer` is a thin wrapper with the interface megatron-core's GPTDataset reads
(`vocab_size`, `eod`, `unique_identifiers`), kept for `build_gpt_datasets` and tests: it is
stable across megatron-core versions. Its `unique_identifiers` include the model file's sha256:
retraining the tokenizer in place changes the cache key, so Megatron never reuses sample
indices built for other token ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence, Tuple


class TokenizerError(ValueError):
    """The tokenizer model is missing or unusable; the message says how to fix it."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (identifies a tokenizer model independently of its path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """Megatron-like tokenizer: `tokenize`, `detokenize`, `vocab_size`, `eod`, `bos`, `eos`.

    eod is the SentencePiece eos id: the documents written by tools/preprocess_data.py end with
    it and GPTDataset's eod masking compares against it. There is deliberately no pad token
    (tools/train_tokenizer.py trains with pad_id=-1); GPTDataset then pads with -1 internally
    and masks those positions itself.
    """

    def __init__(self, model_path: str):
        import sentencepiece

        self.model_path = os.path.abspath(model_path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(
                f"{model_path} is not a SentencePiece model ({err}); "
                "train one with tools/train_tokenizer.py"
            ) from None
        self.sha256 = file_sha256(self.model_path)
        self._vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise TokenizerError(
                f"{model_path} defines no eos piece, so documents have no end-of-document "
                "token; retrain it with tools/train_tokenizer.py (which sets eos_id=2)"
            )
        self._eos = eos
        self._bos = int(self._sp.bos_id())
        self.unique_identifiers = OrderedDict(
            [("class", "megatron_drlora.SentencePieceTokenizer"),
             ("tokenizer_path", self.model_path),
             ("sha256", self.sha256)]
        )

    def __getstate__(self) -> dict:
        """Pickle by path (DataLoader workers get the config, tokenizer included)."""
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def bos(self) -> int:
        """bos id (1 with tools/train_tokenizer.py); GPT documents do not start with it."""
        return self._bos

    @property
    def unk(self) -> int:
        return int(self._sp.unk_id())

    def tokenize(self, text: str) -> List[int]:
        return list(self._sp.encode_as_ids(text))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


def load_tokenizer(model_path: str) -> SentencePieceTokenizer:
    """Load a SentencePiece `.model`; FileNotFoundError names the path and how to make one."""
    if not model_path or not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"tokenizer model not found: {model_path!r} (--tokenizer-model); "
            "train one with: python tools/train_tokenizer.py --input DATA.jsonl "
            "--model-prefix PREFIX (it writes PREFIX.model)"
        )
    return SentencePieceTokenizer(model_path)


# --------------------------------------------------------------------------------------------
# Megatron's tokenizers
# --------------------------------------------------------------------------------------------

SP_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
PREPROCESS_TOKENIZERS = SP_TOKENIZERS + ("HuggingFaceTokenizer", "NullTokenizer")
"""--tokenizer-type values tools/preprocess_data.py accepts."""

_TOKENIZER_DEFAULTS = dict(  # megatron.training.config.TokenizerConfig in megatron-core 0.19
    vocab_size=None, padded_vocab_size=None, pad_vocab_size=True, vocab_file=None,
    merge_file=None, vocab_extra_ids=0, tokenizer_type=None, tokenizer_model=None,
    metadata_path=None, special_tokens=None, tiktoken_pattern=None,
    tiktoken_num_special_tokens=1000, tokenizer_sentencepiece_legacy=False,
    tokenizer_sentencepiece_ignore_extra_whitespaces=True, tokenizer_hf_no_use_fast=False,
    tokenizer_hf_no_include_special_tokens=False, trust_remote_code=False,
    null_tokenizer_eod_id=None, null_tokenizer_pad_id=-1, chat_template=None)


def _quiet_import(name: str):
    """Import a megatron module without its Transformer Engine / Apex warnings."""
    import importlib
    import warnings

    import megatron_drlora  # noqa: F401  (the import shim, before megatron)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def tokenizer_defaults() -> dict:
    """The `--tokenizer-*` defaults of Megatron-LM's training parser."""
    import dataclasses

    try:
        config = _quiet_import("megatron.training.config").TokenizerConfig
        return {f.name: f.default for f in dataclasses.fields(config)}
    except (ImportError, AttributeError):
        return dict(_TOKENIZER_DEFAULTS)


def megatron_tokenizer_args(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                            vocab_size: Optional[int] = None, **overrides) -> argparse.Namespace:
    """The Namespace `build_tokenizer` reads: training's defaults, these values, no padding."""
    values = tokenizer_defaults()
    values.update(overrides, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                  vocab_size=vocab_size)
    values["pad_vocab_size"] = False  # padding is the model's business, not the data's
    return argparse.Namespace(**values)


def tokenizer_sha256(model_path: Optional[str]) -> Optional[str]:
    """Identity of a tokenizer model: sha256 of a model file, or of a Hugging Face directory's
    tokenizer.json (else its tokenizer.model); None when there is nothing to hash."""
    if not model_path:
        return None
    if os.path.isfile(model_path):
        return file_sha256(model_path)
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(model_path, name)):
            return file_sha256(os.path.join(model_path, name))
    return None


def check_tokenizer_args(args) -> None:
    """TokenizerError (naming the flag) for settings build_tokenizer would reject obscurely."""
    kind = args.tokenizer_type
    if kind not in PREPROCESS_TOKENIZERS:
        raise TokenizerError(
            f"--tokenizer-type {kind} is not supported by this tool; use one of "
            f"{', '.join(PREPROCESS_TOKENIZERS)} (for other tokenizers use Megatron-LM's "
            "tools/preprocess_data.py)")
    model = args.tokenizer_model
    if kind == "NullTokenizer":
        if not args.vocab_size or int(args.vocab_size) <= 0:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size (the "
                                 "number of token ids; eod defaults to vocab size - 1)")
    elif kind == "HuggingFaceTokenizer":
        if not model or not os.path.isdir(model):
            raise FileNotFoundError(
                f"tokenizer model not found: {model!r} (--tokenizer-model must be a local "
                "Hugging Face tokenizer directory, as written by save_pretrained)")
    elif not model or not os.path.isfile(model):
        raise FileNotFoundError(
            f"tokenizer model not found: {model!r} (--tokenizer-model); "
            "train one with: python tools/train_tokenizer.py --input DATA.jsonl "
            "--model-prefix PREFIX (it writes PREFIX.model)")


def build_megatron_tokenizer(args):
    """Megatron-LM training's tokenizer for these `--tokenizer-*` args (a Namespace)."""
    check_tokenizer_args(args)
    args = argparse.Namespace(**{**tokenizer_defaults(), **vars(args), "pad_vocab_size": False})
    build = _quiet_import("megatron.core.tokenizers.utils.build_tokenizer").build_tokenizer
    try:
        return build(args)
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise TokenizerError(f"--tokenizer-type {args.tokenizer_type} --tokenizer-model "
                             f"{args.tokenizer_model}: cannot load the tokenizer ({err})") from None


def tokenizer_eod(tokenizer) -> Optional[int]:
    """`tokenizer.eod`, or None when it has none (a Hugging Face tokenizer without eos)."""
    try:
        eod = tokenizer.eod
    except (AttributeError, IndexError, KeyError, TypeError, NotImplementedError):
        return None
    return None if eod is None or int(eod) < 0 else int(eod)


def parse_jsonl_line(path: str, lineno: int, line: str) -> dict:
    """One JSONL line as a dict; JsonlError naming file and line otherwise."""
    from megatron_drlora.data.synthetic import JsonlError

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise JsonlError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                         "each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise JsonlError(f"{path}:{lineno}: expected a JSON object, got "
                         f"{type(record).__name__}")
    return record


class DocumentEncoder:
    """JSONL lines -> documents, with Megatron's tokenizer; picklable for worker processes.

    Modes:
    - text: one document per key;
    - instruction (keys prompt, response): prompt and response tokenized separately and
      concatenated, mask 0 on the prompt; a tokenizer that adds leading special tokens (e.g.
      bos) to every text keeps them on the prompt only;
    - chat (key messages, or prompt/response with a chat template): the record rendered with
      the chat template, mask 1 on assistant tokens only (megatron_drlora.data.chat).
    NullTokenizer reads token ids: a JSON list of ints (or a string of space-separated ints,
    as Megatron-LM's tool takes).

    End of document (append_eod): text and instruction documents end with eod; a chat document
    gets eod unless its last assistant turn (or what follows it) already holds the eod token
    (a template that closes turns with eos_token). The eod is a loss token when the record
    ends with an assistant turn. max_length cuts longer documents to their first max_length
    tokens (the eod goes with the cut).
    """

    def __init__(self, tokenizer_args, mode: str, keys: Sequence[str], append_eod: bool,
                 path: str, tokenizer=None, chat_template: Optional[str] = None,
                 max_length: Optional[int] = None):
        self.tokenizer_args = tokenizer_args
        self.mode, self.keys, self.append_eod, self.path = mode, list(keys), append_eod, path
        self.chat_template, self.max_length = chat_template, max_length
        self._tokenizer = tokenizer
        self._lead = None
        self._renderer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None, "_lead": None, "_renderer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_megatron_tokenizer(self.tokenizer_args)
        return self._tokenizer

    @property
    def renderer(self):
        """The chat renderer (chat mode), built once per process."""
        if self._renderer is None:
            from megatron_drlora.data.chat import ChatRenderer, hf_tokenizer_of

            hf = hf_tokenizer_of(self.tokenizer, self.tokenizer_args.tokenizer_model)
            self._renderer = ChatRenderer(hf, self.chat_template)
        return self._renderer

    @property
    def null(self) -> bool:
        return self.tokenizer_args.tokenizer_type == "NullTokenizer"

    def _error(self, lineno: int, text: str):
        from megatron_drlora.data.synthetic import JsonlError

        return JsonlError(f"{self.path}:{lineno}: {text}")

    def _ids(self, record: dict, key: str, lineno: int) -> List[int]:
        from megatron_drlora.data.synthetic import get_field

        if not self.null:
            return list(self.tokenizer.tokenize(get_field(record, key, self.path, lineno)))
        if key not in record:
            get_field(record, key, self.path, lineno)  # raises, naming the fields present
        value = record[key]
        if isinstance(value, str):
            value = [int(x) for x in value.split()] if all(
                x.isdigit() for x in value.split()) else None
        if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise self._error(lineno, f"field {key!r} must be a list of token ids (ints) for "
                              "--tokenizer-type NullTokenizer")
        vocab = int(self.tokenizer.vocab_size)
        bad = [x for x in value if not 0 <= x < vocab]
        if bad:
            raise self._error(lineno, f"field {key!r}: token id {bad[0]} outside [0, {vocab}) "
                              f"(--vocab-size {vocab})")
        return value

    def _strip_lead(self, ids: List[int]) -> List[int]:
        """Drop the special tokens the tokenizer puts before every text (a continuation)."""
        if self._lead is None:
            self._lead = [] if self.null else list(self.tokenizer.tokenize(""))
        n = len(self._lead)
        return ids[n:] if n and ids[:n] == self._lead else ids

    def _chat(self, record: dict, lineno: int):
        from megatron_drlora.data.chat import chat_messages

        messages = chat_messages(record, self.path, lineno,
                                 prompt_response=self.keys != ["messages"])
        ids, mask = self.renderer.encode(messages, f"{self.path}:{lineno}")
        eod = tokenizer_eod(self.tokenizer)
        if self.append_eod:
            last = len(mask) - 1 - mask[::-1].index(1)  # last assistant token
            while last > 0 and mask[last - 1]:
                last -= 1  # start of the last assistant turn
            if eod not in ids[last:]:
                ids.append(eod)
                mask.append(int(messages[-1]["role"] == "assistant"))
        return ids, mask

    def _cut(self, ids: List[int], mask: Optional[List[int]]):
        if self.max_length and len(ids) > self.max_length:
            return ids[:self.max_length], (None if mask is None else mask[:self.max_length]), 1
        return ids, mask, 0

    def encode(self, lineno: int, line: str) -> Optional[List[Tuple[List[int], Optional[List[int]],
                                                                    int]]]:
        """One JSONL line -> [(ids, loss mask or None, truncated)] per output dataset; None
        for a blank line."""
        if not line.strip():
            return None
        record = parse_jsonl_line(self.path, lineno, line)
        if self.mode == "chat":
            return [self._cut(*self._chat(record, lineno))]
        eod = [tokenizer_eod(self.tokenizer)] if self.append_eod else []
        if self.mode == "instruction":
            prompt = self._ids(record, "prompt", lineno)
            response = self._strip_lead(self._ids(record, "response", lineno)) + eod
            return [self._cut(prompt + response, [0] * len(prompt) + [1] * len(response))]
        return [self._cut(self._ids(record, key, lineno) + eod, None) for key in self.keys]

    def encode_chunk(self, chunk: Sequence[Tuple[int, str]]):
        """[(lineno, line)] -> [(lineno, encode(...), bytes)], blank lines left out."""
        out = []
        for lineno, line in chunk:
            docs = self.encode(lineno, line)
            if docs is not None:
                out.append((lineno, docs, len(line)))
        return out


class RecordChecker:
    """Checks chat records before any tokenization (tools/preprocess_data.py's first pass):
    their structure, and that the template renders them (a template may refuse a
    conversation, e.g. roles that do not alternate). Same interface as
    DocumentEncoder.encode_chunk; returns one None per record checked."""

    def __init__(self, encoder: DocumentEncoder):
        self.encoder = encoder

    def encode_chunk(self, chunk: Sequence[Tuple[int, str]]):
        from megatron_drlora.data.chat import chat_messages

        path, prompt_response = self.encoder.path, self.encoder.keys != ["messages"]
        checked = []
        for lineno, line in chunk:
            if line.strip():
                messages = chat_messages(parse_jsonl_line(path, lineno, line), path, lineno,
                                         prompt_response)
                self.encoder.renderer.render(messages, f"{path}:{lineno}")
                checked.append(None)
        return checked


_WORKER_ENCODER: Optional[DocumentEncoder] = None


def init_encoder_worker(encoder: DocumentEncoder) -> None:
    """multiprocessing.Pool initializer: this worker's encoder (its tokenizer built once)."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def encode_chunk_in_worker(chunk: Sequence[Tuple[int, str]]):
    return _WORKER_ENCODER.encode_chunk(chunk)
