"""SLURM's compact value syntax: node lists, tasks per node, GPU counts.

SLURM writes `node[01-04]`, `4(x2),2` and `gpu:a100:8`; these functions expand them exactly as
SLURM means them (order, zero padding), because the first host of the list hosts rank 0 and the
rendezvous. Every malformed value raises `SlurmEnvError` naming it. No torch, no Megatron.
"""

from __future__ import annotations

import re
from typing import List

# A bracket range larger than this is a typo (or an attack on memory), not a cluster.
_MAX_HOSTS = 100_000


class SlurmEnvError(ValueError):
    """The launch environment is missing a variable or its variables contradict each other."""


def expand_hostlist(spec: str) -> List[str]:
    """Expand a SLURM node list (``node[01-04]``, ``a,b``, ``gpu[1-3,7],cpu05``) to host names.

    Commas split hosts only outside brackets; inside brackets they separate ranges. Zero
    padding is kept (the width of a range is that of its lower bound, as SLURM writes it), and
    several bracket groups in one name expand as a product, first group outermost
    (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2). The order is SLURM's: the first host is the
    node with SLURM_NODEID 0, which hosts rank 0 and the rendezvous.
    """
    if not isinstance(spec, str):
        raise SlurmEnvError(f"host list must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise SlurmEnvError("host list is empty")
    hosts: List[str] = []
    for item in _split_outside_brackets(text, spec):
        item = item.strip()
        if not item:
            raise SlurmEnvError(f"host list {spec!r} has an empty entry (stray comma?)")
        hosts.extend(_expand_host_pattern(item, spec))
        if len(hosts) > _MAX_HOSTS:
            raise SlurmEnvError(f"host list {spec!r} expands to more than {_MAX_HOSTS} hosts")
    return hosts


def _split_outside_brackets(text: str, spec: str) -> List[str]:
    parts, start, depth = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise SlurmEnvError(f"host list {spec!r}: nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SlurmEnvError(f"host list {spec!r}: ']' without '[' at position {i}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmEnvError(f"host list {spec!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_host_pattern(item: str, spec: str) -> List[str]:
    names = [""]
    for piece in re.split(r"(\[[^\]]*\])", item):
        if not piece:
            continue
        if piece.startswith("["):
            values = _expand_bracket(piece[1:-1], spec)
        else:
            if re.search(r"\s", piece):
                raise SlurmEnvError(f"host list {spec!r}: host name {piece!r} contains a space")
            values = [piece]
        names = [n + v for n in names for v in values]
        if len(names) > _MAX_HOSTS:
            raise SlurmEnvError(f"host list {spec!r} expands to more than {_MAX_HOSTS} hosts")
    return names


def _expand_bracket(body: str, spec: str) -> List[str]:
    if not body.strip():
        raise SlurmEnvError(f"host list {spec!r}: empty brackets '[]'")
    values: List[str] = []
    for part in body.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise SlurmEnvError(f"host list {spec!r}: {part!r} is not a number or range N-M")
        lo_text, hi_text = m.group(1), m.group(2)
        lo = int(lo_text)
        hi = int(hi_text) if hi_text is not None else lo
        if hi < lo:
            raise SlurmEnvError(f"host list {spec!r}: range {part!r} runs backwards")
        if hi - lo + 1 > _MAX_HOSTS:
            raise SlurmEnvError(f"host list {spec!r}: range {part!r} is implausibly large")
        width = len(lo_text)
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return values


def parse_tasks_per_node(spec: str) -> List[int]:
    """Expand SLURM's compressed tasks-per-node (``4(x2),2`` -> [4, 4, 2]), one entry per node."""
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmEnvError(f"tasks per node {spec!r}: cannot read {part!r} "
                                f"(expected N or N(xK))")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def parse_gpu_count(spec: str, name: str = "GPU count") -> int:
    """GPUs per node from ``8``, ``a100:8``, ``gpu:a100:4`` or ``a100:2,v100:2`` (summed)."""
    text = re.sub(r"\([^)]*\)", "", spec)  # drop "(IDX:0-3)" annotations
    total = 0
    for item in text.split(","):
        field = item.strip().split(":")[-1]
        if not field.isdigit():
            raise SlurmEnvError(f"{name}={spec!r}: cannot read a GPU count (expected N or TYPE:N)")
        total += int(field)
    return total
