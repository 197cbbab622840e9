"""Safetensors I/O of HF checkpoints: lazy reads by tensor name, incremental sharded writes.

Reads never load a whole checkpoint: `HFCheckpoint.get(name)` reads that tensor's bytes from
the shard that holds it with plain file reads (the safetensors header gives its offsets; no
memory map, so pages of tensors already converted do not stay resident), and `get_rows` reads
only the rows of one expert of a fused [E, ...] tensor. Importing a 100 GB model therefore needs
about one layer of memory on top of what the converter builds.

`ShardWriter` writes tensors as they are produced and starts a new shard file once the current
one reaches `max_shard_bytes`; the index (`model.safetensors.index.json`) and the final
`model-0000i-of-0000n.safetensors` names are written at `close()`, when n is known.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import torch

from megatron_drlora.hf.common import HFInteropError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsFile:
    """One .safetensors file read by offsets: the header once, then each tensor's bytes with
    `readinto` into a fresh tensor (https://github.com/huggingface/safetensors, format: an 8-byte
    little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, the
    data)."""

    def __init__(self, path: str):
        import struct

        self.path = path
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 2 ** 20 or size > os.path.getsize(path) - 8:
                raise ValueError(f"header length {size} is not plausible")
            header = json.loads(fh.read(size))
        self.data_start = 8 + size
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        for name, e in header.items():
            if e.get("dtype") not in _TORCH_DTYPES:
                raise ValueError(f"tensor {name}: dtype {e.get('dtype')!r} is not supported")

    def keys(self) -> List[str]:
        return list(self.entries)

    def shape(self, name: str) -> List[int]:
        return list(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def _read(self, name: str, offset: int, nbytes: int, shape) -> torch.Tensor:
        dtype = _TORCH_DTYPES[self.dtype(name)]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with open(self.path, "rb") as fh:
                fh.seek(self.data_start + offset)
                got = fh.readinto(memoryview(buf.numpy()))
            if got != nbytes:
                raise HFInteropError(f"{self.path}: tensor {name} is truncated ({got} of "
                                     f"{nbytes} bytes)")
        return buf.view(dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        begin, end = self.entries[name]["data_offsets"]
        return self._read(name, begin, end - begin, self.shape(name))

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] of a tensor with at least one dimension."""
        import math

        shape = self.shape(name)
        if not shape or not 0 <= index < shape[0]:
            raise HFInteropError(f"{self.path}: tensor {name} {shape} has no row {index}")
        begin, end = self.entries[name]["data_offsets"]
        row = (end - begin) // shape[0]
        if row * shape[0] != end - begin or row != math.prod(shape[1:]) * \
                _TORCH_DTYPES[self.dtype(name)].itemsize:
            raise HFInteropError(f"{self.path}: tensor {name}: data size does not match {shape}")
        return self._read(name, begin + index * row, row, shape[1:])


