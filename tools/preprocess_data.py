#!/usr/bin/env python
"""Tokenize JSONL into Megatron indexed datasets (.bin/.idx), with a prompt loss mask.

Flags follow Megatron-LM's tools/preprocess_data.py, and the tokenizer flags are Megatron-LM's
own (`--tokenizer-type`, `--tokenizer-model`, `--vocab-size`, ...): the tokenizer is built with
megatron-core's `build_tokenizer`, as training builds it, so the ids and the eod token are the
ones training uses. Give the same tokenizer flags here and to training. Examples (from the repo
root):

    # plain text: PREFIX_text_document.{bin,idx}
    python tools/preprocess_data.py --input corpus/mixed.jsonl --output-prefix data/mixed \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model --append-eod

    # a Hugging Face tokenizer (a local directory holding tokenizer.json), 8 processes
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/c --workers 8 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/my-model --append-eod

    # already tokenized: every record holds a JSON list of ids, e.g. {"text": [5, 17, 3]}
    python tools/preprocess_data.py --input ids.jsonl --output-prefix data/ids \
        --tokenizer-type NullTokenizer --vocab-size 32000 --append-eod

    # instruction data (auto-detected from prompt/response records, or --json-keys prompt
    # response): PREFIX_text_document.{bin,idx} holds prompt+response+eod as one document and
    # PREFIX_text_document_lossmask.{bin,idx} holds 0 for prompt tokens, 1 for response tokens
    # and eod, with identical document lengths.

Supported --tokenizer-type: SentencePieceTokenizer (the default), GPTSentencePieceTokenizer,
Llama2Tokenizer, HuggingFaceTokenizer and NullTokenizer (eod = --vocab-size - 1 unless
--null-tokenizer-eod-id).

Each dataset also gets PREFIX_..._document.meta.json (tokenizer type, model path and sha256 of
the .model file or of tokenizer.json, vocab size, eod, counts, whether a loss mask exists) so
that training can refuse data made with another tokenizer
(megatron_drlora.data.dataset.check_tokenizer_matches).

Prompt and response are tokenized separately and concatenated: at generation time the prompt
is tokenized alone, so the model sees exactly the prompt tokens it was trained on. Special
tokens a tokenizer puts before every text (a Hugging Face bos) stay on the prompt only.

--workers N tokenizes in N processes; the output is identical to --workers 1. Outputs are
written under temporary names and renamed only when everything succeeded, the meta file last;
a stale loss mask from an earlier instruction run at the same prefix is removed.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time

try:
    import megatron_drlora  # noqa: F401  (applies the import shim before any megatron module)
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import megatron_drlora  # noqa: F401

from megatron_drlora.data.dataset import LOSSMASK_SUFFIX, META_SUFFIX  # noqa: E402
from megatron_drlora.data.synthetic import JsonlError  # noqa: E402
from megatron_drlora.data.tokenizer import (  # noqa: E402
    PREPROCESS_TOKENIZERS,
    DocumentEncoder,
    build_megatron_tokenizer,
    encode_chunk_in_worker,
    init_encoder_worker,
    parse_jsonl_line,
    tokenizer_defaults,
    tokenizer_eod,
    tokenizer_sha256,
)

INSTRUCTION_KEYS = ("prompt", "response")
CHUNK_LINES = 256
"""Lines per task sent to a worker process."""


def _add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's own --tokenizer-* flags (same names, defaults and meaning as training);
    a minimal set where megatron.training is not installed."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.training.arguments import _add_tokenizer_args as megatron_group
        megatron_group(parser)
    except ImportError:
        group = parser.add_argument_group("tokenizer")
        group.add_argument("--tokenizer-type")
        group.add_argument("--tokenizer-model", help="SentencePiece .model file, or a local "
                           "Hugging Face tokenizer directory.")
        group.add_argument("--vocab-size", type=int, help="NullTokenizer's number of ids.")
        group.add_argument("--null-tokenizer-eod-id", type=int)
    parser.set_defaults(tokenizer_type="SentencePieceTokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="Path to the input JSONL file.")
    group.add_argument("--json-keys", nargs="+", default=None,
                       help="Fields to tokenize. One dataset per key (Megatron-LM behaviour), "
                       "or 'prompt response' for instruction data with a loss mask. Default: "
                       "'text', or 'prompt response' when the first record has those fields.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Not supported (documents are not split); accepted for a clear "
                       "error.")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Accepted for Megatron-LM compatibility; no effect here.")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the end-of-document token (the tokenizer's eod) to every "
                       "document.")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="Output path prefix; writes PREFIX_<key>_document.{bin,idx}.")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Tokenizer processes (output is identical for any number).")
    group.add_argument("--partitions", type=int, default=1,
                       help="Accepted for Megatron-LM compatibility; must be 1.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents (0: never).")
    _add_tokenizer_args(parser)
    parser.epilog = f"Supported --tokenizer-type: {', '.join(PREPROCESS_TOKENIZERS)}."
    return parser


def _indexed_dataset():
    """megatron.core's indexed_dataset module, imported late (megatron-core takes seconds to
    import and warns about missing Transformer Engine / Apex, which do not matter here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM naming: PREFIX_<key>_document (instruction data uses key 'text')."""
    return f"{output_prefix}_{key}_document"


def _first_record(path: str):
    for chunk in _chunks(path):
        for lineno, line in chunk:
            if line.strip():
                return parse_jsonl_line(path, lineno, line)
    raise ValueError(f"--input {path} is empty (no JSON records); nothing to preprocess")


def resolve_keys(json_keys, first_record: dict):
    """(mode, keys): mode 'instruction' for prompt+response, else 'text' with one dataset/key."""
    if json_keys is None:
        if "text" not in first_record and all(k in first_record for k in INSTRUCTION_KEYS):
            return "instruction", list(INSTRUCTION_KEYS)
        return "text", ["text"]
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys lists a key twice: {' '.join(json_keys)}")
    if sorted(json_keys) == sorted(INSTRUCTION_KEYS):
        return "instruction", list(INSTRUCTION_KEYS)
    if any(k in INSTRUCTION_KEYS for k in json_keys):
        raise ValueError(f"--json-keys {' '.join(json_keys)}: 'prompt' and 'response' go "
                         "together (instruction data); give --json-keys prompt response")
    return "text", list(json_keys)


class _Output:
    """One indexed dataset (and optionally its loss mask) written under temporary names."""

    def __init__(self, prefix: str, token_dtype, with_mask: bool):
        import numpy

        IndexedDatasetBuilder = _indexed_dataset().IndexedDatasetBuilder
        self.prefix = prefix
        self.tag = f".tmp{os.getpid()}"
        self.paths = [prefix]
        if with_mask:
            self.paths.append(prefix + LOSSMASK_SUFFIX)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.tokens = IndexedDatasetBuilder(prefix + ".bin" + self.tag, dtype=token_dtype)
        self.mask = (IndexedDatasetBuilder(prefix + LOSSMASK_SUFFIX + ".bin" + self.tag,
                                           dtype=numpy.uint8) if with_mask else None)
        self.num_documents = 0
        self.num_tokens = 0
        self.num_loss_tokens = 0

    def add(self, token_ids, prompt_length: int = 0) -> None:
        """One document; with a loss mask, its first `prompt_length` tokens get mask 0."""
        import numpy

        self.tokens.add_document(numpy.asarray(token_ids, dtype=numpy.int64), [len(token_ids)])
        if self.mask is not None:
            mask = numpy.ones(len(token_ids), dtype=numpy.uint8)
            mask[:prompt_length] = 0
            self.mask.add_document(mask, [len(mask)])
            self.num_loss_tokens += len(token_ids) - prompt_length
        self.num_documents += 1
        self.num_tokens += len(token_ids)

    def finalize(self) -> None:
        self.tokens.finalize(self.prefix + ".idx" + self.tag)
        if self.mask is not None:
            self.mask.finalize(self.prefix + LOSSMASK_SUFFIX + ".idx" + self.tag)

    def temp_files(self):
        return [p + ext + self.tag for p in self.paths for ext in (".bin", ".idx")]

    def commit(self, meta: dict) -> None:
        """Rename into place: data first, the loss mask next, the meta file last."""
        for p in self.paths:
            for ext in (".bin", ".idx"):
                os.replace(p + ext + self.tag, p + ext)
        if self.mask is None:  # a loss mask left by an earlier instruction run would be wrong
            for ext in (".bin", ".idx"):
                stale = self.prefix + LOSSMASK_SUFFIX + ext
                if os.path.exists(stale):
                    os.remove(stale)
        meta_tmp = self.prefix + META_SUFFIX + self.tag
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(meta_tmp, self.prefix + META_SUFFIX)

    def discard(self) -> None:
        for builder in (self.tokens, self.mask):
            if builder is not None and not builder.data_file.closed:
                builder.data_file.close()
        for path in self.temp_files() + [self.prefix + META_SUFFIX + self.tag]:
            if os.path.exists(path):
                os.remove(path)


def _chunks(path: str):
    """[(lineno, line)] lists of CHUNK_LINES lines; a line that is not UTF-8 names itself."""
    chunk = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                chunk.append((lineno, raw.decode("utf-8")))
            except UnicodeDecodeError as err:
                raise JsonlError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
            if len(chunk) == CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _mp_context():
    """fork where available: workers inherit the built tokenizer instead of rebuilding it."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def encoded_chunks(encoder: DocumentEncoder, path: str, workers: int):
    """encode_chunk results in input order, from `workers` processes (in-process for 1).

    At most 4 chunks per worker are in flight, so memory stays flat on any input size.
    """
    if workers <= 1:
        for chunk in _chunks(path):
            yield encoder.encode_chunk(chunk)
        return
    with _mp_context().Pool(workers, initializer=init_encoder_worker,
                            initargs=(encoder,)) as pool:
        pending = collections.deque()
        for chunk in _chunks(path):
            pending.append(pool.apply_async(encode_chunk_in_worker, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenizer_args_of(args: argparse.Namespace) -> argparse.Namespace:
    """The Namespace build_tokenizer reads, from this tool's flags (training's defaults)."""
    values = {k: getattr(args, k, v) for k, v in tokenizer_defaults().items()}
    values["pad_vocab_size"] = False
    return argparse.Namespace(**values)


class _Progress:
    def __init__(self, interval: int):
        self.interval, self.start, self.documents, self.bytes = interval, time.time(), 0, 0
        self.reported = 0

    def add(self, documents: int, nbytes: int) -> None:
        before = self.documents
        self.documents += documents
        self.bytes += nbytes
        if self.interval > 0 and self.documents // self.interval > before // self.interval:
            self.report()

    def report(self) -> None:
        self.reported = self.documents
        elapsed = max(time.time() - self.start, 1e-9)
        print(f"processed {self.documents} documents ({self.documents / elapsed:.0f} docs/s, "
              f"{self.bytes / elapsed / 1e6:.2f} MB/s)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Preprocess; returns {dataset_prefix: meta}. Raises ValueError/OSError with clear text."""
    if args.split_sentences:
        raise ValueError("--split-sentences is not supported; documents are kept whole")
    if args.partitions != 1:
        raise ValueError("--partitions must be 1 (no partitioned preprocessing here)")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input file not found: {args.input}")
    tokenizer_args = tokenizer_args_of(args)
    tokenizer = build_megatron_tokenizer(tokenizer_args)
    vocab_size = int(tokenizer.vocab_size)
    eod = tokenizer_eod(tokenizer)
    if args.append_eod and eod is None:
        raise ValueError(f"--append-eod: the tokenizer {args.tokenizer_model} has no eod "
                         "(eos) token; give it one, or drop --append-eod")
    mode, keys = resolve_keys(args.json_keys, _first_record(args.input))
    if mode == "instruction" and not args.append_eod:
        print("warning: instruction data without --append-eod: the model never learns to "
              "stop after the response", file=sys.stderr)
    token_dtype = _indexed_dataset().DType.optimal_dtype(vocab_size)
    encoder = DocumentEncoder(tokenizer_args, mode, keys, bool(args.append_eod), args.input,
                              tokenizer=tokenizer)
    names = ["text"] if mode == "instruction" else keys

    outputs = {}
    skipped = {}
    progress = _Progress(args.log_interval)
    chunks = encoded_chunks(encoder, args.input, args.workers)
    try:
        for key in names:
            outputs[key] = _Output(dataset_prefix(args.output_prefix, key), token_dtype,
                                   with_mask=mode == "instruction")
            skipped[key] = 0
        for results in chunks:
            for _, docs, nbytes in results:
                for key, (ids, prompt_length) in zip(names, docs):
                    if ids:
                        outputs[key].add(ids, prompt_length)
                    else:  # a zero-length document carries nothing to train on
                        skipped[key] += 1
                progress.add(1, nbytes)
        if args.log_interval > 0 and progress.reported not in (0, progress.documents):
            progress.report()  # the final count
        for key, out in outputs.items():
            if out.num_documents == 0:
                raise ValueError(f"--input {args.input}: no non-empty documents for key "
                                 f"{key!r}; nothing to write")
        for out in outputs.values():
            out.finalize()
        model = os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None
        defaults = tokenizer_defaults()
        options = {k: v for k, v in sorted(vars(tokenizer_args).items())
                   if v != defaults.get(k) and k not in (
                       "tokenizer_type", "tokenizer_model", "vocab_size", "pad_vocab_size")}
        metas = {}
        for key, out in outputs.items():
            meta = {
                "format_version": 2,
                "input": os.path.abspath(args.input),
                "json_keys": keys if mode == "instruction" else [key],
                "mode": mode,
                "tokenizer_type": args.tokenizer_type,
                "tokenizer_model": model,
                "tokenizer_sha256": tokenizer_sha256(model),
                "tokenizer_options": options,
                "vocab_size": vocab_size,
                "eod": eod,
                "append_eod": bool(args.append_eod),
                "token_dtype": token_dtype.__name__,
                "num_documents": out.num_documents,
                "num_tokens": out.num_tokens,
                "skipped_empty_documents": skipped[key],
                "has_loss_mask": out.mask is not None,
            }
            if out.mask is not None:
                meta["num_loss_tokens"] = out.num_loss_tokens
            metas[out.prefix] = meta
        for out in outputs.values():
            out.commit(metas[out.prefix])
    except BaseException:
        chunks.close()  # stops the worker processes
        for out in outputs.values():
            out.discard()
        raise
    return metas


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metas = run(args)
    except (ValueError, OSError) as err:  # JsonlError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    for prefix, meta in metas.items():
        mask = " + loss mask" if meta["has_loss_mask"] else ""
        print(f"wrote {prefix}.bin/.idx{mask}: {meta['num_documents']} documents, "
              f"{meta['num_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
