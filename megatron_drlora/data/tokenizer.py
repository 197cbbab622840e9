"""A SentencePiece tokenizer with the small interface Megatron's GPT data path needs.

Why not Megatron's own tokenizer classes: megatron-core's `MegatronTokenizer` API changed
between 0.16 and 0.19, and the legacy classes print deprecation warnings. GPTDataset only reads
`vocab_size`, `eod` (and optionally `pad`) and hashes `unique_identifiers` into its index-cache
names, so a thin wrapper is enough and stays stable across versions.

`unique_identifiers` includes the model file's sha256: retraining the tokenizer in place
changes the cache key, so Megatron never reuses sample indices built for other token ids.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List


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
