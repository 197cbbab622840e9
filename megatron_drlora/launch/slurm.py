"""Turn the SLURM (or torchrun) environment into the settings torch.distributed needs.

Two ways to start a multi-node job under SLURM are supported, and they need different
arithmetic from the same variables:

* ``srun-per-task``: ``srun --ntasks-per-node=GPUS python train.py``. Every training process
  is a SLURM task, so rank = SLURM_PROCID, local rank = SLURM_LOCALID, world = SLURM_NTASKS.
* ``torchrun-per-node``: ``srun --ntasks-per-node=1 torchrun ...`` (what
  ``examples/slurm/drlora_finetune.sbatch`` does). SLURM only knows one task per node; the
  node rank is SLURM_NODEID and torchrun starts ``nproc_per_node`` workers (one per GPU).
  ``python -m megatron_drlora.launch.slurm --print-torchrun-args`` prints that node's torchrun
  arguments.

Inside torchrun's workers the SLURM variables still describe the *node's* task (SLURM_PROCID is
the node index there), so torchrun's own RANK/WORLD_SIZE/LOCAL_RANK always win when present;
reading SLURM_PROCID in a torchrun worker is the classic way to give eight processes the same
rank. Outside SLURM and torchrun the result is a single local process.

This module imports neither torch nor Megatron: it runs in the batch shell before the
allocation's GPUs are touched, and its tests need no GPU. Every inconsistency raises
`SlurmEnvError` naming the variables involved, because a wrong rank otherwise shows up as a
NCCL hang minutes later. SLURM's value syntax (`node[01-04]`, `4(x2)`) is read by
`hostlist`, the TP/PP/EP arithmetic checked by `parallel_layout`; both are re-exported here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from megatron_drlora.launch.hostlist import (
    SlurmEnvError, expand_hostlist, parse_gpu_count, parse_tasks_per_node)
from megatron_drlora.launch.parallel_layout import (
    ParallelLayoutError, check_parallel_layout, layout_from_args)

__all__ = ["DistributedSettings", "ParallelLayoutError", "SlurmEnvError", "apply_to_environ",
           "check_parallel_layout", "expand_hostlist", "main", "parse_gpu_count",
           "parse_tasks_per_node", "port_from_job_id", "settings_from_env"]

LAUNCHERS = ("srun-per-task", "torchrun-per-node", "local")
ROLES = ("worker", "node")
RDZV_BACKENDS = ("static", "c10d")

PORT_BASE = 20000
PORT_SPAN = 10000
DEFAULT_PORT = 29500
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------
def port_from_job_id(job_id: str) -> int:
    """Master port in [20000, 29999] from the job id, identical on every node of the job.

    Every node computes the same port without talking to the others, and two jobs sharing a
    node only collide when their ids agree modulo 10000. A requeued job keeps its id and port;
    that is safe because SLURM kills every process of the previous run before restarting it.
    """
    text = str(job_id).strip()
    number = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_BASE + number % PORT_SPAN


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedSettings:
    """Where this process sits in the job, in torch.distributed's terms.

    ``role`` is ``"worker"`` for a training process and ``"node"`` for the per-node task that is
    about to start ``nproc_per_node`` workers through torchrun; for a node, ``rank`` and
    ``local_rank`` describe the node's first worker.
    """

    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: int
    world_size: int
    rank: int
    local_rank: int
    launcher: str = "local"
    role: str = "worker"

    def __post_init__(self):
        for name in ("master_port", "nnodes", "nproc_per_node", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SlurmEnvError(f"{name} must be a positive integer, got {v!r}")
        for name in ("node_rank", "rank", "local_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SlurmEnvError(f"{name} must be a non-negative integer, got {v!r}")
        if self.master_port > 65535:
            raise SlurmEnvError(f"master_port {self.master_port} is not a TCP port")
        if not self.master_addr or re.search(r"\s", self.master_addr):
            raise SlurmEnvError(f"master_addr {self.master_addr!r} is not a host name")
        if self.launcher not in LAUNCHERS:
            raise SlurmEnvError(f"launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.role not in ROLES:
            raise SlurmEnvError(f"role {self.role!r}: choose one of {', '.join(ROLES)}")
        if self.rank >= self.world_size:
            raise SlurmEnvError(f"rank {self.rank} >= world_size {self.world_size}")
        if self.node_rank >= self.nnodes:
            raise SlurmEnvError(f"node_rank {self.node_rank} >= nnodes {self.nnodes}")
        if self.local_rank >= self.nproc_per_node:
            raise SlurmEnvError(f"local_rank {self.local_rank} >= nproc_per_node "
                                f"{self.nproc_per_node}")
        if self.nproc_per_node > self.world_size:
            raise SlurmEnvError(f"nproc_per_node {self.nproc_per_node} > world_size "
                                f"{self.world_size}")

    def torchrun_args(self, rdzv: str = "static", rdzv_id: Optional[str] = None) -> List[str]:
        """torchrun arguments that start this node's workers.

        ``static`` (default) pins node ``node_rank`` to global ranks ``node_rank*P ..
        node_rank*P+P-1``, so rank 0 runs on the first host of the node list, as the master
        address assumes. ``c10d`` lets torchrun's rendezvous assign node ranks (it ignores
        ``--node-rank`` and warns about it, so the flag is left out) and needs ``rdzv_id``.
        """
        common = ["--nnodes", str(self.nnodes)]
        if rdzv == "static":
            return common + ["--node-rank", str(self.node_rank),
                             "--nproc-per-node", str(self.nproc_per_node),
                             "--master-addr", self.master_addr,
                             "--master-port", str(self.master_port)]
        if rdzv == "c10d":
            host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
            return common + ["--nproc-per-node", str(self.nproc_per_node),
                             "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"{host}:{self.master_port}",
                             "--rdzv-id", str(rdzv_id or "drlora")]
        raise SlurmEnvError(f"rendezvous {rdzv!r}: choose one of {', '.join(RDZV_BACKENDS)}")

    def env_vars(self) -> Dict[str, str]:
        """The variables torch.distributed's ``env://`` init (and Megatron) read, as strings."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "WORLD_SIZE": str(self.world_size),
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.nnodes),
            "DRLORA_LAUNCHER": self.launcher,
        }

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def settings_from_env(env: Optional[Mapping[str, str]] = None, default_port: int = DEFAULT_PORT,
                      *, nproc_per_node: Optional[int] = None,
                      launcher: Optional[str] = None) -> DistributedSettings:
    """Read the distributed layout of this process from ``env`` (default ``os.environ``).

    Precedence: torchrun's variables (RANK and WORLD_SIZE) when present, then SLURM (a task
    started by srun: SLURM_JOB_ID plus SLURM_PROCID/SLURM_NODEID), then one local process.
    ``launcher`` forces ``"srun-per-task"`` or ``"torchrun-per-node"`` (the CLI forces the
    latter); otherwise, under SLURM, several tasks on this node mean srun-per-task, and one
    task on a node with several GPUs (or ``nproc_per_node`` > 1) means torchrun-per-node.
    ``nproc_per_node`` overrides SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE in that mode.
    The port is MASTER_PORT if set, else derived from SLURM_JOB_ID, else ``default_port``.
    """
    env = os.environ if env is None else env
    if launcher is not None and launcher not in LAUNCHERS:
        raise SlurmEnvError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if nproc_per_node is not None and (not isinstance(nproc_per_node, int) or nproc_per_node < 1):
        raise SlurmEnvError(f"nproc_per_node must be a positive integer, got {nproc_per_node!r}")

    has_torch_env = "RANK" in env and "WORLD_SIZE" in env
    if launcher is None and ("RANK" in env) != ("WORLD_SIZE" in env):
        present, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise SlurmEnvError(f"{present} is set but {missing} is not: set both (torchrun does) "
                            f"or neither")
    if launcher in (None, "local") and has_torch_env:
        return _from_torch_env(env, default_port)
    if launcher == "local":
        return _single_process(env, default_port)
    if launcher is not None or _in_slurm_task(env):
        if _job_id(env) is None:
            if launcher == "torchrun-per-node":
                return _local_node(env, default_port, nproc_per_node)
            raise SlurmEnvError(f"launcher {launcher!r} needs a SLURM job, but SLURM_JOB_ID is "
                                f"not set (run inside sbatch/salloc and srun)")
        return _from_slurm(env, default_port, nproc_per_node, launcher)
    return _single_process(env, default_port)


