"""Train/valid/test GPT datasets from `--data-path`, with the prompt loss mask applied.

Why this module exists instead of calling megatron-core directly:
- instruction data needs the loss on response tokens only. tools/preprocess_data.py writes a
  parallel `<prefix>_lossmask` indexed dataset; `LossMaskedGPTDataset` reads it through the
  same document/sample/shuffle indices as the tokens, so the mask stays aligned whatever
  packing and shuffling GPTDataset does;
- it must run on a CPU box without torch.distributed (tests, tools) as well as under a real
  multi-rank job, which takes two workarounds noted where they are made;
- data made with another tokenizer must fail loudly (`check_tokenizer_matches`), not train on
  garbage ids.

megatron-core wheels (0.16.1 to 0.19) ship their C++ index helpers prebuilt (`helpers_cpp*.so`
in megatron/core/datasets), so nothing is compiled at runtime; `ensure_dataset_helpers` checks
for it and says what to do when a source install lacks it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy
import torch

with warnings.catch_warnings():  # megatron.core warns about missing TE/Apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

LOSSMASK_SUFFIX = "_lossmask"
"""`<prefix>_lossmask.{bin,idx}`: per-token 1 = train on this token (as a label), 0 = do not."""

META_SUFFIX = ".meta.json"
"""`<prefix>.meta.json`: written by tools/preprocess_data.py (tokenizer identity, counts)."""


class DataConfigError(ValueError):
    """A data setting or data file is unusable; the message names the flag/file and the fix."""


class TokenizerMismatchError(DataConfigError):
    """The data was tokenized with a different tokenizer than the one given for training."""


# --------------------------------------------------------------------------------------------
# Setup checks
# --------------------------------------------------------------------------------------------


def ensure_dataset_helpers() -> None:
    """Check that megatron-core's compiled index helpers (`helpers_cpp`) can be imported.

    pip wheels of megatron-core (0.16.1 included) ship `helpers_cpp.*.so`; Megatron-LM source
    checkouts compile it with `make -C megatron/core/datasets`. Nothing is compiled here: a
    compiler and pybind11 are not guaranteed on a training box, and compiling into
    site-packages from several ranks at once races.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as err:
        import megatron.core.datasets as pkg

        directory = os.path.dirname(pkg.__file__)
        raise DataConfigError(
            f"megatron-core's C++ dataset helpers are missing ({err}). Reinstall the wheel "
            "(pip install --force-reinstall megatron-core), or compile them once: pip install "
            f"pybind11 && cd {directory} && g++ -O3 -Wall -shared -std=c++11 -fPIC "
            "$(python -m pybind11 --includes) helpers.cpp "
            "-o helpers_cpp$(python3-config --extension-suffix)"
        ) from None


