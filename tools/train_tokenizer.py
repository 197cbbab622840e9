#!/usr/bin/env python
"""Train a small SentencePiece model (BPE or unigram) from JSONL files, for Megatron.

Example (from the repo root):
    python tools/train_tokenizer.py --input data/corpus/mixed.jsonl \
        --json-keys text prompt response --vocab-size 512 --model-prefix data/tok

Writes PREFIX.model (load it with megatron_drlora.data.load_tokenizer or give it to
tools/preprocess_data.py --tokenizer-model) and PREFIX.vocab (one "piece<TAB>score" per id).

Settings and why:
- unk=0, bos=1, eos=2, no pad piece (pad_id=-1): Megatron's GPT data path uses eos as the
  end-of-document token (eod) and pads internally, so a pad piece would be a wasted id that
  could also collide with GPTDataset's pad masking.
- split_digits: every digit is its own token, so arithmetic is learnable digit by digit.
- character_coverage=1.0, no byte fallback: the synthetic corpus is tiny ASCII; byte fallback
  would spend 256 of a ~512 vocabulary on byte pieces.
- Deterministic: sentences are fed in file order from memory (no sampling, no shuffling, one
  thread), and the model is written from memory, so it does not embed input paths. Same inputs
  and flags give a byte-identical PREFIX.model.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

try:
    import megatron_drlora  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.data.synthetic import JsonlError, iter_jsonl  # noqa: E402

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s).")
    parser.add_argument("--json-keys", nargs="+", default=["text", "prompt", "response"],
                        help="Fields whose strings are training text; a record needs at least "
                        "one of them (default: text prompt response).")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="Number of pieces, specials included (default 512).")
    parser.add_argument("--model-prefix", required=True,
                        help="Output path without extension: writes PREFIX.model, PREFIX.vocab.")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece algorithm (default bpe).")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="Share of characters covered by the vocabulary (default 1.0).")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="Longer lines (in bytes) are skipped by SentencePiece.")
    return parser


def collect_sentences(paths, json_keys) -> list:
    """The training strings, in file and line order (determinism comes from this order)."""
    sentences = []
    for path in paths:
        for lineno, record in iter_jsonl(path):
            found = False
            for key in json_keys:
                if key not in record:
                    continue
                value = record[key]
                if not isinstance(value, str):
                    raise JsonlError(f"{path}:{lineno}: field {key!r} must be a string, "
                                     f"got {type(value).__name__}")
                found = True
                if value.strip():
                    sentences.append(value)
            if not found:
                present = ", ".join(sorted(record)) or "none"
                raise JsonlError(f"{path}:{lineno}: none of the --json-keys "
                                 f"({' '.join(json_keys)}) is present (fields: {present})")
    if not sentences:
        raise ValueError(f"no training text in {' '.join(paths)} (empty input); generate a "
                         "corpus first, e.g. python tools/generate_corpus.py")
    return sentences


def train_sentencepiece(sentences, vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 1.0,
                        max_sentence_length: int = 16384) -> bytes:
    """Train and return the serialized model (bytes)."""
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"--vocab-size must be >= 8, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            split_digits=True,
            byte_fallback=False,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size too high" in message:
            hint = message[message.find("Vocabulary"):]
            raise ValueError(f"--vocab-size {vocab_size} does not fit this corpus ({hint}); "
                             "lower --vocab-size or add text") from None
        raise ValueError(f"SentencePiece training failed: {message}") from None
    return model.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args: argparse.Namespace) -> dict:
    """Train and write PREFIX.model / PREFIX.vocab; returns a summary dict."""
    import sentencepiece as spm

    for path in args.input:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input file not found: {path}")
    sentences = collect_sentences(args.input, args.json_keys)
    proto = train_sentencepiece(sentences, args.vocab_size, args.model_type,
                                args.character_coverage, args.max_sentence_length)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                    for i in range(sp.get_piece_size()))
    model_path = args.model_prefix + ".model"
    _atomic_write(model_path, proto)
    _atomic_write(args.model_prefix + ".vocab", vocab.encode("utf-8"))
    return {"model": model_path, "vocab_size": sp.get_piece_size(),
            "sentences": len(sentences), "eod": sp.eos_id()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {summary['model']} (vocab size {summary['vocab_size']}, eod id "
          f"{summary['eod']}) from {summary['sentences']} strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
