"""--drlora-rank-pool inside Megatron-LM's loop (examples/pretrain_gpt.py, real processes).

The reference is the same run with the dense bank (--no-drlora-rank-pool): a pooled run must take the same growth
decisions and end with the same trained tensors (the checkpoints are in the same format,
read by tests/workers/read_checkpoint.py). Each pooled run is stopped and resumed, so the
pooled checkpoint (model and optimizer state through dist_checkpointing factories) is loaded
by Megatron-LM too (the distributed optimizer's run excepted). bf16 checks that a grown rank's init reaches the fp32 main parameters (the
optimizer would overwrite it with zeros otherwise); the distributed optimizer that its main
shards get it and that its grad masks still count each element once.
"""

import shutil

import pytest
import torch

from tests.megatron_runs import (assert_same_run, drlora_run, events, read_checkpoint, steps,
                                 torchrun)
from tests.train_flags import DRLORA, EVENTS, LAYOUTS, TINY

pytestmark = pytest.mark.slow

POOL = ["--drlora-rank-pool"]  # the default, named
DENSE = ["--no-drlora-rank-pool"]


@pytest.fixture(scope="module")
def reference(work, base):
    return drlora_run(work, base, "reference_dense", 1, DENSE)


def test_pooled_run_matches_the_dense_run(reference, work, base):
    run = drlora_run(work, base, "rank_pool", 1, POOL, stop_at=4)
    assert [e["iteration"] for e in events(run)] == EVENTS
    assert_same_run(reference, run, work)