def parse_data_path(
        data_path: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's `--data-path [w1] p1 [w2] p2 ...` -> (prefixes, weights or None).

    Either every prefix has a weight in front of it or none has; weights must be > 0.
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    items = [x for x in items if x.strip()]
    if not items:
        raise DataConfigError("--data-path is empty; give one or more dataset prefixes "
                              "(PREFIX_text_document written by tools/preprocess_data.py)")

    def _number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    numbers = [_number(x) for x in items]
    if all(n is None for n in numbers):
        return items, None
    if len(items) % 2 or any(n is None for n in numbers[0::2]) or any(
            n is not None for n in numbers[1::2]):
        raise DataConfigError(
            f"--data-path {' '.join(items)}: expected either prefixes only or weight/prefix "
            "pairs, e.g. --data-path 0.7 data/a_text_document 0.3 data/b_text_document")
    weights = [float(n) for n in numbers[0::2]]
    if any(w <= 0 for w in weights):
        raise DataConfigError(f"--data-path weights must be > 0, got {weights}")
    return items[1::2], weights


def check_dataset_prefix(prefix: str) -> None:
    """Raise DataConfigError unless PREFIX.bin and PREFIX.idx exist, suggesting the fix."""
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return
    hint = ""
    if os.path.isfile(prefix + "_text_document.bin"):
        hint = f" Did you mean {prefix}_text_document?"
    elif prefix.endswith((".bin", ".idx")):
        hint = f" Give the prefix without the extension: {prefix[:-4]}"
    raise DataConfigError(
        f"--data-path: no indexed dataset at {prefix} ({prefix}.bin/.idx not found).{hint} "
        "Create it with tools/preprocess_data.py --output-prefix P (which writes "
        "P_text_document.bin/.idx).")


def read_meta(prefix: str) -> Optional[dict]:
    """The sidecar written by tools/preprocess_data.py, or None for data made elsewhere."""
    path = prefix + META_SUFFIX
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _tokenizer_path(tokenizer) -> Optional[str]:
    """The model file or Hugging Face directory behind `tokenizer` (ours, Megatron's, or
    setup._TokenizerIdentity), if it names one that exists."""
    for attr in ("model_path", "tokenizer_path", "path"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, str) and value and os.path.exists(value):
            return value
    return None


def _tokenizer_sha256(tokenizer) -> Optional[str]:
    sha = getattr(tokenizer, "sha256", None)
    if isinstance(sha, str):
        return sha
    from megatron_drlora.data.tokenizer import tokenizer_sha256

    return tokenizer_sha256(_tokenizer_path(tokenizer))


def _max_token_id(prefix: str) -> int:
    """Largest token id in PREFIX.bin, read in chunks (memory stays flat for large data)."""
    dtype = IndexedDataset(prefix).index.dtype
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    chunk = 1 << 24
    result = -1
    for start in range(0, data.shape[0], chunk):
        result = max(result, int(data[start:start + chunk].max()))
    del data
    return result


def _ids_only(tokenizer) -> bool:
    """Whether `tokenizer` only knows token ids (Megatron's NullTokenizer, or an identity that
    says so), so data made by any tokenizer fits it when its ids are in range."""
    flag = getattr(tokenizer, "ids_only", None)
    if flag is not None:
        return bool(flag)
    library = getattr(tokenizer, "_tokenizer", tokenizer)
    return type(library).__name__ == "NullTokenizer"


def check_tokenizer_matches(prefix: str, tokenizer, scan_tokens: bool = True) -> None:
    """Raise TokenizerMismatchError if `prefix` was not tokenized with `tokenizer`.

    `tokenizer`: anything with `vocab_size` and `eod` (None: it has none) and optionally a
    `model_path`/`path` (a SentencePiece .model file or a Hugging Face directory) or `sha256`:
    this package's SentencePieceTokenizer, a Megatron tokenizer from `build_tokenizer`
    (NullTokenizer included), or megatron_lm.setup's adapter of one.

    Uses the meta sidecar when present (vocab size, eod id, and the sha256 of the .model file
    or tokenizer.json when both sides have a model file), and with `scan_tokens` also checks
    that every token id is < tokenizer.vocab_size, which catches data from another tokenizer
    even without a sidecar (e.g. made by Megatron-LM's own tool).

    An ids-only training tokenizer (NullTokenizer, e.g. `--tokenizer-type NullTokenizer
    --vocab-size V` with a converted base) takes data made by a real tokenizer when the data's
    vocabulary fits in V; its eod must equal the data's only where the run uses the eod
    (`eod_used` on the identity: --eod-mask-loss, --reset-position-ids,
    --reset-attention-mask; default True), and the fix is then --null-tokenizer-eod-id.
    """
    from megatron_drlora.data.tokenizer import tokenizer_eod

    check_dataset_prefix(prefix)
    fix = ("re-run tools/preprocess_data.py with the training tokenizer, or train with the "
           "tokenizer the data was made with (--tokenizer-type/--tokenizer-model)")
    if tokenizer is None or getattr(tokenizer, "vocab_size", None) is None:
        raise TokenizerMismatchError(
            f"{prefix}: no training tokenizer to check the data against (got {tokenizer!r}); "
            "give --tokenizer-type and --tokenizer-model, or --tokenizer-type NullTokenizer "
            "--vocab-size V")
    vocab_size = int(tokenizer.vocab_size)
    meta = read_meta(prefix)
    if (meta is not None and _ids_only(tokenizer)
            and meta.get("tokenizer_type") != "NullTokenizer"):
        made_with = meta.get("tokenizer_model") or meta.get("tokenizer_type")
        if int(meta["vocab_size"]) > vocab_size:
            raise TokenizerMismatchError(
                f"{prefix}: made with a tokenizer of vocab size {meta['vocab_size']} "
                f"({made_with}), more than --vocab-size {vocab_size} of the NullTokenizer; "
                f"{fix}")
        eod = tokenizer_eod(tokenizer)
        if (getattr(tokenizer, "eod_used", True) and meta.get("eod") is not None
                and meta.get("append_eod", True) and eod != int(meta["eod"])):
            raise TokenizerMismatchError(
                f"{prefix}: documents end with token {meta['eod']} ({made_with}) but the "
                f"NullTokenizer's eod is {eod}, and this run uses the eod (--eod-mask-loss / "
                f"--reset-position-ids / --reset-attention-mask); add --null-tokenizer-eod-id "
                f"{meta['eod']}")
        meta = None  # nothing else to compare with an ids-only tokenizer
    if meta is not None:
        made_with = meta.get("tokenizer_model") or meta.get("tokenizer_type")
        if int(meta["vocab_size"]) != vocab_size:
            raise TokenizerMismatchError(
                f"{prefix}: made with a tokenizer of vocab size {meta['vocab_size']} "
                f"({made_with}), training tokenizer has {vocab_size}; {fix}")
        sha = _tokenizer_sha256(tokenizer) if meta.get("tokenizer_sha256") else None
        if sha is not None and meta["tokenizer_sha256"] != sha:
            raise TokenizerMismatchError(
                f"{prefix}: made with tokenizer {made_with} (sha256 "
                f"{meta['tokenizer_sha256'][:12]}...), training tokenizer "
                f"{_tokenizer_path(tokenizer)} has sha256 {sha[:12]}...; {fix}")
        eod = tokenizer_eod(tokenizer)
        if meta.get("eod") is not None and meta.get("append_eod", True) and (
                eod is None or int(meta["eod"]) != eod):
            raise TokenizerMismatchError(
                f"{prefix}: documents end with token {meta['eod']} but the training "
                f"tokenizer's eod is {eod}; {fix}")
    if scan_tokens:
        top = _max_token_id(prefix)
        if top >= vocab_size:
            raise TokenizerMismatchError(
                f"{prefix}: contains token id {top} >= vocab size {vocab_size} of the "
                f"training tokenizer; {fix}")


def _check_loss_mask_files(prefix: str) -> bool:
    """Whether `prefix` has a loss mask; DataConfigError when meta and files disagree."""
    mask_prefix = prefix + LOSSMASK_SUFFIX
    present = [os.path.isfile(mask_prefix + ext) for ext in (".bin", ".idx")]
    if any(present) and not all(present):
        raise DataConfigError(f"{mask_prefix}: only one of .bin/.idx exists; re-run "
                              "tools/preprocess_data.py")
    meta = read_meta(prefix)
    if meta is not None and bool(meta.get("has_loss_mask")) != all(present):
        state = "exists" if all(present) else "is missing"
        raise DataConfigError(f"{prefix}: the meta file says has_loss_mask="
                              f"{meta.get('has_loss_mask')} but {mask_prefix}.bin/.idx {state}; "
                              "re-run tools/preprocess_data.py for this prefix")
    return all(present)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class LossMaskedGPTDataset(GPTDataset):
    """GPTDataset whose `loss_mask` is also 0 where the label is a prompt token.

    The mask is read from `<prefix>_lossmask` (same document lengths as the tokens) through
    this dataset's own document/sample/shuffle indices. It multiplies GPTDataset's loss_mask,
    so Megatron's semantics stay: padding masked, and with eod_mask_loss the position whose
    input is eod masked. loss_mask[i] belongs to labels[i] = text[i + 1], so it takes
    mask[i + 1]. Prefixes without a `_lossmask` behave exactly like GPTDataset.
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples,
                 index_split, config) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)
        self.loss_mask_dataset: Optional[IndexedDataset] = None
        if dataset_path is not None and _check_loss_mask_files(dataset_path):
            mask = IndexedDataset(dataset_path + LOSSMASK_SUFFIX, mmap=config.mmap_bin_files)
            if not numpy.array_equal(mask.sequence_lengths, indexed_dataset.sequence_lengths):
                raise DataConfigError(
                    f"{dataset_path}{LOSSMASK_SUFFIX}: document lengths differ from "
                    f"{dataset_path}; the two were not written together. Re-run "
                    "tools/preprocess_data.py for this prefix")
            self.loss_mask_dataset = mask

    def gather(self, low_level: IndexedDataset, idx: int) -> numpy.ndarray:
        """The values of `low_level` at sample `idx`'s token positions (-1 for padding).

        Walks the same (document, offset) span that GPTDataset reads the tokens from; the
        tests check that gathering from the token dataset reproduces the sample's tokens.
        """
        if self.shuffle_index is None:  # indices mapped on first access (defer_npy_index_mmap)
            self._query_document_sample_shuffle_indices(idx)
        i = self.shuffle_index[idx]
        doc_beg, off_beg = (int(x) for x in self.sample_index[i])
        doc_end, off_end = (int(x) for x in self.sample_index[i + 1])
        extra = int(self.config.add_extra_token_to_sequence)
        parts = []
        for pos in range(doc_beg, doc_end + 1):
            start = off_beg if pos == doc_beg else 0
            length = off_end - start + extra if pos == doc_end else None
            parts.append(low_level.get(self.document_index[pos], offset=start, length=length))
        values = numpy.concatenate(parts).astype(numpy.int64)
        want = self.config.sequence_length + extra
        if values.shape[0] < want:
            values = numpy.concatenate([values, numpy.full(want - values.shape[0], -1)])
        return values

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        if self.loss_mask_dataset is None or idx is None:  # idx None: already all zero
            return sample
        mask = self.gather(self.loss_mask_dataset, idx)
        if self.config.add_extra_token_to_sequence:
            label_mask = mask[1:]
        else:  # labels are text rolled by one, last label is padding
            label_mask = numpy.append(mask[1:], 0)
        keep = torch.from_numpy(label_mask == 1).to(sample["loss_mask"].dtype)
        sample["loss_mask"] = sample["loss_mask"] * keep
        return sample


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def parse_split(split: Union[str, Sequence[float]]) -> List[float]:
    """'98,2,0' -> normalized [0.98, 0.02, 0.0]; DataConfigError names --split."""
    text = split if isinstance(split, str) else ",".join(str(x) for x in split)
    if not re.fullmatch(r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*", text):
        raise DataConfigError(f"--split {text!r}: expected up to three non-negative numbers, "
                              "e.g. --split 98,2,0 (train, valid, test)")
    if sum(float(x) for x in text.split(",")) <= 0:
        raise DataConfigError(f"--split {text!r}: the shares sum to 0")
    return parse_and_normalize_split(text)


def train_valid_test_num_samples(train_iters: int, global_batch_size: int,
                                 eval_interval: int, eval_iters: int) -> List[int]:
    """Samples to build per split, as Megatron-LM computes them for iteration-based training."""
    evals = (train_iters // eval_interval + 1) * eval_iters if eval_interval > 0 else 0
    return [train_iters * global_batch_size, evals * global_batch_size,
            eval_iters * global_batch_size]


def _check_splits_nonempty(prefixes: Sequence[str], split_matrix, sizes) -> None:
    """Refuse a used split with no tokens: GPTDataset's epoch count loops forever on it (even
    for 0 requested samples, since it always wants sequence_length + 1 tokens)."""
    names = ("train", "valid", "test")
    for prefix in prefixes:
        indexed = IndexedDataset(prefix)
        # Copy: the array is a view of the .idx mmap, which closes when `indexed` is freed.
        lengths = numpy.array(indexed.sequence_lengths)
        del indexed
        n = lengths.shape[0]
        for i, bookends in enumerate(split_matrix):
            if bookends is None:
                continue
            beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
            if end <= beg or int(lengths[beg:end].sum()) == 0:
                raise DataConfigError(
                    f"--split gives the {names[i]} split {end - beg} of the {n} documents of "
                    f"{prefix}, i.e. no tokens; use more documents, a larger {names[i]} share "
                    f"in --split, or a 0 share for it")


def blend_cache_needs_process_group() -> bool:
    """Whether megatron-core's BlendedDataset fails to cache without torch.distributed.

    0.16.1 calls torch.distributed.get_rank() on a cache miss whenever a cache path is set;
    0.19 asks is_initialized() first. Unknown source: assume the old behaviour.
    """
    import inspect

    from megatron.core.datasets.blended_dataset import BlendedDataset

    try:
        source = inspect.getsource(BlendedDataset._build_indices)
    except (OSError, TypeError, AttributeError):
        return True
    return "get_rank()" in source and "is_initialized()" not in source


def _default_is_built_on_rank() -> bool:
    """Every rank builds its own copy (cheap for our data) so no batch broadcast is needed."""
    return True


def build_gpt_datasets(
    data_path: Union[str, Sequence[str]],
    split: Union[str, Sequence[float]],
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: Sequence[Optional[int]],
    *,
    data_cache_path: Optional[str] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = True,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    check_tokenizer: bool = True,
    mmap_bin_files: bool = True,
) -> Tuple[Optional[torch.utils.data.Dataset], ...]:
    """(train, valid, test) datasets; a split with share 0 in `split` gives None.

    num_samples: samples per split ([train, valid, test], see train_valid_test_num_samples);
    required for weighted blends; None entries build exactly one epoch of that split.
    tokenizer: anything with vocab_size, eod and unique_identifiers (load_tokenizer's result).
    data_cache_path: where GPTDataset caches its index arrays (default: Megatron's, a `cache`
    folder under each prefix path).
    is_built_on_rank: default True on every rank, so each rank reads its own batches.
    """
    ensure_dataset_helpers()
    if seq_length <= 0:
        raise DataConfigError(f"--seq-length must be > 0, got {seq_length}")
    num_samples = list(num_samples)
    if len(num_samples) != 3:
        raise DataConfigError(f"num_samples must be [train, valid, test], got {num_samples}")
    prefixes, weights = parse_data_path(data_path)
    split_vector = parse_split(split)
    for prefix in prefixes:
        check_dataset_prefix(prefix)
        if check_tokenizer:
            check_tokenizer_matches(prefix, tokenizer)
        _check_loss_mask_files(prefix)
    split_matrix = convert_split_vector_to_split_matrix(split_vector)
    _check_splits_nonempty(prefixes, split_matrix, num_samples)
    if weights is not None and any(
            s is None for s, b in zip(num_samples, split_matrix) if b is not None):
        raise DataConfigError("--data-path with weights needs a sample count for every used "
                              "split (num_samples must not contain None)")

    blended = len(prefixes) > 1 or weights is not None
    if (blended and data_cache_path and not torch.distributed.is_initialized()
            and blend_cache_needs_process_group()):
        logger.warning("torch.distributed is not initialized: data_cache_path is ignored for "
                       "this blend; GPTDataset indices go to megatron's default <prefix>/cache "
                       "and the blend indices are rebuilt (cheap)")
        data_cache_path = None

    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=(prefixes, weights),
        split=",".join(str(x) for x in split_vector),
        path_to_cache=data_cache_path,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(
        LossMaskedGPTDataset, num_samples, is_built_on_rank or _default_is_built_on_rank, config)
    train, valid, test = builder.build()
    return train, valid, test


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class PretrainingBatchSampler:
    """Megatron's pretraining order: global batches in dataset order, each data-parallel rank
    taking its contiguous micro-batch slice; resumes at `consumed_samples`.

    The datasets are already shuffled by GPTDataset/BlendedDataset, so reading them in order
    is what Megatron-LM's MegatronPretrainingSampler does. `cyclic` restarts at 0 when the
    dataset is exhausted (handy for validation); otherwise the last partial batch is dropped.
    """

    def __init__(self, total_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, consumed_samples: int = 0, cyclic: bool = False):
        if micro_batch_size <= 0:
            raise DataConfigError(f"--micro-batch-size must be > 0, got {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(f"data-parallel rank {data_parallel_rank} not in "
                                  f"[0, {data_parallel_size})")
        self.total = int(total_samples)
        self.mbs = int(micro_batch_size)
        self.rank = int(data_parallel_rank)
        self.window = self.mbs * int(data_parallel_size)
        self.consumed = int(consumed_samples)
        self.cyclic = cyclic
        if self.total < self.window:
            raise DataConfigError(f"dataset has {self.total} samples, fewer than one step of "
                                  f"micro-batch {self.mbs} x data-parallel {data_parallel_size}")

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed % self.total if self.cyclic else self.consumed
        while True:
            if start + self.window > self.total:
                if not self.cyclic:
                    return
                start = 0
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += self.window


def build_data_iterator(dataset, micro_batch_size: int, data_parallel_rank: int = 0,
                        data_parallel_size: int = 1, consumed_samples: int = 0,
                        cyclic: bool = False, num_workers: int = 0) -> Optional[Iterator]:
    """Iterator of collated micro-batches (dicts of tensors) for `get_batch`; None passes
    through so ranks without a dataset keep Megatron's `data_iterator=None` convention."""
    if dataset is None:
        return None
    sampler = PretrainingBatchSampler(len(dataset), micro_batch_size, data_parallel_rank,
                                      data_parallel_size, consumed_samples, cyclic)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         num_workers=num_workers, pin_memory=False,
                                         persistent_workers=num_workers > 0)
    return iter(loader)


def get_batch(data_iterator, device: Optional[Union[str, torch.device]] = None):
    """Next micro-batch as (tokens, labels, loss_mask, attention_mask, position_ids).

    Same order as Megatron-LM's pretrain_gpt.get_batch. attention_mask is [b, 1, s, s] bool
    (True = masked) or None when the datasets were built with create_attention_mask=False.
    A None iterator gives five Nones (pipeline stages without data).
    """
    if data_iterator is None:
        return None, None, None, None, None
    batch = next(data_iterator)
    device = torch.device(device) if device is not None else None

    def _move(key):
        value = batch.get(key)
        if value is None or device is None:
            return value
        return value.to(device, non_blocking=True)

    return (_move("tokens"), _move("labels"), _move("loss_mask"), _move("attention_mask"),
            _move("position_ids"))