def apply_to_environ(settings: DistributedSettings,
                     environ: Optional[MutableMapping[str, str]] = None
                     ) -> MutableMapping[str, str]:
    """Export ``settings`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...) into
    ``environ`` (default ``os.environ``) for ``init_process_group(init_method="env://")``.

    Refuses a per-node launcher's settings when the node should run several workers: that
    process is not a training worker, and initialising it as rank ``node_rank * P`` would hang
    the job waiting for processes that were never started.
    """
    if settings.role == "node" and settings.nproc_per_node > 1:
        raise SlurmEnvError(
            f"this process was started once per node (node {settings.node_rank}) but the node "
            f"should run {settings.nproc_per_node} workers: start it through torchrun "
            f"(examples/slurm/drlora_finetune.sbatch does) or launch one task per GPU with "
            f"srun --ntasks-per-node={settings.nproc_per_node}")
    environ = os.environ if environ is None else environ
    environ.update(settings.env_vars())
    return environ


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def _job_id(env: Mapping[str, str]) -> Optional[str]:
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None


def _in_slurm_task(env: Mapping[str, str]) -> bool:
    # salloc/sbatch shells have SLURM_JOB_ID too; only srun tasks (and the batch step) carry a
    # task or node id. A plain `python train.py` in an salloc shell is a local run.
    return _job_id(env) is not None and ("SLURM_PROCID" in env or "SLURM_NODEID" in env)


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> Optional[int]:
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return None
    text = str(raw).strip()
    if not re.fullmatch(r"-?\d+", text):
        raise SlurmEnvError(f"{name}={raw!r} is not an integer")
    value = int(text)
    if value < minimum:
        raise SlurmEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], names: Sequence[str],
               minimum: int = 0) -> Tuple[Optional[str], Optional[int]]:
    for name in names:
        value = _int(env, name, minimum)
        if value is not None:
            return name, value
    return None, None


