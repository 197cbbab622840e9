"""Shared helpers of the HF interop tools: the error type, a world-size-1 process group for
tools that run without torchrun, and checkpoint path resolution."""

from __future__ import annotations

import os
from typing import Optional


class HFInteropError(RuntimeError):
    """A conversion or export cannot proceed; the message names the file, flag or config key."""


def checkpoint_errors() -> tuple:
    """What a failed dist_checkpointing read raises: torch.distributed.checkpoint's
    CheckpointException derives from BaseException, so `except Exception` misses it."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return (Exception,)
    return (Exception, CheckpointException)


def ensure_single_process_group() -> None:
    """A gloo world of size 1 for tools run as plain `python` (dist_checkpointing needs a
    process group). Under torchrun the launcher's environment is used instead."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group(backend="gloo")
        return
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend="gloo", rank=0, world_size=1)


def resolve_iteration_dir(path: str, flag: str, iteration: Optional[int] = None) -> str:
    """A save root (with latest_checkpointed_iteration.txt) or an iter_* directory -> the
    iteration directory; errors name the flag."""
    from megatron_drlora.checkpoint import CheckpointError, resolve

    try:
        return resolve(path, flag, iteration)
    except CheckpointError as e:
        raise HFInteropError(str(e)) from None


# --- hub ids ------------------------------------------------------------------------------
_HUB_ID = None


def looks_like_hub_id(name) -> bool:
    """'org/name' or 'name' as the Hugging Face hub spells repository ids: no absolute or
    home-relative path, no './' or '../', at most one '/', and not an existing local path."""
    import re

    global _HUB_ID
    if _HUB_ID is None:
        _HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
    if not isinstance(name, str) or not name or len(name) > 96:
        return False
    if os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name or ".." in name:
        return False
    if not _HUB_ID.match(name) or name.endswith((".", "-")):
        return False
    return not os.path.exists(name)


# --- crash-safe writes ----------------------------------------------------------------------
def fsync_path(path: str) -> None:
    """fsync one file or directory (directories: their entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under root (root included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write_text(path: str, text: str) -> None:
    """Write path as a whole or not at all: a temporary file next to it, fsync, rename, fsync
    of the directory."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


class StagedDirectory:
    """An output directory that appears complete or not at all.

    Everything is written under a hidden sibling (`.NAME.tmp-PID`, same file system); `commit()`
    fsyncs every file in it, renames it to the final name and fsyncs the parent. The final
    directory must not exist or be empty (an empty one is removed just before the rename). A
    failure before `commit()` removes the staging directory and leaves `final` untouched."""

    def __init__(self, final: str, flag: str = "--save"):
        self.final = os.path.abspath(final)
        self.flag = flag
        if os.path.isdir(self.final) and os.listdir(self.final):
            raise HFInteropError(f"{flag} {final}: directory exists and is not empty")
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise HFInteropError(f"{flag} {final}: exists and is not a directory")
        parent, name = os.path.split(self.final)
        os.makedirs(parent, exist_ok=True)
        self.path = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)  # a stale one of a killed run (same pid)
        os.makedirs(self.path)

    def commit(self) -> str:
        fsync_tree(self.path)
        if os.path.isdir(self.final):
            if os.listdir(self.final):
                raise HFInteropError(f"{self.flag} {self.final}: something was written there "
                                     f"during the export; the result stays in {self.path}")
            os.rmdir(self.final)
        os.rename(self.path, self.final)
        fsync_path(os.path.dirname(self.final))
        return self.final

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False
