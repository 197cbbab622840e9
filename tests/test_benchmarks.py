"""Smoke tests of the benchmarks (benchmarks/step_time.py, benchmarks/quality.py) on CPU.

Minimal settings: these check that the scripts run end to end and report what they promise,
not the numbers (docs/benchmarks.md has those).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.dist_harness import REPO

pytestmark = pytest.mark.slow

VARIANTS = ("base", "uniform_r_target", "uniform_r_max", "drlora_init", "drlora_mid",
            "drlora_final")


def _run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_step_time_tiny_reports_ratios_and_json(tmp_path):
    path = tmp_path / "step_time.json"
    out = _run(["benchmarks/step_time.py", "--size", "tiny", "--reps", "2", "--steps", "1",
                "--warmup", "1", "--no-memory", "--json", str(path)])
    assert "ratio to uniform r_target" in out and "whole run" in out
    result = json.load(open(path))
    assert set(result["variants"]) == set(VARIANTS)
    ref = result["variants"]["uniform_r_target"]
    assert ref["ratio_to_uniform_r_target"] == 1.0
    for name, v in result["variants"].items():
        for key in ("ms_per_step_median", "ratio_to_uniform_r_target", "mean_rank",
                    "lora_fwd_flops_per_token"):
            assert key in v, (name, key)
        assert v["ms_per_step_median"] > 0
    # analytic FLOPs follow the mean active rank
    flops = {n: v["lora_fwd_flops_per_token"] for n, v in result["variants"].items()}
    assert flops["base"] == 0
    assert flops["uniform_r_max"] == pytest.approx(2 * flops["uniform_r_target"])
    assert flops["drlora_init"] == pytest.approx(flops["uniform_r_target"] / 2)
    assert flops["drlora_final"] == pytest.approx(flops["uniform_r_target"])
    assert result["variants"]["drlora_mid"]["mean_rank"] == pytest.approx(6.0)
    assert result["variants"]["drlora_final"]["mean_rank"] == pytest.approx(8.0)
    assert 0 < result["saliency_update"]["ms_median"]
    assert "pct_of_step_max" in result["saliency_update"]
    assert "extra_ms_over_normal_step" in result["growth_event"]
    run = result["whole_run"]
    assert run["events"] == 184 and run["ratio_to_uniform_r_target"] > 0


def test_step_time_memory_probe_in_fresh_processes():
    out = _run(["benchmarks/step_time.py", "--size", "tiny", "--variants", "drlora_final",
                "--reps", "1", "--steps", "1", "--warmup", "1", "--json", "-"])
    result = json.loads(out[out.index("{"):])
    assert set(result["variants"]) == {"uniform_r_target", "drlora_final"}
    assert result["memory_metric"] in ("cpu_peak_mb", "cuda_max_allocated_mb")
    for v in result["variants"].values():
        assert v["peak_memory_mb"] > 0


def test_quality_minimal_end_to_end(tmp_path):
    out_dir = tmp_path / "q"
    out = _run(["benchmarks/quality.py", "--out", str(out_dir), "--seeds", "1",
                "--variants", "uniform_r_target,drlora", "--finetune-iters", "12",
                "--base-iters", "8", "--num-per-domain", "60", "--finetune-records", "80",
                "--eval-prompts", "12", "--num-layers", "2", "--hidden-size", "32",
                "--moe-ffn-hidden-size", "32", "--num-experts", "4", "--batch-size", "4",
                "--vocab-size", "256"])
    assert "| LoRA, uniform r_target |" in out and "| DR-LoRA (full saliency) |" in out
    result = json.load(open(out_dir / "quality.json"))
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("uniform_r_target", 0),
                                                                 ("drlora", 0)]
    for run in result["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["heldout_loss"] > 0
        assert run["final_mean_rank"] == pytest.approx(4.0)  # both end at the budget
        assert os.path.isfile(os.path.join(run["run_dir"], "command.txt"))
    drlora = result["runs"][1]
    assert drlora["events"] and "spearman_rank_vs_target_frequency" in drlora["allocation"]
    assert os.path.isfile(os.path.join(drlora["run_dir"], "drlora_ranks.jsonl"))
    assert (out_dir / "quality.md").read_text().startswith("DR-LoRA quality benchmark")