def _first(env: Mapping[str, str], names: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    for name in names:
        if env.get(name):
            return name, env[name]
    return None, None


def _master_port(env: Mapping[str, str], default_port: int) -> int:
    port = _int(env, "MASTER_PORT", minimum=1)
    if port is not None:
        if port > 65535:
            raise SlurmEnvError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        return port
    job_id = _job_id(env)
    return port_from_job_id(job_id) if job_id else default_port


def _gpus_on_node(env: Mapping[str, str]) -> Tuple[Optional[str], Optional[int]]:
    name, value = _first_int(env, ("SLURM_GPUS_ON_NODE",), minimum=0)
    if value:
        return name, value
    raw = env.get("SLURM_GPUS_PER_NODE")
    if raw:
        return "SLURM_GPUS_PER_NODE", parse_gpu_count(raw, "SLURM_GPUS_PER_NODE")
    return None, None


def _from_torch_env(env: Mapping[str, str], default_port: int) -> DistributedSettings:
    world = _int(env, "WORLD_SIZE", minimum=1)
    rank = _int(env, "RANK")
    if rank >= world:
        raise SlurmEnvError(f"RANK={rank} >= WORLD_SIZE={world}")
    local_rank = _int(env, "LOCAL_RANK")
    if local_rank is None:
        if world > 1:
            raise SlurmEnvError(f"RANK/WORLD_SIZE are set (rank {rank} of {world}) but "
                                f"LOCAL_RANK is not; launch with torchrun or set LOCAL_RANK")
        local_rank = 0
    nnodes = _int(env, "GROUP_WORLD_SIZE", minimum=1)
    local_world = _int(env, "LOCAL_WORLD_SIZE", minimum=1)
    if local_world is None:
        local_world = world // (nnodes or 1)
    if nnodes is None:
        if world % local_world:
            raise SlurmEnvError(f"WORLD_SIZE={world} is not a multiple of "
                                f"LOCAL_WORLD_SIZE={local_world}")
        nnodes = world // local_world
    node_rank = _int(env, "GROUP_RANK")
    if node_rank is None:
        node_rank = rank // local_world
    if local_rank >= local_world:
        raise SlurmEnvError(f"LOCAL_RANK={local_rank} >= LOCAL_WORLD_SIZE={local_world}")
    master_addr = env.get("MASTER_ADDR") or ""
    if not master_addr:
        if nnodes > 1:
            raise SlurmEnvError(f"MASTER_ADDR is not set for a {nnodes}-node run")
        master_addr = "127.0.0.1"
    launcher = env.get("DRLORA_LAUNCHER")
    if launcher not in LAUNCHERS:
        launcher = "torchrun-per-node" if "TORCHELASTIC_RUN_ID" in env else "local"
    return DistributedSettings(master_addr=master_addr, master_port=_master_port(env, default_port),
                               nnodes=nnodes, node_rank=node_rank, nproc_per_node=local_world,
                               world_size=world, rank=rank, local_rank=local_rank,
                               launcher=launcher)


def _single_process(env: Mapping[str, str], default_port: int) -> DistributedSettings:
    return DistributedSettings(master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                               master_port=_master_port(env, default_port), nnodes=1, node_rank=0,
                               nproc_per_node=1, world_size=1, rank=0, local_rank=0,
                               launcher="local")


def _local_node(env: Mapping[str, str], default_port: int,
                nproc_per_node: Optional[int]) -> DistributedSettings:
    """torchrun arguments for this machine alone (the CLI outside SLURM)."""
    nproc = nproc_per_node or 1
    return DistributedSettings(master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                               master_port=_master_port(env, default_port), nnodes=1, node_rank=0,
                               nproc_per_node=nproc, world_size=nproc, rank=0, local_rank=0,
                               launcher="torchrun-per-node", role="node")


def _from_slurm(env: Mapping[str, str], default_port: int, nproc_per_node: Optional[int],
                launcher: Optional[str]) -> DistributedSettings:
    list_var, nodelist = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                      "SLURM_NODELIST"))
    if nodelist is None:
        raise SlurmEnvError("SLURM_JOB_ID is set but none of SLURM_STEP_NODELIST, "
                            "SLURM_JOB_NODELIST, SLURM_NODELIST is: cannot find the master host")
    hosts = expand_hostlist(nodelist)
    nodes_var, nnodes = _first_int(env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES",
                                         "SLURM_NNODES"), minimum=1)
    if nnodes is None:
        nodes_var, nnodes = list_var, len(hosts)
    if nnodes != len(hosts):
        raise SlurmEnvError(f"{nodes_var}={nnodes} but {list_var}={nodelist!r} lists "
                            f"{len(hosts)} host(s); the variables come from different "
                            f"jobs or steps")

    node_id = _int(env, "SLURM_NODEID")
    procid = _int(env, "SLURM_PROCID")
    localid = _int(env, "SLURM_LOCALID")
    tasks_var, ntasks = _first_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                                         "SLURM_NPROCS"), minimum=1)
    tpn_var, tpn_raw = _first(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    tasks_per_node: Optional[List[int]] = None
    if tpn_raw is not None:
        tasks_per_node = parse_tasks_per_node(tpn_raw)
    elif _int(env, "SLURM_NTASKS_PER_NODE", minimum=1) is not None:
        tpn_var = "SLURM_NTASKS_PER_NODE"
        tasks_per_node = [_int(env, "SLURM_NTASKS_PER_NODE", minimum=1)] * nnodes
    if tasks_per_node is not None:
        if len(tasks_per_node) != nnodes:
            raise SlurmEnvError(f"{tpn_var}={tpn_raw!r} describes {len(tasks_per_node)} node(s) "
                                f"but {nodes_var}={nnodes}")
        if ntasks is not None and sum(tasks_per_node) != ntasks:
            raise SlurmEnvError(f"{tpn_var}={env.get(tpn_var)!r} adds up to "
                                f"{sum(tasks_per_node)} tasks but {tasks_var}={ntasks}")
    if node_id is not None and node_id >= nnodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_id} >= {nodes_var}={nnodes}")

    tasks_here = None
    if tasks_per_node is not None:
        if node_id is not None:
            tasks_here = tasks_per_node[node_id]
        elif len(set(tasks_per_node)) == 1:
            tasks_here = tasks_per_node[0]
    gpus = nproc_per_node if nproc_per_node is not None else _gpus_on_node(env)[1]
    if launcher is None:
        if tasks_here is not None and tasks_here > 1:
            launcher = "srun-per-task"
        elif gpus is not None and gpus > 1:
            launcher = "torchrun-per-node"
        else:
            launcher = "srun-per-task"

    master_addr = env.get("MASTER_ADDR") or hosts[0]
    if nnodes > 1 and master_addr in _LOOPBACK:
        raise SlurmEnvError(f"MASTER_ADDR={master_addr} cannot reach {nnodes} nodes; unset it "
                            f"(the first host of {list_var}, {hosts[0]}, is used) or set a "
                            f"routable address")
    port = _master_port(env, default_port)

    if launcher == "torchrun-per-node":
        if tasks_here is not None and tasks_here != 1:
            raise SlurmEnvError(f"torchrun-per-node needs one srun task per node but this node "
                                f"runs {tasks_here} ({tpn_var}={env.get(tpn_var)!r}); use srun "
                                f"--ntasks-per-node=1, or srun-per-task without torchrun")
        if node_id is None:
            if procid is not None and tasks_per_node is not None and ntasks == nnodes:
                node_id = procid
            elif nnodes == 1:
                node_id = 0
            else:
                raise SlurmEnvError("SLURM_NODEID is not set: run this under srun")
        if gpus is None or gpus < 1:
            raise SlurmEnvError(
                "cannot tell how many workers to start on this node: SLURM_GPUS_ON_NODE and "
                "SLURM_GPUS_PER_NODE are unset (request GPUs with --gpus-per-node) and no "
                "--nproc-per-node was given (NPROC_PER_NODE in the sbatch scripts)")
        return DistributedSettings(master_addr=master_addr, master_port=port, nnodes=nnodes,
                                   node_rank=node_id, nproc_per_node=gpus,
                                   world_size=nnodes * gpus, rank=node_id * gpus, local_rank=0,
                                   launcher="torchrun-per-node", role="node")

    # srun-per-task: every process is a SLURM task.
    if procid is None:
        raise SlurmEnvError("SLURM_PROCID is not set: this process was not started by srun")
    world = ntasks if ntasks is not None else (sum(tasks_per_node) if tasks_per_node else None)
    if world is None:
        raise SlurmEnvError("SLURM_NTASKS is not set: cannot tell the world size")
    if procid >= world:
        raise SlurmEnvError(f"SLURM_PROCID={procid} >= {tasks_var or 'task count'}={world}: the "
                            f"variables come from different job steps (or were exported from "
                            f"the batch shell into a step with fewer tasks)")
    if node_id is None:
        if tasks_per_node is not None:
            bounds = [sum(tasks_per_node[:i + 1]) for i in range(nnodes)]
            node_id = next(i for i, b in enumerate(bounds) if procid < b)
        elif nnodes == 1:
            node_id = 0
        else:
            raise SlurmEnvError("SLURM_NODEID is not set on a multi-node step: run under srun")
    if tasks_here is None:
        if tasks_per_node is not None:
            tasks_here = tasks_per_node[node_id]
        elif world % nnodes == 0:
            tasks_here = world // nnodes
        else:
            raise SlurmEnvError(f"cannot tell the tasks on this node: {world} tasks on {nnodes} "
                                f"nodes and SLURM_TASKS_PER_NODE is unset")
    if localid is None:
        if nnodes == 1:
            localid = procid
        elif tasks_per_node is not None:  # block distribution, srun's default
            localid = procid - sum(tasks_per_node[:node_id])
        else:
            raise SlurmEnvError("SLURM_LOCALID is not set on a multi-node step: run under srun")
    if localid >= tasks_here:
        raise SlurmEnvError(f"SLURM_LOCALID={localid} >= {tasks_here} task(s) on node "
                            f"{node_id} ({tpn_var or 'tasks per node'})")
    return DistributedSettings(master_addr=master_addr, master_port=port, nnodes=nnodes,
                               node_rank=node_id, nproc_per_node=tasks_here, world_size=world,
                               rank=procid, local_rank=localid, launcher="srun-per-task")


