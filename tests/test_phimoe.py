"""Phi-MoE (PhimoeForCausalLM): the sparsemixer router against transformers' own (eval and
training mode, gradients included), import with logits parity (LayerNorm with bias, q/k/v and
o_proj biases, lm_head bias, sliding window), merged and PEFT export parity, refusals by key,
the recipe against the converter, and (slow) the recipe through examples/pretrain_gpt.py."""

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.hf_tiny import SEQ, VOCAB, make_hf_model, tokens  # noqa: E402

TOL = 1e-4


# --- the router --------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3])
def test_sparsemixer_equals_transformers(training, eps):
    """Same experts, weights and router-logit gradients as transformers' sparsemixer; in
    training mode with the same seed (Gumbel sampling + Heun's multiplier)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as reference

    from megatron_drlora.routers import sparsemixer

    scores = torch.randn(256, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = scores * 2
    ours, theirs = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    torch.manual_seed(7)
    w_ref, e_ref = reference(theirs, jitter_eps=eps, training=training)
    torch.manual_seed(7)
    w, e = sparsemixer(ours, eps, training)
    assert torch.equal(e, e_ref)
    assert torch.equal(w, w_ref)
    assert (e[:, 0] != e[:, 1]).all()
    grad = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(2))
    (w * grad).sum().backward()
    (w_ref * grad).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
    if eps > 0:  # eps 0 keeps only the max logit: weights 1, no gradient
        assert ours.grad.abs().max() > 0.01
    if eps > 0.2:  # a wide window: the weights are not 1 (several logits survive the mask)
        assert (w < 0.999).any()
    if training:  # sampling differs from the arg-max somewhere
        torch.manual_seed(7)
        assert not torch.equal(e, sparsemixer(scores, eps, False)[1]) or eps == 0.0


def _megatron_router(hidden: int, experts: int, eps: float):
    from megatron_drlora.modeling import MoEModelArgs, transformer_config
    from megatron_drlora.routers import router_builder

    args = MoEModelArgs(hidden_size=hidden, num_attention_heads=4, num_experts=experts,
                        moe_router_topk=2)
    from megatron.core.process_groups_config import ProcessGroupCollection

    return router_builder("sparsemixer", eps)(
        config=transformer_config(args), pg_collection=ProcessGroupCollection.use_mpu_process_groups())


@pytest.mark.parametrize("training", [False, True])
def test_megatron_router_equals_phimoe_router(megatron_single, training):
    """The Megatron router module (dense probs + routing map) routes like transformers'
    PhimoeTopKRouter with the same weight; probs carry the gradient back to the input."""
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    from tests.hf_tiny import hf_config

    cfg = hf_config("phimoe", input_jitter_noise=0.0)
    hf = PhimoeTopKRouter(cfg)
    ours = _megatron_router(cfg.hidden_size, cfg.num_local_experts, cfg.router_jitter_noise)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=torch.Generator().manual_seed(3)))
        ours.weight.copy_(hf.weight)
    hf.train(training)
    ours.train(training)
    x = torch.randn(SEQ, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(11)
    _, w_ref, e_ref = hf(xa.reshape(-1, cfg.hidden_size))
    torch.manual_seed(11)
    probs, routing_map = ours(xb)
    expect = torch.zeros_like(probs).scatter(1, e_ref, w_ref)
    assert torch.equal(routing_map, expect > 0)
    assert torch.allclose(probs, expect, atol=1e-6)
    g = torch.randn(probs.shape, generator=torch.Generator().manual_seed(5))
    (probs * g).sum().backward()
    (expect * g).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)


def test_routing_statistics_see_the_sparsemixer_routing(megatron_single, tmp_path):
    """DR-LoRA's router hook counts the sparsemixer's experts and weights (train mode)."""
    from megatron_drlora import DRLoRAConfig
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.inject import apply_drlora
    from megatron_drlora.statistics import RoutingStatistics

    hf_dir = make_hf_model("phimoe", str(tmp_path / "hf"))
    convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    handle = apply_drlora(chunks, DRLoRAConfig(budget=4, p_grow=0.5), log=lambda s: None)
    stats = RoutingStatistics(handle)
    seen = []
    router = handle.layers[0].moe_layer.router
    assert type(router).__name__ == "SparseMixerRouter"
    hook = router.register_forward_hook(lambda m, a, out: seen.append(out))
    chunks[0].train()
    t = tokens()
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(t)
    chunks[0](t, pos, None)
    hook.remove()
    probs, routing_map = seen[0]
    assert torch.equal(routing_map.sum(1), torch.full((t.numel(),), 2))
    assert torch.allclose(stats.routed[0], probs.detach().sum(0).double())
    assert torch.equal(stats.counts[0], routing_map.sum(0).double())
    assert float(stats.tokens[0]) == t.numel()


# --- import ------------------------------------------------------------------------------------
VARIANTS = {
    # LayerNorm with bias, q/k/v + o_proj biases, lm_head bias, a wide sparsemixer window
    "biases": {},
    # transformers' sliding window (5 positions < SEQ): Megatron's --window-size 4,0
    "window": dict(sliding_window=5),
    # no attention / lm_head biases, tied embeddings, Phi's own window eps
    "plain": dict(attention_bias=False, lm_head_bias=False, tie_word_embeddings=True,
                  router_jitter_noise=0.01),
}


@pytest.fixture(scope="module")
def phi_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("phimoe")
    return {name: make_hf_model("phimoe", str(root / name), **kw)
            for name, kw in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers(megatron_single, phi_models, tmp_path, variant):
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    hf_dir = phi_models[variant]
    flags = convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)["flags"]
    assert "--normalization LayerNorm" in flags and "--moe-router-type sparsemixer" in flags
    assert "--moe-router-pre-softmax" not in flags
    biased = variant != "plain"
    for flag in ("--add-qkv-bias", "--add-attention-output-bias", "--add-output-layer-bias"):
        assert (flag in flags) == biased, (flag, flags)
    assert ("--window-size 4,0" in flags) == (variant == "window")
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens()
    hf = verify.hf_logits(hf_dir, t)
    assert float(hf.abs().max()) > 1.0
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB), hf)
    assert diff < TOL, f"{variant}: max |logits diff| {diff}"
    if variant == "window":  # the window changes transformers' logits: the check has teeth
        assert verify.max_abs_diff(hf, verify.hf_logits(phi_models["biases"], t)) > 0.1


def test_megatron_routing_is_not_topk_softmax(megatron_single, phi_models, tmp_path):
    """The same base built with Megatron's default router gives other logits: the sparsemixer
    is what makes the parity."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    convert(phi_models["biases"], str(tmp_path / "base"), log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ,
                                        extra=["--moe-router-type", "topk"])
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens()
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB),
                               verify.hf_logits(phi_models["biases"], t))
    assert diff > 0.05


