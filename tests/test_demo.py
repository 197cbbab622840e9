"""The README's first command keeps working: examples/demo.py --quick end to end."""

import json
import os
import subprocess
import sys

import pytest

from tests.dist_harness import REPO

pytestmark = pytest.mark.slow


def test_quick_demo_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DR-LoRA demo finished" in proc.stdout
    summary = json.load(open(out / "demo_summary.json"))
    assert summary["valid_loss_after"] < summary["valid_loss_before"]
    assert summary["events"] and len(summary["final_rank_map"]) == 4  # 4 MoE layers
    ranks = [r for layer in summary["final_rank_map"] for expert in layer for r in expert]
    assert sum(ranks) == 8 * len(ranks) and max(ranks) > 8  # at budget, heterogeneous
    for name in ("drlora_rank_heatmap.png", "drlora_rank_growth.png"):
        assert (out / "drlora" / name).stat().st_size > 1000