def _job_world_size(env: Mapping[str, str], nproc_per_node: Optional[int]) -> int:
    """Nodes x workers per node of the whole job, readable from the batch shell too."""
    _, nnodes = _first_int(env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
                           minimum=1)
    if nnodes is None:
        _, nodelist = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        nnodes = len(expand_hostlist(nodelist)) if nodelist else 1
    gpus = nproc_per_node or _gpus_on_node(env)[1]
    if not gpus:
        raise SlurmEnvError("cannot tell the world size: no GPU count in SLURM_GPUS_ON_NODE / "
                            "SLURM_GPUS_PER_NODE; pass --nproc-per-node or --world-size")
    return nnodes * gpus


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_drlora.launch.slurm",
        description="Distributed settings of this process/node from SLURM or torchrun "
                    "variables. Without an action, prints them as key=value.")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--print-torchrun-args", action="store_true",
                     help="Print this node's torchrun arguments (one srun task per node).")
    act.add_argument("--print-env", action="store_true",
                     help="Print RANK/WORLD_SIZE/... as KEY=VALUE lines (for srun-per-task).")
    act.add_argument("--check-parallel", action="store_true",
                     help="Check TP/PP/CP/EP/ETP flags given after '--' against the world size.")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="Workers per node (default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE).")
    p.add_argument("--rdzv", choices=RDZV_BACKENDS, default="static",
                   help="torchrun rendezvous: static (fixed node ranks, default) or c10d.")
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="Force the launch mode (default: detect; --print-torchrun-args "
                        "uses torchrun-per-node).")
    p.add_argument("--world-size", type=int, default=None,
                   help="World size for --check-parallel (default: nodes x workers per node).")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="After '--': training flags for --check-parallel.")
    return p


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """CLI entry; returns 0, 2 (parallel sizes do not fit) or 3 (environment unreadable)."""
    args = _parser().parse_args(argv)
    env = os.environ if env is None else env
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    try:
        if args.check_parallel:
            world = args.world_size or _job_world_size(env, args.nproc_per_node)
            layout = layout_from_args(train_args, world)
            print(f"parallel layout OK: world {layout['world_size']} = TP{layout['tp']} x "
                  f"PP{layout['pp']} x CP{layout['cp']} x DP{layout['dp']}; experts: "
                  f"ETP{layout['etp']} x EP{layout['ep']} x PP{layout['pp']} x "
                  f"EDP{layout['edp']}")
            return 0
        if args.print_torchrun_args:
            s = settings_from_env(env, nproc_per_node=args.nproc_per_node,
                                  launcher=args.launcher or "torchrun-per-node")
            print(" ".join(s.torchrun_args(args.rdzv, rdzv_id=_job_id(env))))
            return 0
        s = settings_from_env(env, nproc_per_node=args.nproc_per_node, launcher=args.launcher)
        lines = s.env_vars() if args.print_env else asdict(s)
        for key, value in lines.items():
            print(f"{key}={value}")
    except ParallelLayoutError as e:
        print(f"megatron_drlora.launch.slurm: error: {e}", file=sys.stderr)
        return 2
    except SlurmEnvError as e:
        print(f"megatron_drlora.launch.slurm: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