@pytest.mark.parametrize("override,key", [
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                        "long_factor": [2.0] * 4, "original_max_position_embeddings": 32,
                        "short_mscale": 1.0, "long_mscale": 1.1}),
     "rope"),
    (dict(num_experts_per_tok=4), "num_experts_per_tok"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_phimoe_features_are_refused_by_key(tmp_path, override, key):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe
    from tests.hf_tiny import hf_config

    with pytest.raises(HFInteropError, match=key):
        describe(hf_config("phimoe", **override), str(tmp_path))


def test_unsupported_model_type_names_phimoe_among_the_supported(tmp_path):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import family_of

    with pytest.raises(HFInteropError, match=r"model_type='dbrx'.*phimoe \(PhimoeForCausalLM\)"):
        family_of({"model_type": "dbrx", "architectures": ["DbrxForCausalLM"]}, str(tmp_path))


# --- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phi_run(megatron_single, phi_models, tmp_path_factory):
    """A converted Phi-MoE base with a DR-LoRA checkpoint (grown ranks, trained router)."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from tests.test_hf_export import _adapted_checkpoint

    root = tmp_path_factory.mktemp("phi_export")
    base, adapters = str(root / "base"), str(root / "adapters")
    convert(phi_models["biases"], base, log=lambda s: None)
    base_logits, _ = _adapted_checkpoint("phimoe", base, adapters, ("up", "down"))
    margs = verify.model_args_from_file(os.path.join(base, "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, base, adapters)
    return dict(hf=phi_models["biases"], base=base, adapters=adapters, root=root,
                base_logits=base_logits, logits=verify.megatron_logits(chunks, tokens(), VOCAB))


@pytest.mark.parametrize("source", ["megatron_base", "hf_base"])
def test_merged_export_matches_megatron(phi_run, source):
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export

    save = str(phi_run["root"] / f"merged_{source}")
    kw = dict(pretrained_checkpoint=phi_run["base"]) if source == "megatron_base" else {}
    export(phi_run["adapters"], phi_run["hf"], "merged", save, log=lambda s: None, **kw)
    assert verify.max_abs_diff(phi_run["logits"], phi_run["base_logits"]) > 0.05
    diff = verify.max_abs_diff(verify.hf_logits(save, tokens()), phi_run["logits"])
    assert diff < TOL, f"merged ({source}): {diff}"


def test_peft_export_matches_megatron(phi_run):
    pytest.importorskip("peft")
    import json

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export

    save = str(phi_run["root"] / "peft")
    export(phi_run["adapters"], phi_run["hf"], "peft", save, log=lambda s: None)
    config = json.load(open(os.path.join(save, "adapter_config.json")))
    assert config["modules_to_save"] == ["mlp.router"]  # transformers 5's Phi-MoE router
    diff = verify.max_abs_diff(verify.hf_logits(phi_run["hf"], tokens(), adapter=save),
                               phi_run["logits"])
    assert diff < TOL, f"peft: {diff}"