def test_pooled_resume_is_bitwise_identical(work, base):
    """Stopped at iteration 4 (grown ranks trained for a step) and resumed: the loaded slot table,
    factors and optimizer states continue exactly where the uninterrupted run is."""
    full = drlora_run(work, base, "rank_pool_full", 1, POOL)
    part = drlora_run(work, base, "rank_pool", 1, POOL, stop_at=4)
    decisions = lambda run: [(e["iteration"], e["rank_map"], e["saliency"]) for e in events(run)]
    assert decisions(part) == decisions(full)
    norms = lambda run: [(s["iteration"], s["grad_norm"]) for s in steps(run)]
    assert norms(part) == norms(full) and len(norms(full)) == 8  # exact floats
    a = read_checkpoint(full / "iter_0000008", work)["tensors"]
    b = read_checkpoint(part / "iter_0000008", work)["tensors"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("pool_after", [True, False], ids=["pooled", "dense"])
def test_pooled_ep2_checkpoint_resumes_in_one_process(pool_after, work, base):
    """EP2's iteration-4 checkpoint (each rank's slot table numbers its own pool) resumed by
    one process: pooled (the ranks packed anew, parameters and optimizer states alike) or
    with the dense bank; iterations 5-8 end where the EP2 run ended (fp32 layout noise)."""
    src = drlora_run(work, base, "rank_pool_ep2", 2, POOL + LAYOUTS["ep2"])
    copy = work / f"rank_pool_ep2_to_1_{'pooled' if pool_after else 'dense'}"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    shutil.copytree(src / "iter_0000004", copy / "iter_0000004")
    (copy / "latest_checkpointed_iteration.txt").write_text("4")
    proc = torchrun(1, TINY + DRLORA + (POOL if pool_after else DENSE)
                    + ["--pretrained-checkpoint", str(base), "--save", str(copy), "--load",
                       str(copy)])
    assert "DR-LoRA state restored: average rank 3.00" in proc.stdout
    want = read_checkpoint(src / "iter_0000008", work)
    got = read_checkpoint(copy / "iter_0000008", work)
    assert torch.equal(want["drlora"]["rank_map"], got["drlora"]["rank_map"])
    for key, ref_t in want["tensors"].items():
        if "pool_table" in key or (not pool_after and key.startswith("optimizer.")):
            continue  # slot numbers are per layout; a dense run keeps no pool state
        scale = ref_t.abs().max().item()
        assert torch.allclose(got["tensors"][key], ref_t, rtol=0, atol=1e-4 * scale), key


def test_per_rank_capacity_bounds_every_ranks_pool_at_ep2(work, base):
    """--drlora-rank-pool-capacity 1.0 at EP2 (2 local experts x 2 projections a rank, budget
    4): each rank's pool holds 16 slots (its share of uniform r_target, 1.00x; 24 = 1.5x
    without the flag), no event gives one rank's experts of a layer more than 16 ranks, and
    the budget is still reached (32 per layer = both ranks full)."""
    uncapped = drlora_run(work, base, "rank_pool_ep2", 2, POOL + LAYOUTS["ep2"])
    path = work / "rank_pool_ep2_capacity"
    shutil.rmtree(path, ignore_errors=True)
    proc = torchrun(2, TINY + DRLORA + POOL + LAYOUTS["ep2"]
                    + ["--drlora-rank-pool-capacity", "1.0", "--pretrained-checkpoint",
                       str(base), "--save", str(path)])
    assert "rank pool: 16 rank slots per MoE layer for this rank's 4 expert modules (1.00x" \
        in proc.stdout
    capped = events(path)
    assert [e["iteration"] for e in capped] == EVENTS
    for event in capped:
        per_rank = torch.tensor(event["rank_map"]).view(2, 2, -1).sum(-1)  # [layer, EP rank]
        assert int(per_rank.max()) <= 16, event
    final = torch.tensor(capped[-1]["rank_map"])
    assert final.sum(dim=(1, 2)).tolist() == [32, 32]
    free = [torch.tensor(e["rank_map"]).view(2, 2, -1).sum(-1) for e in events(uncapped)]
    # without the flag one rank's experts of layer 0 take 18 ranks: the limit binds here
    assert max(int(g.max()) for g in free) > 16
    assert [e["rank_map"] for e in capped] != [e["rank_map"] for e in events(uncapped)]


def test_pooled_run_with_the_distributed_optimizer_matches(reference, work, base):
    # not resumed: a dense run with the distributed optimizer cannot resume on CPU either
    # (DistributedOptimizer.state_dict's single-step assertion fails at the load)
    run = drlora_run(work, base, "rank_pool_dp2_distopt", 2,
                     POOL + ["--use-distributed-optimizer"])
    assert_same_run(reference, run, work)


def _assert_bf16_runs_match(dense, run, work, expect_main=True):
    """Same decisions, and bf16 params and fp32 main params (active ranks: the pool keeps no
    main copy of inactive ones) within bf16 noise."""
    got, want = events(run), events(dense)
    assert [e["iteration"] for e in got] == EVENTS
    assert [e["rank_map"] for e in got] == [e["rank_map"] for e in want]
    a = read_checkpoint(dense / "iter_0000008", work)["tensors"]
    b = read_checkpoint(run / "iter_0000008", work)["tensors"]
    final = torch.tensor(want[-1]["rank_map"])
    compared = 0
    for key, ref in a.items():
        if not (key.startswith("drlora.layers.") or (key.startswith("optimizer.")
                                                      and "fp32_param.drlora" in key)):
            continue
        layer, proj_which = key.split("drlora.layers.")[1].split(".")
        proj, which = proj_which.split("_")
        j = ("up", "down").index(proj)
        got_t, ref_t = b[key].float(), ref.float()
        if key.startswith("optimizer."):
            got_t, ref_t = got_t.clone(), ref_t.clone()
            for e in range(4):
                r = int(final[int(layer), e, j])
                for t in (got_t, ref_t):
                    if which == "A":
                        t[e, r:] = 0
                    else:
                        t[e, :, r:] = 0
        scale = ref_t.abs().max()
        assert torch.allclose(got_t, ref_t, rtol=0, atol=2e-2 * scale), key
        compared += 1
    # 2 layers x 2 projections x A/B, bf16 params (and fp32 main params, but the distributed
    # optimizer's default format saves them by buffer, not by parameter: a main shard that
    # missed a grown rank's init shows in the params, which it overwrites at every step)
    assert compared == (16 if expect_main else 8)


def test_pooled_bf16_run_writes_grown_ranks_into_the_fp32_main_params(work, base):
    dense = drlora_run(work, base, "bf16_dense", 1, ["--bf16"] + DENSE)
    run = drlora_run(work, base, "bf16_rank_pool", 1, ["--bf16"] + POOL, stop_at=3)
    _assert_bf16_runs_match(dense, run, work)


def test_pooled_bf16_run_writes_grown_ranks_into_the_distributed_main_shards(work, base):
    """DP2 with the distributed optimizer: each rank owns fp32 main shards (flat ranges that
    cut through slots) that a grown rank's init must reach."""
    flags = ["--bf16", "--use-distributed-optimizer"]
    dense = drlora_run(work, base, "bf16_dp2_distopt_dense", 2, flags + DENSE)
    run = drlora_run(work, base, "bf16_dp2_distopt_rank_pool", 2, flags + POOL)
    _assert_bf16_runs_match(dense, run, work, expect_main=False)


def test_step_time_benchmark_measures_pooled_memory_at_uniform_r_target(tmp_path):
    """benchmarks/step_time.py --rank-pool: adapter parameters, gradients and optimizer state
    read from Megatron's DDP buffers and optimizer are at most 1.10x (here exactly 1.00x)
    uniform LoRA at r_target (2.00x without the pool), and a non-event step has no host sync."""
    import json
    import os
    import subprocess
    import sys

    from tests.dist_harness import REPO

    path = tmp_path / "step_time.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "benchmarks/step_time.py", "--size", "tiny",
                           "--reps", "1", "--warmup", "1", "--points", "2", "--rank-pool",
                           "--json", str(path)], capture_output=True, text=True, timeout=300,
                          cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.load(open(path))
    assert result["settings"]["rank_pool"] is True
    assert result["adapter_memory_ratio_vs_uniform_r_target"] <= 1.10
    assert result["adapter_memory_ratio_vs_uniform_r_target"] == pytest.approx(1.0)
    assert result["uniform_r_max_memory_ratio_vs_uniform_r_target"] == pytest.approx(2.0)
    assert result["host_syncs_per_step"] == 0, result["host_syncs"]["calls"]


def test_a_dense_checkpoint_is_refused_by_a_pooled_run(reference, work, base):
    copy = work / "dense_to_pool"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(reference, copy)
    proc = torchrun(1, TINY + DRLORA + POOL + ["--pretrained-checkpoint", str(base), "--load",
                                               str(copy)], expect_ok=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "was written by the dense bank" in text and "resume it with --no-drlora-rank-pool" \
        in text
