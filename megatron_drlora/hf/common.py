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
