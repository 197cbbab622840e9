"""Launch helpers: SLURM/torchrun environment -> distributed settings, and requeue information.

Nothing here imports torch or Megatron, so the helpers run in a batch shell, on a login node
and in tests in milliseconds. `slurm` turns the scheduler's variables into the rank/world layout
(and the torchrun arguments of one node), reading SLURM's compact values with `hostlist` and
checking TP/PP/EP sizes with `parallel_layout`; `requeue` says whether a job is a requeued run.
Stopping on SIGTERM/SIGUSR1 at a step boundary is Megatron-LM's (`--exit-signal-handler`).

The names below are loaded lazily: `python -m megatron_drlora.launch.slurm` would otherwise
find its own module already imported by this package and print a runpy RuntimeWarning into
every sbatch log.
"""

import importlib

_EXPORTS = {
    "DistributedSettings": "slurm",
    "ParallelLayoutError": "parallel_layout",
    "SlurmEnvError": "hostlist",
    "apply_to_environ": "slurm",
    "check_parallel_layout": "parallel_layout",
    "expand_hostlist": "hostlist",
    "settings_from_env": "slurm",
    "free_port": "ports",
    "is_requeued": "requeue",
    "requeue_hint": "requeue",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
