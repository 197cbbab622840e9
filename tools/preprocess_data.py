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

    # chat data (auto-detected from {"messages": [{"role", "content"}, ...]} records, or
    # --json-keys messages; prompt/response records too with --apply-chat-template), rendered
    # with the chat template of a Hugging Face tokenizer directory (or --chat-template FILE):
    # PREFIX_text_document holds apply_chat_template's ids, the _lossmask 1 on assistant tokens
    python tools/preprocess_data.py --input chat.jsonl --output-prefix data/chat --workers 8 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/my-model --append-eod

Supported --tokenizer-type: SentencePieceTokenizer (the default), GPTSentencePieceTokenizer,
Llama2Tokenizer, HuggingFaceTokenizer and NullTokenizer (eod = --vocab-size - 1 unless
--null-tokenizer-eod-id).

Each dataset also gets PREFIX_..._document.meta.json (tokenizer type, model path and sha256 of
the .model file or of tokenizer.json, vocab size, eod, counts, whether a loss mask exists) so
that training can refuse data made with another tokenizer
(megatron_drlora.data.dataset.check_tokenizer_matches).

Chat records (megatron_drlora/data/chat.py): roles system, user, assistant; every record needs
an assistant turn and non-empty text content, and the template must render it; the whole file is
checked before any tokenization. The ids are exactly transformers' apply_chat_template(messages,
tokenize=True) (the template writes bos if the model wants one; the text is tokenized without
adding special tokens). The assistant tokens are those whose characters fall in an assistant
turn: the template's {% generation %} blocks when it has them, else by prefix rendering (an
assistant turn spans from the end of the rendered conversation before it, generation prompt
included, to the end of the rendered conversation through it, i.e. the reply and the template's
end-of-turn text). With --append-eod the eod is appended unless the last assistant turn (or what
follows it) already holds it (a template that ends replies with eos_token); it is a loss token
when the record ends with an assistant turn. --max-document-length N cuts longer documents
(Megatron's GPTDataset otherwise packs whole documents into --seq-length samples across document
boundaries).

Prompt/response records without --apply-chat-template: prompt and response are tokenized
separately and concatenated; at generation time the prompt is tokenized alone, so the model
sees exactly the prompt tokens it was trained on. Special tokens a tokenizer puts before every
text (a Hugging Face bos) stay on the prompt only.

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
    RecordChecker,
    build_megatron_tokenizer,
    encode_chunk_in_worker,
    init_encoder_worker,
    parse_jsonl_line,
    tokenizer_defaults,
    tokenizer_eod,
    tokenizer_sha256,
)

INSTRUCTION_KEYS = ("prompt", "response")
CHAT_KEYS = ("messages",)
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
        group.add_argument("--chat-template", help="Chat template (Jinja).")
    parser.set_defaults(tokenizer_type="SentencePieceTokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="Path to the input JSONL file.")
    group.add_argument("--json-keys", nargs="+", default=None,
                       help="Fields to tokenize. One dataset per key (Megatron-LM behaviour), "
                       "'prompt response' for instruction data with a loss mask, or 'messages' "
                       "for chat records (rendered with the chat template, loss on assistant "
                       "tokens). Default: 'text', else 'messages' or 'prompt response' when "
                       "the first record has those fields.")
    group.add_argument("--apply-chat-template", action="store_true",
                       help="Render prompt/response records with the chat template too (as "
                       "[system], user, assistant turns) instead of concatenating prompt and "
                       "response. The template is the tokenizer's own, or --chat-template "
                       "(a Jinja file or string).")
    group.add_argument("--split-sentences", action="store_true",
                       help="Not supported (documents are not split); accepted for a clear "
                       "error.")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Accepted for Megatron-LM compatibility; no effect here.")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the end-of-document token (the tokenizer's eod) to every "
                       "document (chat: unless the template already ends the last "
                       "assistant turn with it).")
    group.add_argument("--max-document-length", type=int, default=None,
                       help="Cut documents longer than this many tokens to their first tokens "
                       "(the eod goes with the cut); documents left without a loss token are "
                       "dropped. Default: keep documents whole (Megatron's GPTDataset packs "
                       "them into --seq-length samples across document boundaries).")
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


def resolve_keys(json_keys, first_record: dict, apply_chat_template: bool = False):
    """(mode, keys): 'chat' for messages (or prompt/response with --apply-chat-template),
    'instruction' for prompt+response, else 'text' with one dataset per key."""
    pair = "chat" if apply_chat_template else "instruction"
    if json_keys is None:
        if "text" not in first_record and "messages" in first_record:
            return "chat", list(CHAT_KEYS)
        if "text" not in first_record and all(k in first_record for k in INSTRUCTION_KEYS):
            return pair, list(INSTRUCTION_KEYS)
        if apply_chat_template:
            raise ValueError("--apply-chat-template: the first record has no prompt/response "
                             "(or messages) fields")
        return "text", ["text"]
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys lists a key twice: {' '.join(json_keys)}")
    if list(json_keys) == list(CHAT_KEYS):
        return "chat", list(CHAT_KEYS)
    if sorted(json_keys) == sorted(INSTRUCTION_KEYS):
        return pair, list(INSTRUCTION_KEYS)
    if "messages" in json_keys:
        raise ValueError(f"--json-keys {' '.join(json_keys)}: chat records take --json-keys "
                         "messages alone")
    if apply_chat_template:
        raise ValueError("--apply-chat-template needs prompt/response (or messages) records")
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

    def add(self, token_ids, loss_mask=None) -> None:
        """One document and, with a loss mask dataset, its mask (1 = train on this token)."""
        import numpy

        self.tokens.add_document(numpy.asarray(token_ids, dtype=numpy.int64), [len(token_ids)])
        if self.mask is not None:
            mask = numpy.asarray(loss_mask, dtype=numpy.uint8)
            assert mask.shape[0] == len(token_ids)
            self.mask.add_document(mask, [len(mask)])
            self.num_loss_tokens += int(mask.sum())
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
    # Hugging Face fast tokenizers must not use their own thread pool across a fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    from megatron_drlora.data.chat import read_template_flag

    values = {k: getattr(args, k, v) for k, v in tokenizer_defaults().items()}
    values["pad_vocab_size"] = False
    values["chat_template"] = read_template_flag(getattr(args, "chat_template", None))
    return argparse.Namespace(**values)


