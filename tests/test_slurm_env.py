"""SLURM/torchrun environment -> distributed settings, with faked environments (no cluster)."""

import re

import pytest

from megatron_drlora.launch import slurm
from megatron_drlora.launch.slurm import (
    DistributedSettings,
    ParallelLayoutError,
    SlurmEnvError,
    apply_to_environ,
    check_parallel_layout,
    expand_hostlist,
    parse_gpu_count,
    parse_tasks_per_node,
    port_from_job_id,
    settings_from_env,
)


# --- host lists -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("a,b", ["a", "b"]),
    ("gpu017", ["gpu017"]),
    ("localhost", ["localhost"]),
    ("gpu[1-3,7],cpu05", ["gpu1", "gpu2", "gpu3", "gpu7", "cpu05"]),
    ("rack1-node[001-002,010]", ["rack1-node001", "rack1-node002", "rack1-node010"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    (" x[1-2] ", ["x1", "x2"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty"),
    ("node[1-2", "never closed"),
    ("node1-2]", "without '['"),
    ("n[[1-2]]", "nested"),
    ("n[3-1]", "backwards"),
    ("n[]", "empty brackets"),
    ("n[a-b]", "not a number"),
    ("a,,b", "empty entry"),
    ("n[0-99999999]", "implausibly large"),
])
def test_expand_hostlist_errors(spec, fragment):
    with pytest.raises(SlurmEnvError, match=re.escape(fragment)):
        expand_hostlist(spec)


def test_tasks_per_node_and_gpu_counts():
    assert parse_tasks_per_node("4(x2),2") == [4, 4, 2]
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("1(x16)") == [1] * 16
    with pytest.raises(SlurmEnvError, match="N\\(xK\\)"):
        parse_tasks_per_node("4(2)")
    assert parse_gpu_count("8") == 8
    assert parse_gpu_count("h100:8") == 8
    assert parse_gpu_count("gpu:a100:4(IDX:0-3)") == 4
    assert parse_gpu_count("a100:2,v100:2") == 4
    with pytest.raises(SlurmEnvError, match="SLURM_GPUS_PER_NODE"):
        parse_gpu_count("h100", "SLURM_GPUS_PER_NODE")


def test_port_from_job_id_is_deterministic_and_in_range():
    assert port_from_job_id("123456") == 23456
    assert port_from_job_id("4242") == 24242
    ports = {port_from_job_id(str(j)) for j in range(100000, 100500)}
    assert len(ports) == 500 and min(ports) >= 20000 and max(ports) <= 29999
    assert 20000 <= port_from_job_id("98_7") <= 29999  # non-numeric ids are hashed


# --- faked SLURM environments ---------------------------------------------------------------
def srun_per_task_env(nnodes, tasks_per_node, procid, job_id="123456", **extra):
    """The variables srun gives task `procid` of a block-distributed step."""
    nodelist = "gpu[01-%02d]" % nnodes if nnodes > 1 else "gpu01"
    env = {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_NTASKS": str(nnodes * tasks_per_node),
        "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nnodes})" if nnodes > 1 else
        str(tasks_per_node),
        "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid // tasks_per_node),
        "SLURM_LOCALID": str(procid % tasks_per_node), "SLURM_GPUS_ON_NODE": str(tasks_per_node),
    }
    env.update(extra)
    return env


def torchrun_per_node_env(nnodes, node, gpus=8, job_id="123456", **extra):
    """The variables of the one srun task per node that starts torchrun."""
    env = {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "gpu[01-%02d]" % nnodes,
        "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_NTASKS": str(nnodes),
        "SLURM_TASKS_PER_NODE": f"1(x{nnodes})", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0",
        "SLURM_GPUS_ON_NODE": str(gpus),
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("nnodes", [1, 2, 4])
def test_srun_per_task_every_rank(nnodes):
    gpus = 4
    seen = set()
    for procid in range(nnodes * gpus):
        s = settings_from_env(srun_per_task_env(nnodes, gpus, procid))
        assert s.launcher == "srun-per-task" and s.role == "worker"
        assert (s.rank, s.world_size, s.nnodes, s.nproc_per_node) == (procid, nnodes * gpus,
                                                                       nnodes, gpus)
        assert s.local_rank == procid % gpus and s.node_rank == procid // gpus
        assert s.master_addr == "gpu01" and s.master_port == 23456
        seen.add(s.rank)
    assert seen == set(range(nnodes * gpus))


@pytest.mark.parametrize("nnodes", [1, 2, 4])
def test_torchrun_per_node_every_node(nnodes):
    for node in range(nnodes):
        s = settings_from_env(torchrun_per_node_env(nnodes, node))
        assert s.launcher == "torchrun-per-node" and s.role == "node"
        assert (s.nnodes, s.node_rank, s.nproc_per_node, s.world_size) == (nnodes, node, 8,
                                                                           8 * nnodes)
        assert s.rank == node * 8 and s.local_rank == 0
        assert s.master_addr == "gpu01" and s.master_port == 23456
        assert s.torchrun_args() == [
            "--nnodes", str(nnodes), "--node-rank", str(node), "--nproc-per-node", "8",
            "--master-addr", "gpu01", "--master-port", "23456"]


def test_srun_per_task_uneven_tasks_per_node():
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "a,b,c", "SLURM_NTASKS": "10",
           "SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_PROCID": "9"}
    s = settings_from_env(env)  # node and local id derived from the task layout
    assert (s.node_rank, s.local_rank, s.nproc_per_node, s.nnodes) == (2, 1, 2, 3)


def test_step_variables_win_over_job_variables():
    # srun -N1 inside a 2-node job: the step uses one node only.
    env = torchrun_per_node_env(2, 0, SLURM_STEP_NODELIST="gpu02", SLURM_STEP_NUM_NODES="1",
                                SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1")
    s = settings_from_env(env)
    assert (s.master_addr, s.nnodes, s.world_size) == ("gpu02", 1, 8)


def test_gpu_count_sources_and_explicit_nproc():
    env = torchrun_per_node_env(2, 1)
    del env["SLURM_GPUS_ON_NODE"]
    env["SLURM_GPUS_PER_NODE"] = "h100:4"
    assert settings_from_env(env).nproc_per_node == 4
    s = settings_from_env(env, nproc_per_node=2, launcher="torchrun-per-node")
    assert (s.nproc_per_node, s.world_size, s.rank) == (2, 4, 2)
    del env["SLURM_GPUS_PER_NODE"]
    with pytest.raises(SlurmEnvError, match="NPROC_PER_NODE"):
        settings_from_env(env, launcher="torchrun-per-node")


def test_torchrun_variables_win_inside_workers():
    # A torchrun worker inherits the node task's SLURM variables (SLURM_PROCID = node index).
    env = torchrun_per_node_env(2, 1)
    env.update({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "gpu01",
                "MASTER_PORT": "23456", "TORCHELASTIC_RUN_ID": "123456"})
    s = settings_from_env(env)
    assert (s.rank, s.local_rank, s.node_rank, s.world_size, s.nnodes) == (13, 5, 1, 16, 2)
    assert s.launcher == "torchrun-per-node" and s.role == "worker"


def test_local_fallbacks():
    s = settings_from_env({})
    assert (s.rank, s.world_size, s.launcher, s.master_addr, s.master_port) == (
        0, 1, "local", "127.0.0.1", 29500)
    assert settings_from_env({}, default_port=31000).master_port == 31000
    s = settings_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (s.rank, s.nnodes, s.nproc_per_node, s.launcher, s.master_port) == (1, 1, 2, "local",
                                                                             1234)
    # An salloc shell (job id, no task id) running plain python is a local run.
    assert settings_from_env({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "a"}).launcher == "local"
    # The CLI outside SLURM prints torchrun arguments for this machine.
    s = settings_from_env({}, nproc_per_node=2, launcher="torchrun-per-node")
    assert (s.nnodes, s.nproc_per_node, s.world_size, s.role) == (1, 2, 2, "node")


def test_master_port_and_addr_overrides():
    s = settings_from_env(torchrun_per_node_env(2, 0, MASTER_PORT="25000", MASTER_ADDR="10.0.0.7"))
    assert (s.master_addr, s.master_port) == ("10.0.0.7", 25000)
    with pytest.raises(SlurmEnvError, match="MASTER_ADDR=localhost cannot reach 2 nodes"):
        settings_from_env(torchrun_per_node_env(2, 0, MASTER_ADDR="localhost"))
    with pytest.raises(SlurmEnvError, match="MASTER_PORT=70000"):
        settings_from_env(torchrun_per_node_env(2, 0, MASTER_PORT="70000"))


@pytest.mark.parametrize("change, fragment", [
    ({"SLURM_PROCID": "8"}, r"SLURM_PROCID=8 >= SLURM_NTASKS=8"),
    ({"SLURM_LOCALID": "4"}, r"SLURM_LOCALID=4 >= 4 task\(s\)"),
    ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2 >= SLURM_JOB_NUM_NODES=2"),
    ({"SLURM_JOB_NUM_NODES": "3"}, r"lists 2 host\(s\)"),
    ({"SLURM_TASKS_PER_NODE": "4(x3)"}, r"describes 3 node\(s\)"),
    ({"SLURM_NTASKS": "6"}, r"adds up to 8 tasks but SLURM_NTASKS=6"),
    ({"SLURM_PROCID": "two"}, r"SLURM_PROCID='two' is not an integer"),
    ({"SLURM_JOB_NODELIST": "gpu[01-02"}, r"never closed"),
])
def test_inconsistent_srun_variables(change, fragment):
    env = srun_per_task_env(2, 4, 3)
    env.update(change)
    with pytest.raises(SlurmEnvError, match=fragment):
        settings_from_env(env)


def test_inconsistent_launch_modes():
    with pytest.raises(SlurmEnvError, match="one srun task per node but this node runs 4"):
        settings_from_env(srun_per_task_env(2, 4, 0), launcher="torchrun-per-node")
    env = srun_per_task_env(1, 1, 0)
    del env["SLURM_PROCID"]
    with pytest.raises(SlurmEnvError, match="not started by srun"):
        settings_from_env(env, launcher="srun-per-task")
    with pytest.raises(SlurmEnvError, match="SLURM_JOB_ID is"):
        settings_from_env({}, launcher="srun-per-task")
    with pytest.raises(SlurmEnvError, match="LOCAL_RANK is not"):
        settings_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(SlurmEnvError, match="RANK is set but WORLD_SIZE is not"):
        settings_from_env({"RANK": "0"})
    with pytest.raises(SlurmEnvError, match="RANK=2 >= WORLD_SIZE=2"):
        settings_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_apply_to_environ_round_trip():
    for env in (srun_per_task_env(2, 4, 6), {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "a",
                                             "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}):
        s = settings_from_env(env)
        out = apply_to_environ(s, {})
        assert out["RANK"] == str(s.rank) and out["WORLD_SIZE"] == str(s.world_size)
        assert out["LOCAL_RANK"] == str(s.local_rank) and out["MASTER_ADDR"] == s.master_addr
        assert out["MASTER_PORT"] == str(s.master_port)
        assert settings_from_env({**env, **out}) == s  # reading it back changes nothing


def test_apply_to_environ_refuses_a_node_launcher():
    s = settings_from_env(torchrun_per_node_env(2, 1))
    with pytest.raises(SlurmEnvError, match="through torchrun"):
        apply_to_environ(s, {})


def test_settings_validation():
    with pytest.raises(SlurmEnvError, match="rank 4 >= world_size 4"):
        DistributedSettings("h", 1234, 1, 0, 4, 4, 4, 0)
    with pytest.raises(SlurmEnvError, match="launcher"):
        DistributedSettings("h", 1234, 1, 0, 1, 1, 0, 0, launcher="mpirun")


# --- torchrun arguments and the CLI ---------------------------------------------------------
def test_c10d_arguments_leave_out_node_rank():
    s = settings_from_env(torchrun_per_node_env(4, 3))
    assert s.torchrun_args("c10d", rdzv_id="123456") == [
        "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu01:23456", "--rdzv-id", "123456"]
    with pytest.raises(SlurmEnvError, match="rendezvous"):
        s.torchrun_args("etcd")


def test_cli_print_torchrun_args(capsys):
    assert slurm.main(["--print-torchrun-args"], torchrun_per_node_env(2, 1)) == 0
    assert capsys.readouterr().out.split() == [
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
        "--master-addr", "gpu01", "--master-port", "23456"]
    assert slurm.main(["--print-torchrun-args", "--rdzv", "c10d", "--nproc-per-node", "2"],
                      torchrun_per_node_env(2, 1)) == 0
    assert "--rdzv-endpoint gpu01:23456 --rdzv-id 123456" in capsys.readouterr().out
    env = torchrun_per_node_env(2, 1)
    del env["SLURM_GPUS_ON_NODE"]
    assert slurm.main(["--print-torchrun-args"], env) == 3
    assert "NPROC_PER_NODE" in capsys.readouterr().err


def test_cli_print_env_and_summary(capsys):
    assert slurm.main(["--print-env"], srun_per_task_env(2, 4, 5)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "RANK=5" in out and "LOCAL_RANK=1" in out and "WORLD_SIZE=8" in out
    assert slurm.main([], {}) == 0
    assert "launcher=local" in capsys.readouterr().out


# --- parallel layout ------------------------------------------------------------------------
def test_check_parallel_layout():
    assert check_parallel_layout(16, ep=8) == {"world_size": 16, "tp": 1, "pp": 1, "cp": 1,
                                               "dp": 16, "ep": 8, "etp": 1, "edp": 2}
    layout = check_parallel_layout(32, tp=2, ep=8, etp=1, num_experts=64, micro_batch_size=1,
                                   global_batch_size=128)
    assert (layout["dp"], layout["edp"]) == (16, 4)
    assert check_parallel_layout(16, tp=2, ep=4)["etp"] == 2  # ETP defaults to TP
    with pytest.raises(ParallelLayoutError, match="TP\\*PP\\*CP"):
        check_parallel_layout(12, tp=8)
    with pytest.raises(ParallelLayoutError, match="ETP\\*EP\\*PP = 1\\*8\\*1 = 8"):
        check_parallel_layout(12, ep=8, etp=1)
    with pytest.raises(ParallelLayoutError, match="--num-experts 60"):
        check_parallel_layout(8, ep=8, num_experts=60)
    with pytest.raises(ParallelLayoutError, match="--global-batch-size 100"):
        check_parallel_layout(16, micro_batch_size=1, global_batch_size=100)


def test_cli_check_parallel(capsys):
    flags = ["--expert-model-parallel-size", "8", "--num-experts", "64"]
    assert slurm.main(["--check-parallel", "--"] + flags, torchrun_per_node_env(2, 0)) == 0
    assert "DP16" in capsys.readouterr().out
    assert slurm.main(["--check-parallel", "--world-size", "12", "--"] + flags, {}) == 2
    assert "not divisible" in capsys.readouterr().err
