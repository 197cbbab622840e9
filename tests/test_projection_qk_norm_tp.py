"""OLMoE's whole-projection q/k norm gets the same weight gradient at TP=2 as at TP=1, after
Megatron's finalize_model_grads (which all-reduces, over TP, the gradient of every parameter
named like `q_layernorm` / `k_layernorm`). Two real gloo processes; tests/workers/
qk_norm_grad_worker.py.
"""

import pytest
import torch

from tests.dist_harness import load, run_torchrun

pytestmark = pytest.mark.slow


def test_projection_norm_gradients_tp2_match_tp1(tmp_path):
    runs = {}
    for tp in (1, 2):
        path = tmp_path / f"tp{tp}.pt"
        run_torchrun("qk_norm_grad_worker.py", tp, [path, "--tp", tp])
        runs[tp] = load(path)
    ref, got = runs[1], runs[2]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=0)
    assert len(ref["grads"]) == 4 and set(got["grads"]) == set(ref["grads"])  # 2 layers x q, k
    for name, r in ref["grads"].items():
        torch.testing.assert_close(got["weights"][name], ref["weights"][name], rtol=0, atol=0)
        scale = r.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the test would prove nothing"
        rel = (got["grads"][name] - r).abs().max().item() / scale
        assert rel < 1e-5, f"{name}: TP2 gradient differs from TP1 by {rel:.2e} of its scale"