class _Progress:
    def __init__(self, interval: int, total_bytes: int = 0):
        self.interval, self.start, self.documents, self.bytes = interval, time.time(), 0, 0
        self.reported = 0
        self.total_bytes = total_bytes

    def add(self, documents: int, nbytes: int) -> None:
        before = self.documents
        self.documents += documents
        self.bytes += nbytes
        if self.interval > 0 and self.documents // self.interval > before // self.interval:
            self.report()

    def report(self) -> None:
        self.reported = self.documents
        elapsed = max(time.time() - self.start, 1e-9)
        share = (f", {100.0 * self.bytes / self.total_bytes:.1f}% of the input"
                 if self.total_bytes else "")
        print(f"processed {self.documents} documents ({self.documents / elapsed:.0f} docs/s, "
              f"{self.bytes / elapsed / 1e6:.2f} MB/s{share})", file=sys.stderr, flush=True)


def _chat_template(args, tokenizer, tokenizer_args) -> str:
    """The chat template chat mode renders with; ValueError before any work when there is
    none or the tokenizer cannot render one (not a Hugging Face directory, not fast)."""
    from megatron_drlora.data.chat import ChatRenderer, hf_tokenizer_of, resolve_template

    if args.tokenizer_type != "HuggingFaceTokenizer":
        raise ValueError(
            f"chat records (or --apply-chat-template) need --tokenizer-type "
            f"HuggingFaceTokenizer with a local Hugging Face tokenizer directory (got "
            f"{args.tokenizer_type}); with a SentencePiece model use prompt/response records "
            "without a template")
    hf = hf_tokenizer_of(tokenizer, args.tokenizer_model)
    template = resolve_template(hf, tokenizer_args.chat_template, args.tokenizer_model)
    ChatRenderer(hf, template)  # refuses slow tokenizers
    return template


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
    if args.max_document_length is not None and args.max_document_length < 1:
        raise ValueError(f"--max-document-length must be >= 1, got {args.max_document_length}")
    mode, keys = resolve_keys(args.json_keys, _first_record(args.input),
                              args.apply_chat_template)
    template = _chat_template(args, tokenizer, tokenizer_args) if mode == "chat" else None
    if mode in ("instruction", "chat") and not args.append_eod:
        print(f"warning: {mode} data without --append-eod: documents have no end-of-document "
              "token, so the model may not learn to stop after a reply", file=sys.stderr)
    token_dtype = _indexed_dataset().DType.optimal_dtype(vocab_size)
    encoder = DocumentEncoder(tokenizer_args, mode, keys, bool(args.append_eod), args.input,
                              tokenizer=tokenizer, chat_template=template,
                              max_length=args.max_document_length)
    if mode == "chat":  # every record checked and rendered before any tokenization
        start, checked = time.time(), 0
        for results in encoded_chunks(RecordChecker(encoder), args.input, args.workers):
            checked += len(results)
        if args.log_interval > 0:
            print(f"checked {checked} chat records in {time.time() - start:.1f} s",
                  file=sys.stderr, flush=True)
    masked = mode in ("instruction", "chat")
    names = ["text"] if masked else keys

    outputs = {}
    skipped = {}
    truncated = dict.fromkeys(names, 0)
    dropped = dict.fromkeys(names, 0)
    progress = _Progress(args.log_interval, os.path.getsize(args.input))
    chunks = encoded_chunks(encoder, args.input, args.workers)
    try:
        for key in names:
            outputs[key] = _Output(dataset_prefix(args.output_prefix, key), token_dtype,
                                   with_mask=masked)
            skipped[key] = 0
        for results in chunks:
            for _, docs, nbytes in results:
                for key, (ids, mask, cut) in zip(names, docs):
                    truncated[key] += cut
                    if not ids:  # a zero-length document carries nothing to train on
                        skipped[key] += 1
                    elif mask is not None and not any(mask):  # truncated before any reply
                        dropped[key] += 1
                    else:
                        outputs[key].add(ids, mask)
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
                       "tokenizer_type", "tokenizer_model", "vocab_size", "pad_vocab_size",
                       "chat_template")}
        metas = {}
        for key, out in outputs.items():
            meta = {
                "format_version": 2,
                "input": os.path.abspath(args.input),
                "json_keys": keys if masked else [key],
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
                "max_document_length": args.max_document_length,
                "truncated_documents": truncated[key],
                "dropped_documents_without_loss_tokens": dropped[key],
                "has_loss_mask": out.mask is not None,
            }
            if template is not None:
                from megatron_drlora.data.chat import template_sha256

                meta["chat_template_sha256"] = template_sha256(template)
                meta["chat_template_source"] = ("--chat-template" if args.chat_template
                                                else "tokenizer")
                meta["assistant_mask_method"] = encoder.renderer.method
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
