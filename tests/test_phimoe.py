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

    groups = ProcessGroupCollection.use_mpu_process_groups()
    return router_builder("sparsemixer", eps)(config=transformer_config(args),
                                              pg_collection=groups)


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


def test_training_mode_model_equals_transformers(megatron_single, tmp_path):
    """In training mode (input jitter, sampled routing, Heun's gradient) the converted model
    gives transformers' logits and router gradients from the same seed: one sequence (the token
    order of Megatron's [s, b] and transformers' [b, s] agree) and dropout 0 (Megatron-LM's
    default is 0.1), so both draw the same random numbers in the same order."""
    from transformers import AutoModelForCausalLM

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    hf_dir = make_hf_model("phimoe", str(tmp_path / "hf"))
    flags = convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)["flags"]
    assert "--moe-layer-input-jitter-eps 0.01" in flags  # hf_tiny's input_jitter_noise
    args_file = str(tmp_path / "base" / "model.args")
    no_dropout = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    chunks, _ = verify.build_megatron(verify.model_args_from_file(args_file, SEQ,
                                                                  extra=no_dropout),
                                      str(tmp_path / "base"))
    ours = chunks[0].train()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    t = tokens(batch=1)
    pos = torch.arange(SEQ).unsqueeze(0)
    g = torch.randn(1, SEQ, VOCAB, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    logits = ours(t, pos, None)[..., :VOCAB]
    (logits * g).sum().backward()
    torch.manual_seed(5)
    ref = hf(input_ids=t).logits
    (ref * g).sum().backward()
    assert verify.max_abs_diff(logits, ref) < TOL
    for layer in range(2):
        ours_grad = ours.decoder.layers[layer].mlp.router.weight.grad
        ref_grad = hf.model.layers[layer].mlp.router.weight.grad
        assert ref_grad.abs().max() > 1.0
        assert torch.allclose(ours_grad, ref_grad, atol=1e-4 * float(ref_grad.abs().max()))
    with torch.no_grad():  # sampling matters: another seed and eval mode route differently
        torch.manual_seed(6)
        assert verify.max_abs_diff(ours(t, pos, None)[..., :VOCAB], logits) > 0.1
        assert verify.max_abs_diff(ours.eval()(t, pos, None)[..., :VOCAB], logits) > 0.1
        unjittered, _ = verify.build_megatron(verify.model_args_from_file(
            args_file, SEQ, extra=no_dropout + ["--moe-layer-input-jitter-eps", "0"]),
            str(tmp_path / "base"))
        torch.manual_seed(5)
        jitter_matters = verify.max_abs_diff(
            unjittered[0].train()(t, pos, None)[..., :VOCAB], logits)
        assert jitter_matters > 1e-3, jitter_matters


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


def test_fused_checkpoint_imports_and_exports_in_its_style(megatron_single, phi_models,
                                                          phi_run, tmp_path):
    """A checkpoint in transformers 5's in-memory names (mlp.router, mlp.experts.gate_up_proj
    [E, 2I, H] gate rows first, mlp.experts.down_proj) converts to the same model, and a merged
    export keeps that style."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    fused = tmp_path / "fused"
    shutil.copytree(phi_models["biases"], fused)
    tensors = load_file(str(fused / "model.safetensors"))
    for layer in range(2):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        per = [[tensors.pop(f"{old}.experts.{e}.{w}.weight") for w in ("w1", "w3", "w2")]
               for e in range(4)]
        tensors[f"{new}.experts.gate_up_proj"] = torch.stack([torch.cat(x[:2]) for x in per])
        tensors[f"{new}.experts.down_proj"] = torch.stack([x[2] for x in per])
        tensors[f"{new}.router.weight"] = tensors.pop(f"{old}.gate.weight")
    save_file(tensors, str(fused / "model.safetensors"))
    convert(str(fused), str(tmp_path / "base"), log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens()
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB),
                               verify.hf_logits(phi_models["biases"], t))
    assert diff < TOL, diff
    save = str(tmp_path / "merged")
    export(phi_run["adapters"], str(fused), "merged", save, log=lambda s: None)
    names = set(safe_open(os.path.join(save, "model.safetensors"), "pt").keys())
    assert "model.layers.0.mlp.router.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    diff = verify.max_abs_diff(verify.hf_logits(save, t), phi_run["logits"])
    assert diff < TOL, diff


def test_output_layer_bias_follows_the_vocabulary_padding(megatron_single, phi_models,
                                                         tmp_path):
    """A base padded to 104 rows loaded into a 128-row model (Megatron-LM pads its own way):
    lm_head.bias moves with the output rows, so transformers' logits are kept."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    hf_dir = phi_models["biases"]
    convert(hf_dir, str(tmp_path / "base"), make_vocab_size_divisible_by=8, log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ,
                                        extra=["--make-vocab-size-divisible-by", "128"])
    assert margs.vocab_size == 128
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    bias = chunks[0].output_layer.bias
    assert bias.shape == (128,) and bias[VOCAB:].abs().max() == 0 and bias.abs().max() > 0.01
    t = tokens()
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB),
                               verify.hf_logits(hf_dir, t))
    assert diff < TOL, diff


