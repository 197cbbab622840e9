"""Adapters and DR-LoRA statistics are exactly right under every parallel layout.

Each layout runs the same global model (identity-seeded base, identical adapters with grown,
heterogeneous ranks) on the same global batch in 2-4 real gloo processes, and is compared with
the single-process run: logits and loss within 1e-5, every adapter gradient (gathered to global
expert index) within 1e-5 of that tensor's largest entry, saliency statistics within 1e-6
relative, the same growth decision, and identical replicas after a step of Megatron's optimizer
(plain or distributed) with the same gradient norm (tests/workers/parity_worker.py). With
expert-TP > 1 DR-LoRA issues exactly one expert-TP all-reduce per MoE layer per step. The
single-process adapter gradients are themselves checked against an independent plain-PyTorch
MoE with LoRA on each expert (no megatron_drlora.adapters code), at heterogeneous ranks.
"""

import pytest
import torch

from tests.dist_harness import load, run_torchrun

pytestmark = pytest.mark.slow

LAYOUTS = {
    "dp2": (2, []),
    "tp2_sp": (2, ["--tp", "2"]),                      # ETP defaults to TP: experts sharded too
    "ep2_alltoall": (2, ["--ep", "2", "--dispatcher", "alltoall"]),
    "ep2_allgather": (2, ["--ep", "2", "--dispatcher", "allgather"]),
    "etp2_tp1": (2, ["--etp", "2"]),                   # expert-TP != TP
    "pp2": (2, ["--pp", "2"]),
    "tp2_ep2": (4, ["--tp", "2", "--ep", "2"]),
    "tp2_ep2_etp1": (4, ["--tp", "2", "--ep", "2", "--etp", "1"]),
    "dp2_distributed_optimizer": (2, ["--dist-opt"]),
    "ep2_dp2_distributed_optimizer": (4, ["--ep", "2", "--dist-opt"]),
    # expert-TP replicas each owning a distributed-optimizer shard, gradients reduced while
    # backward runs, two micro-batches per rank
    "etp2_edp2_distributed_optimizer_overlap": (4, ["--etp", "2", "--dist-opt", "--overlap",
                                                    "--micro", "1"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = {}
    for layers in (2, 4):
        path = tmp_path_factory.mktemp("ref") / f"ref{layers}.pt"
        run_torchrun("parity_worker.py", 1, [path, "--layers", layers])
        out[layers] = load(path)
    return out


def _assert_close_to_scale(got, ref, key, rel=1e-5):
    """max |got - ref| <= rel x max |ref|, per tensor: gradients are ~1e-4, so an absolute
    1e-5 tolerance would accept errors of 10%."""
    assert got.shape == ref.shape, key
    scale = ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"{key}: max abs difference {err:.3e} > {rel:g} x {scale:.3e}"


def _compare(ref, got):
    assert got["logits"].shape == ref["logits"].shape
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    for key, g in ref["grads"].items():
        assert g.abs().max() > 0 or key[2] == "B", key
        _assert_close_to_scale(got["grads"][key], g, key)
    for name in ("frequency", "importance"):
        r, o = ref[name], got[name]
        assert r.abs().max() > 0, f"{name} is all zero: the test would prove nothing"
        rel = ((o - r).abs() / r.abs().clamp_min(1e-12 * r.abs().max())).max().item()
        assert rel < 1e-6, f"{name}: relative difference {rel:.2e}"
    assert ref["event"] and got["event"]
    assert torch.equal(got["rank_map"], ref["rank_map"]), "different growth decision"
    assert got["replica_mismatches"] == []
    assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
    _assert_one_expert_tp_reduction_per_bank(got)


def _assert_one_expert_tp_reduction_per_bank(got):
    """The replicated factors' gradients are summed over expert-TP once per MoE layer per step,
    whatever the number of micro-batches and local experts (none without expert-TP)."""
    for rank, (count, banks, micro_batches, etp) in enumerate(got["etp_reductions"]):
        expected = banks if etp > 1 else 0
        assert count == expected, (f"rank {rank}: {count} expert-TP all-reduces in a step of "
                                   f"{micro_batches} micro-batches, expected {expected}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, flags = LAYOUTS[layout]
    out = tmp_path / "out.pt"
    run_torchrun("parity_worker.py", nproc, [out] + flags)
    _compare(reference[2], load(out))


# --drlora-rank-pool against the dense bank with the same (budget-fitting) rank map and values
POOL_LAYOUTS = {
    "one_process": (1, []),
    "dp2_distributed_optimizer": (2, ["--dist-opt"]),
    "ep2_alltoall": (2, ["--ep", "2", "--dispatcher", "alltoall"]),
    "etp2_tp1": (2, ["--etp", "2"]),
}


@pytest.fixture(scope="module")
def fit_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "fit.pt"
    run_torchrun("parity_worker.py", 1, [path, "--fit-budget"])
    return load(path)


@pytest.mark.parametrize("layout", sorted(POOL_LAYOUTS))
def test_rank_pool_layout_matches_the_dense_bank(layout, fit_reference, tmp_path):
    nproc, flags = POOL_LAYOUTS[layout]
    out = tmp_path / "out.pt"
    run_torchrun("parity_worker.py", nproc, [out, "--rank-pool"] + flags)
    _compare(fit_reference, load(out))


def test_virtual_pipeline_matches_single_process(reference, tmp_path):
    out = tmp_path / "out.pt"
    run_torchrun("parity_worker.py", 2, [out, "--layers", 4, "--pp", 2, "--vpp", 2])
    _compare(reference[4], load(out))


def test_global_allocation_under_pipeline_matches(tmp_path):
    ref, out = tmp_path / "ref.pt", tmp_path / "out.pt"
    run_torchrun("parity_worker.py", 1, [ref, "--allocation", "global"])
    run_torchrun("parity_worker.py", 2, [out, "--pp", 2, "--allocation", "global"])
    _compare(load(ref), load(out))


def test_single_process_adapter_grads_match_independent_reference(reference):
    """Every A and B gradient, per expert, against plain PyTorch (heterogeneous active ranks;
    inactive slots exactly zero in both)."""
    for layers, ref in reference.items():
        rank_map_ranks = set()
        assert set(ref["reference_grads"]) == set(ref["grads"])
        for key, expected in ref["reference_grads"].items():
            got = ref["grads"][key]
            assert expected.abs().max() > 0, f"{key}: reference gradient all zero"
            for e in range(expected.shape[0]):
                _assert_close_to_scale(got[e], expected[e], (layers,) + key + (e,))
            inactive = (expected == 0) & (got != 0)
            assert not inactive.any(), f"{key}: gradient in an inactive rank slot"
            for e in range(expected.shape[0]):
                slots = expected[e] if key[2] == "A" else expected[e].T
                rank_map_ranks.add(int((slots.abs().sum(dim=1) > 0).sum()))
        assert len(rank_map_ranks) > 2, f"ranks not heterogeneous: {rank_map_ranks}"


def test_perturbed_rank_applies_rank0_map(reference, tmp_path):
    """Rank 1's layer-0 saliency is reversed, so its own allocator chooses another map; both
    ranks still apply global rank 0's (which is the unperturbed single-process decision)."""
    path = tmp_path / "o.pt"
    out = run_torchrun("parity_worker.py", 2, [path, "--ep", "2", "--perturb-rank", "1"])
    assert "DISAGREEMENT" not in out, out[-3000:]
    got = load(path)
    own = got["own_choice_per_rank"]
    assert not torch.equal(own[0], own[1]), "the perturbation did not change rank 1's choice"
    assert torch.equal(own[0], reference[2]["rank_map"])
    for r, (m, applied) in enumerate(zip(got["rank_maps_per_rank"],
                                         got["applied_maps_per_rank"])):
        assert torch.equal(m, own[0]), f"rank {r} holds another map than rank 0"
        here = applied >= 0
        assert here.any() and torch.equal(applied[here], own[0][here]), \
            f"rank {r}'s banks apply another map"
    assert got["replica_mismatches"] == []
