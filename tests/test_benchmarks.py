"""Smoke tests of the benchmarks (benchmarks/step_time.py, benchmarks/quality.py) on CPU.

Minimal settings (quality: `--quick`): these check that the scripts run end to end and report
what they promise, not the numbers (docs/benchmarks.md has those).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.dist_harness import REPO

KEYS = ("tokens_per_step", "run_ratio_vs_uniform_r_target", "saliency_fraction_of_step",
        "adapter_memory_ratio_vs_uniform_r_target", "host_syncs_per_step")


def _run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_step_time_tiny_reports_the_issue_keys(tmp_path):
    """Megatron-LM's training step (entry model, DDP, optimizer, train_step) for uniform LoRA
    at r_target and r_max and DR-LoRA at two maps of the planned trajectory."""
    path = tmp_path / "step_time.json"
    out = _run(["benchmarks/step_time.py", "--size", "tiny", "--reps", "1", "--warmup", "1",
                "--points", "2", "--same-map", "--json", str(path)])
    assert "run_ratio_vs_uniform_r_target" in out and "| drlora@0 |" in out
    result = json.load(open(path))
    for key in KEYS:
        assert key in result, key
    assert result["tokens_per_step"] == 8 * 64
    for key in ("run_ratio_vs_uniform_r_target", "saliency_fraction_of_step",
                "adapter_memory_ratio_vs_uniform_r_target",
                "uniform_r_max_ratio_vs_uniform_r_target"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["saliency_fraction_of_step"] < 1
    # DR-LoRA adds no host sync to a non-event step of the whole Megatron-LM step
    assert result["host_syncs_per_step"] == 0, result["host_syncs"]["calls"]
    variants = result["variants"]
    assert variants["uniform_r_target"]["ratio_to_uniform_r_target"] == 1.0
    trajectory = [v for n, v in variants.items() if n.startswith("drlora@")]
    assert [v["mean_rank"] for v in trajectory] == [4.0, 8.0]  # r_init ... r_target
    # --same-map: DR-LoRA's bank at uniform LoRA's map, timed beside the trajectory
    assert variants["drlora_at_uniform_map"]["mean_rank"] == 8.0
    assert "| drlora_at_uniform_map | 8.00 |" in out
    # the default bank (the rank pool) holds uniform r_target's adapter memory
    assert result["adapter_memory_ratio_vs_uniform_r_target"] == pytest.approx(1.0)
    assert result["run"]["events"] == 184
    # memory read from Megatron's buffers and optimizer: uniform r_max holds twice r_target
    memory = result["memory_bytes"]
    for part in ("parameters", "gradients", "optimizer_state"):
        assert memory["uniform_r_target"]["adapters"][part] > 0
    assert result["uniform_r_max_memory_ratio_vs_uniform_r_target"] == pytest.approx(2.0)


def test_host_sync_counter_sees_device_reads_and_exempts_host_tensors():
    """Not vacuous: DR-LoRA code reading a device tensor is counted; reading the rank map
    (kept on the host by design) and what is computed from it alone is not."""
    from benchmarks.step_accounting import HostSyncCounter
    from megatron_drlora import statistics

    host, probs = torch.arange(3), torch.rand(4, 3)
    code = compile("probs.sum(0).to('cpu', torch.float64); probs.sum().item(); torch.zeros(2);"
                   "float(host.double().mean()); host.tolist()", statistics.__file__, "exec")
    counter = HostSyncCounter(host_tensors=[host])
    with counter:
        exec(code, {"probs": probs, "torch": torch, "host": host})
    assert [c.split(" at ")[0] for c in counter.calls] == ["to(device)", "item",
                                                          "zeros on the host"], counter.calls


@pytest.mark.slow
def test_quality_quick_runs_every_control(tmp_path):
    """`quality.py --quick` (the CI smoke test, 1 seed): every control and DR-LoRA train
    through the training entry and are evaluated; the output has the promised structure."""
    out_dir = tmp_path / "q"
    # five fine-tunes and their evaluation: minutes on a shared 2-core box, hence the margin
    out = _run(["benchmarks/quality.py", "--quick", "--out", str(out_dir)], timeout=1200)
    assert "| DR-LoRA (full saliency) |" in out and "| DR-LoRA vs |" in out
    result = json.load(open(out_dir / "quality.json"))
    controls = ["uniform_r_target", "uniform_flops", "static_frequency", "uniform_r_max"]
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == \
        [(v, 0) for v in controls + ["drlora"]]
    runs = {r["variant"]: r for r in result["runs"]}
    for run in result["runs"]:
        assert os.path.isfile(os.path.join(run["run_dir"], "command.txt"))
        for domain in ("prose", "sort"):
            score = run["scores"][domain]
            assert 0.0 <= score["accuracy"] <= 1.0 and score["loss"] > 0
            assert len(score["outcomes"]) == score["prompts"]
    # same budget: r_target, the static map and DR-LoRA; the named ones above it
    budget = runs["uniform_r_target"]["lora_params"]
    assert runs["static_frequency"]["lora_params"] == runs["drlora"]["lora_params"] == budget
    assert runs["uniform_r_max"]["lora_params"] == 2 * budget
    assert runs["static_frequency"]["rank_map"] == result["static_map"]
    assert "--drlora-rank-map" in runs["static_frequency"]["flags"]
    assert not runs["static_frequency"]["events"] and runs["drlora"]["events"]
    flops = result["flops_match"]
    assert flops["rank"] == int(flops["exact"] + 0.5)  # nearest, halves up
    assert runs["uniform_flops"]["final_mean_rank"] == flops["rank"]
    assert flops["ratios"] == [runs["drlora"]["lora_flops_ratio"]]
    assert result["plan"]["target_reached_step"] < result["settings"]["finetune_iters"]
    comparisons = result["summary"]["comparisons"]
    assert sorted(comparisons) == sorted(controls)
    for entry in comparisons.values():
        assert entry["sort_accuracy"]["n"] == 1 and entry["sort_loss"]["verdict"]
    assert "grown_share_rare_quarter" in runs["drlora"]["allocation"]
    assert (out_dir / "quality.md").read_text().startswith("DR-LoRA quality benchmark")
    if result["pictures"]:
        assert os.path.isfile(result["pictures"]["allocation"])