@pytest.mark.slow
def test_multiprocess_layouts(megatron_single, phi_models, tmp_path):
    """EP2 and TP2 (sequence parallel: each rank routes its own tokens; the output bias split
    over the vocabulary) in 2 gloo processes give transformers' logits."""
    import json

    from tests.dist_harness import run_torchrun

    out = tmp_path / "diffs.json"
    root = os.path.dirname(phi_models["biases"])
    run_torchrun("hf_convert_worker.py", 2, [root, tmp_path / "save", out, "--layouts",
                                             "ep2:biases,window", "tp2:biases,window"],
                 timeout=300)
    diffs = json.load(open(out))
    assert len(diffs) == 4
    print(diffs)
    for name, diff in diffs.items():
        assert diff < TOL, f"{name}: max |logits diff| {diff}"


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
    base_logits, rank_map = _adapted_checkpoint("phimoe", base, adapters, ("up", "down"))
    margs = verify.model_args_from_file(os.path.join(base, "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, base, adapters)
    return dict(hf=phi_models["biases"], base=base, adapters=adapters, root=root,
                base_logits=base_logits, rank_map=rank_map, targets=("up", "down"), logits=verify.megatron_logits(chunks, tokens(), VOCAB))


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


def test_peft_per_expert_export(phi_run, tmp_path):
    """transformers 4's per-expert layout (block_sparse_moe.experts.E.w1/w3/w2, router
    block_sparse_moe.gate): every module's rank is its rank-map entry and the config's; loaded
    with transformers 4 when DRLORA_TRANSFORMERS4_PATH is set (else skipped after the checks)."""
    from tests.test_hf_export import test_peft_per_expert_export as check

    check(({"phimoe": phi_run}, phi_run["root"]), "phimoe", tmp_path)


# --- the recipe and the converter --------------------------------------------------------------
RECIPE_FEATURE_FLAGS = {"--moe-router-type", "--moe-sparsemixer-jitter-eps", "--window-size",
                        "--add-attention-output-bias", "--add-output-layer-bias",
                        "--moe-layer-input-jitter-eps"}


def _recipe():
    from tests.dist_harness import REPO

    return REPO / "examples" / "recipes" / "phi_mini_moe_drlora.args"


def _phi_mini_moe():
    """microsoft/Phi-mini-MoE-instruct's config.json as far as the converter reads it: the
    paper's shape (32 layers, hidden 4096, 16 experts of 960, top-2) and, for what the paper
    does not state, the Phi-3.5-MoE values it was compressed from (32 heads, 8 KV heads,
    vocabulary 32064, biases, LayerNorm eps 1e-5, router_jitter_noise and input_jitter_noise
    0.01), a 4k context without RoPE scaling."""
    from transformers import PhimoeConfig

    return PhimoeConfig(vocab_size=32064, hidden_size=4096, intermediate_size=960,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        num_local_experts=16, num_experts_per_tok=2, attention_bias=True,
                        lm_head_bias=True, router_jitter_noise=0.01, input_jitter_noise=0.01,
                        sliding_window=None, tie_word_embeddings=False)


def test_recipe_flags_are_the_converters():
    """Every model flag the converter writes for Phi-mini-MoE is in the recipe with the same
    value, and the recipe sets no architecture flag the converter does not."""
    from megatron_drlora.hf.families import describe
    from tests.test_hf_import import ARCHITECTURE_FLAGS, _flags

    converter = _flags(describe(_phi_mini_moe()).flags())
    recipe = _flags(open(_recipe()).read().splitlines())

    from tests.recipes import assert_recipe_fits_converter, same_values as same

    assert_recipe_fits_converter(recipe, converter, ARCHITECTURE_FLAGS | RECIPE_FEATURE_FLAGS)
    # the paper's Table 6 (Phi column)
    for flag, value in {"--drlora-budget": ["16"], "--drlora-rank-init": ["8"],
                        "--drlora-rank-max": ["32"], "--drlora-grow-interval": ["200"],
                        "--drlora-grow-buffer": ["200"], "--drlora-p-grow": ["0.1"],
                        "--drlora-beta": ["0.9"], "--drlora-gamma": ["1.2"],
                        "--train-iters": ["19000"], "--global-batch-size": ["32"],
                        "--micro-batch-size": ["1"], "--seq-length": ["4096"],
                        "--lr": ["2e-5"], "--lr-decay-style": ["linear"],
                        "--lr-warmup-fraction": ["0.03"], "--weight-decay": ["0.0"]}.items():
        assert same(recipe.get(flag), value), (flag, recipe.get(flag))


def _tiny_recipe_argv(base, replace):
    from tests.recipes import tiny_recipe_argv

    return tiny_recipe_argv(_recipe(), base, replace)


def _recipe_shaped_model(path):
    """A tiny random Phi-MoE with the recipe's architecture (biases, untied embeddings, norm
    eps, RoPE base, sparsemixer window): only its sizes differ from Phi-mini-MoE."""
    return make_hf_model("phimoe", path, router_jitter_noise=0.01, rms_norm_eps=1e-5,
                         rope_theta=10000.0)


def test_recipe_loads_a_converted_base(megatron_single, tmp_path):
    """The recipe's model flags with only the sizes and layout replaced by a tiny random
    Phi-MoE's build a model that loads its converted base and gives transformers' logits."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs, padded_vocab_size
    from tests.test_hf_import import LAYOUT_FLAGS

    hf_dir = _recipe_shaped_model(str(tmp_path / "hf"))
    base = str(tmp_path / "base")
    convert(hf_dir, base, log=lambda s: None)
    args = parse_megatron_args(_tiny_recipe_argv(base, dict(LAYOUT_FLAGS,
                                                            **{"--seq-length": str(SEQ)})))
    assert args.moe_router_type == "sparsemixer" and args.normalization == "LayerNorm"
    margs = MoEModelArgs.from_megatron_args(
        args, padded_vocab_size(args.vocab_size, 1, args.make_vocab_size_divisible_by))
    chunks, _ = verify.build_megatron(margs, base)
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, tokens(), VOCAB),
                               verify.hf_logits(hf_dir, tokens()))
    assert diff < TOL, diff


@pytest.mark.slow
def test_recipe_trains_with_growth_and_exports(tmp_path):
    """End to end on a tiny random Phi-MoE with a Hugging Face tokenizer: convert, run the
    recipe through examples/pretrain_gpt.py (2 processes, EP2; sizes, length, batch and data
    replaced) with growth events and the router trained after warm-up, then export merged and
    PEFT with --verify (transformers + peft against the Megatron model with the adapters)."""
    import sys

    from megatron_drlora.hf.importer import convert
    from tests.dist_harness import REPO
    from tests.hf_tiny import make_tokenizer
    from tests.test_hf_export import _cli
    from tests.megatron_runs import events, torchrun

    hf_dir = _recipe_shaped_model(str(tmp_path / "hf"))
    make_tokenizer(hf_dir)
    base, ckpt = str(tmp_path / "base"), str(tmp_path / "ckpt")
    convert(hf_dir, base, log=lambda s: None)
    from tests.recipes import training_argv

    from tests.hf_tiny import make_chat_data

    data = make_chat_data(hf_dir, tmp_path / "data")  # chat rendered with its template
    argv = training_argv(_recipe(), base, ckpt, hf_dir, SEQ, nproc=2, data=data)
    torchrun(2, argv, timeout=900)
    grown = events(tmp_path / "ckpt")
    assert [e["iteration"] for e in grown] == [2, 4, 6]
    ranks = torch.tensor(grown[-1]["rank_map"])
    assert ranks.min() >= 8 and ranks.max() > 8  # r_init 8, grown

    for fmt in ("merged", "peft"):
        out = _cli([sys.executable, REPO / "tools" / "export_to_hf.py", "--load", ckpt,
                    "--pretrained-checkpoint", base, "--hf-path", hf_dir, "--format", fmt,
                    "--save", tmp_path / fmt, "--verify"], timeout=600)
        assert "> verified" in out, out[-2000:]
        print(fmt, [line for line in out.splitlines() if "> verified" in line])
