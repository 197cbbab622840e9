#!/usr/bin/env python
"""Tokenize JSONL into Megatron indexed datasets (.bin/.idx), with a prompt loss mask.

Flags follow Megatron-LM's tools/preprocess_data.py where they exist, so its documentation
applies. Examples (from the repo root):

    # plain text: PREFIX_text_document.{bin,idx}
    python tools/preprocess_data.py --input corpus/mixed.jsonl --output-prefix data/mixed \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model --append-eod

    # instruction data (auto-detected from prompt/response records, or --json-keys prompt
    # response): PREFIX_text_document.{bin,idx} holds prompt+response+eod as one document and
    # PREFIX_text_document_lossmask.{bin,idx} holds 0 for prompt tokens, 1 for response tokens
    # and eod, with identical document lengths.

Each dataset also gets PREFIX_..._document.meta.json (tokenizer path and sha256, vocab size,
counts, whether a loss mask exists) so that training can refuse data made with another
tokenizer (megatron_drlora.data.dataset.check_tokenizer_matches).

Prompt and response are tokenized separately and concatenated: at generation time the prompt
is tokenized alone, so the model sees exactly the prompt tokens it was trained on.

Outputs are written under temporary names and renamed only when everything succeeded, the
meta file last; a stale loss mask from an earlier instruction run at the same prefix is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.data.synthetic import get_field, iter_jsonl  # noqa: E402
from megatron_drlora.data.tokenizer import load_tokenizer  # noqa: E402

SUPPORTED_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
INSTRUCTION_KEYS = ("prompt", "response")
LOSSMASK_SUFFIX = "_lossmask"
META_SUFFIX = ".meta.json"


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
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                       help=f"One of {', '.join(SUPPORTED_TOKENIZERS)}.")
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file.")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the end-of-document token (eos) to every document.")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="Output path prefix; writes PREFIX_<key>_document.{bin,idx}.")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Accepted for Megatron-LM compatibility; tokenization here is "
                       "single-process (small corpora).")
    group.add_argument("--partitions", type=int, default=1,
                       help="Accepted for Megatron-LM compatibility; must be 1.")
    group.add_argument("--log-interval", type=int, default=100000,
                       help="Print progress every this many documents.")
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
    for _, record in iter_jsonl(path):
        return record
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

    def add(self, token_ids, mask=None) -> None:
        import numpy

        self.tokens.add_document(numpy.asarray(token_ids), [len(token_ids)])
        if self.mask is not None:
            self.mask.add_document(numpy.asarray(mask, dtype=numpy.uint8), [len(mask)])
            self.num_loss_tokens += int(sum(mask))
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


def run(args: argparse.Namespace) -> dict:
    """Preprocess; returns {dataset_prefix: meta}. Raises ValueError/OSError with clear text."""
    if args.split_sentences:
        raise ValueError("--split-sentences is not supported; documents are kept whole")
    if args.partitions != 1:
        raise ValueError("--partitions must be 1 (no partitioned preprocessing here)")
    if args.tokenizer_type not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} is not supported by this "
                         f"tool; use one of {', '.join(SUPPORTED_TOKENIZERS)} (for other "
                         "tokenizers use Megatron-LM's tools/preprocess_data.py)")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input file not found: {args.input}")
    tokenizer = load_tokenizer(args.tokenizer_model)
    mode, keys = resolve_keys(args.json_keys, _first_record(args.input))
    if mode == "instruction" and not args.append_eod:
        print("warning: instruction data without --append-eod: the model never learns to "
              "stop after the response", file=sys.stderr)
    token_dtype = _indexed_dataset().DType.optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod

    outputs = {}
    skipped = {}
    start = time.time()
    try:
        for key in (["text"] if mode == "instruction" else keys):
            outputs[key] = _Output(dataset_prefix(args.output_prefix, key), token_dtype,
                                   with_mask=mode == "instruction")
            skipped[key] = 0
        records = 0
        for lineno, record in iter_jsonl(args.input):
            records += 1
            if mode == "instruction":
                prompt = tokenizer.tokenize(get_field(record, "prompt", args.input, lineno))
                response = tokenizer.tokenize(get_field(record, "response", args.input, lineno))
                if args.append_eod:
                    response = response + [eod]
                if not prompt and not response:
                    skipped["text"] += 1
                    continue
                outputs["text"].add(prompt + response, [0] * len(prompt) + [1] * len(response))
            else:
                for key in keys:
                    ids = tokenizer.tokenize(get_field(record, key, args.input, lineno))
                    if args.append_eod:
                        ids.append(eod)
                    if not ids:  # a zero-length document carries nothing to train on
                        skipped[key] += 1
                        continue
                    outputs[key].add(ids)
            if args.log_interval > 0 and records % args.log_interval == 0:
                print(f"processed {records} documents ({time.time() - start:.1f} s)",
                      file=sys.stderr)
        for key, out in outputs.items():
            if out.num_documents == 0:
                raise ValueError(f"--input {args.input}: no non-empty documents for key "
                                 f"{key!r}; nothing to write")
        for out in outputs.values():
            out.finalize()
        metas = {}
        for key, out in outputs.items():
            meta = {
                "format_version": 1,
                "input": os.path.abspath(args.input),
                "json_keys": keys if mode == "instruction" else [key],
                "mode": mode,
                "tokenizer_type": args.tokenizer_type,
                "tokenizer_model": tokenizer.model_path,
                "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
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