class HFCheckpoint:
    """A local HF model directory: config.json plus safetensors weights."""

    def __init__(self, path: str, flag: str = "--hf-path", need_weights: bool = True):
        self.path = path
        self.flag = flag
        if not os.path.isdir(path):
            raise HFInteropError(f"{flag} {path}: no such directory")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise HFInteropError(f"{flag} {path}: no config.json (expected a Hugging Face model "
                                 f"directory saved with save_pretrained)")
        with open(config_file) as fh:
            self.config_dict = json.load(fh)
        self._weight_map: Optional[Dict[str, str]] = None
        self._handles: Dict[str, SafetensorsFile] = {}
        if need_weights:
            self.require_weights()

    @property
    def weight_map(self) -> Dict[str, str]:
        """Tensor name -> shard file (read on first use, so a config can be checked first)."""
        if self._weight_map is None:
            self._weight_map = self._find_weights()
        return self._weight_map

    def require_weights(self) -> None:
        if not self.weight_map:
            other = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = (f"; found {other[:3]}: convert them to safetensors first (e.g. load and "
                    f"save_pretrained with safe_serialization)") if other else ""
            raise HFInteropError(f"{self.flag} {self.path}: no *.safetensors weights{hint}")

    def _find_weights(self) -> Dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map", {})
            missing = sorted({f for f in weight_map.values()
                              if not os.path.isfile(os.path.join(self.path, f))})
            if missing:
                raise HFInteropError(f"{self.flag} {self.path}: {INDEX} names missing shard "
                                     f"file(s) {missing[:3]}")
            return dict(weight_map)
        weight_map = {}
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".safetensors") and not name.startswith("adapter_model"):
                try:
                    for key in self._file(name).keys():
                        weight_map[key] = name
                except Exception as e:  # noqa: BLE001 - safetensors raises its own types
                    raise HFInteropError(f"{self.flag} {self.path}/{name}: not a readable "
                                         f"safetensors file ({e})") from e
        return weight_map

    # --- config ---------------------------------------------------------------------------
    def hf_config(self):
        """The transformers config object (defaults and aliases resolved by transformers)."""
        try:
            from transformers import AutoConfig
        except ImportError as e:  # pragma: no cover - the hf extra is missing
            raise HFInteropError("reading a Hugging Face config needs transformers: "
                                 "pip install -e '.[hf]'") from e
        try:
            return AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError) as e:
            model_type = self.config_dict.get("model_type")
            raise HFInteropError(f"{self.flag} {self.path}/config.json: transformers cannot "
                                 f"read it (model_type {model_type!r}: {e})") from e

    # --- tensors --------------------------------------------------------------------------
    def names(self) -> List[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._handles:
            try:
                self._handles[file] = SafetensorsFile(os.path.join(self.path, file))
            except (OSError, ValueError) as e:
                raise HFInteropError(f"{self.flag} {self.path}/{file}: not a readable "
                                     f"safetensors file ({e})") from e
        return self._handles[file]

    def _handle(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise HFInteropError(f"{self.flag} {self.path}: tensor {name!r} not found in the "
                                 f"checkpoint")
        f = self._file(self.weight_map[name])
        if name not in f.entries:
            raise HFInteropError(f"{self.flag} {self.path}: {INDEX} puts {name!r} in "
                                 f"{self.weight_map[name]}, which does not hold it")
        return f

    def shape(self, name: str) -> List[int]:
        return self._handle(name).shape(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ('BF16', 'F32', ...)."""
        return self._handle(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get(name)

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] without reading the rest (e.g. one expert of a fused 3-D tensor)."""
        return self._handle(name).get_rows(name, index)


class ShardWriter:
    """Write HF safetensors shards incrementally; see the module docstring."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 1024 ** 3):
        self.out_dir = out_dir
        self.max_shard_bytes = int(max_shard_bytes)
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.tmp_files: List[str] = []
        self.shard_of: Dict[str, int] = {}
        self.total_bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.shard_of or name in self.pending:
            raise HFInteropError(f"internal error: tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        # A copy: views of one layer tensor (per-expert slices) must not share storage in a
        # safetensors file, and the layer tensor can be freed once its slices are queued.
        self.pending[name] = tensor.detach().cpu().contiguous().clone()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        number = len(self.tmp_files)
        tmp = os.path.join(self.out_dir, f".shard-{number:05d}.safetensors.tmp")
        save_file(self.pending, tmp, metadata={"format": "pt"})
        self.tmp_files.append(tmp)
        for name in self.pending:
            self.shard_of[name] = number
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Give the shards their final names and write the index; returns the file names."""
        self.flush()
        n = len(self.tmp_files)
        if n == 0:
            raise HFInteropError("internal error: no tensors were written")
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                         for i in range(n)]
        for tmp, name in zip(self.tmp_files, names):
            os.replace(tmp, os.path.join(self.out_dir, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[v] for k, v in sorted(self.shard_of.items())}}
            with open(os.path.join(self.out_dir, INDEX), "w") as fh:
                json.dump(index, fh, indent=2)
        return names


def copy_side_files(src: str, dst: str, skip: Iterable[str] = ()) -> List[str]:
    """Copy tokenizer / generation-config files from an HF directory (not weights, not
    config.json, not the index)."""
    import shutil

    skip = set(skip) | {"config.json", INDEX}
    copied = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if (not os.path.isfile(full) or name in skip or name.startswith(".")
                or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5"))):
            continue
        shutil.copy2(full, os.path.join(dst, name))
        copied.append(name)
    return copied


def parse_size(text: Optional[str]) -> int:
    """'2GB', '500MB', '123' -> bytes (for --max-shard-size)."""
    if text is None:
        return 2 * 1024 ** 3
    t = str(text).strip().upper()
    for suffix, mult in (("GIB", 1024 ** 3), ("MIB", 1024 ** 2), ("KIB", 1024), ("GB", 10 ** 9),
                         ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if t.endswith(suffix):
            number = t[:-len(suffix)].strip()
            break
    else:
        number, mult = t, 1
    try:
        value = int(float(number) * mult)
    except ValueError as e:
        raise HFInteropError(f"--max-shard-size {text!r}: expected a size like 2GB or 500MB") \
            from e
    if value <= 0:
        raise HFInteropError(f"--max-shard-size {text!r} must be positive")
    return value
