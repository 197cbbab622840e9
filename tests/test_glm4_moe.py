"""GLM-4.5 (Glm4MoeForCausalLM): Megatron's sigmoid router against transformers' own, import
with logits parity (partial RoPE, q/k/v biases, q/k norm, a dense first layer, a shared expert,
expert bias, group-limited top-k, scaled weights, MTP layers skipped), merged and PEFT exports of
a DR-LoRA checkpoint, refusals by key, the recipe against the converter, and (slow) EP2 and the
recipe through examples/pretrain_gpt.py."""

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.hf_tiny import SEQ, VOCAB, hf_config, make_hf_model, tokens  # noqa: E402

TOL = 1e-4


# --- the router --------------------------------------------------------------------------------
def _routers(**overrides):
    """transformers' Glm4MoeTopkRouter and the Megatron router the converter's flags build, with
    the same random weight and expert bias."""
    from megatron_drlora.hf.families import describe

    cfg = hf_config("glm4_moe", **overrides)
    return _built(cfg, describe(cfg))


def _route(cfg, hf, ours):
    x = torch.randn(SEQ, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, w, e = hf(x.reshape(-1, cfg.hidden_size))
        probs, routing_map = ours(x)
    return torch.zeros_like(probs).scatter(1, e, w), probs, routing_map


@pytest.mark.parametrize("overrides", [
    {},  # 8 experts in 4 groups, 2 groups kept, top-4, scaling 1.5
    dict(n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0),  # Air's
    dict(n_group=2, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5),
], ids=["groups", "air", "one_group_of_two"])
def test_megatron_router_equals_glm4_moe_router(megatron_single, overrides):
    """Same experts and weights as transformers (eval mode): sigmoid scores, the expert bias for
    the choice only, group-limited top-k, renormalised and scaled."""
    expect, probs, routing_map = _route(*_routers(**overrides))
    assert torch.equal(routing_map, expect > 0)
    assert torch.allclose(probs, expect, atol=1e-6, rtol=0)


def test_router_differences_that_are_refused(megatron_single):
    """Where Megatron's router differs from transformers' the converter refuses: group scores of
    the top-(topk / topk_group) (here top-3) instead of transformers' top-2, and
    norm_topk_prob false (Megatron always renormalises a sigmoid top-k > 1). The Megatron router
    built anyway routes or weighs differently from transformers'."""
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe

    for over, key in ((dict(num_experts_per_tok=6), "topk_group"),
                      (dict(norm_topk_prob=False), "norm_topk_prob")):
        with pytest.raises(HFInteropError, match=key):
            describe(hf_config("glm4_moe", **over))
    # top-6 of 16 experts in 4 groups keeping 2: an accepted config's description, groups set
    wide = dict(n_routed_experts=16, num_experts_per_tok=6)
    desc = describe(hf_config("glm4_moe", topk_group=4, **wide))
    desc.router_num_groups, desc.router_group_topk = 4, 2
    expect, probs, routing_map = _route(*_built(hf_config("glm4_moe", **wide), desc))
    assert not torch.equal(routing_map, expect > 0)
    desc = describe(hf_config("glm4_moe"))
    expect, probs, routing_map = _route(*_built(hf_config("glm4_moe", norm_topk_prob=False),
                                                desc))
    assert torch.equal(routing_map, expect > 0)
    assert not torch.allclose(probs, expect, atol=1e-3)


def _built(cfg, desc):
    """transformers' router of `cfg` and the Megatron router of `desc`, same weights."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    from megatron_drlora.modeling import MoEModelArgs, transformer_config

    hf = Glm4MoeTopkRouter(cfg).eval()
    ours = TopKRouter(config=transformer_config(MoEModelArgs(**desc.model_kwargs(128))),
                      pg_collection=ProcessGroupCollection.use_mpu_process_groups()).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        hf.e_score_correction_bias.copy_(0.3 * torch.randn(hf.weight.shape[0], generator=g))
        ours.weight.copy_(hf.weight)
        ours.expert_bias.copy_(hf.e_score_correction_bias)
    return cfg, hf, ours


# --- import ------------------------------------------------------------------------------------
VARIANTS = {
    # q/k norm, q/k/v biases, partial RoPE 0.5, dense layer 0, groups, scaling 1.5
    "groups": {},
    # GLM-4.5-Air's router and attention: one group, no q/k norm, scaling 1, top-2 of 8
    "air": dict(n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0,
                use_qk_norm=False),
    # a multi-token-prediction layer in the checkpoint (skipped), full RoPE, two dense layers
    "mtp": dict(num_nextn_predict_layers=1, partial_rotary_factor=1.0, first_k_dense_replace=2),
}


def _add_mtp_tensors(hf_dir, layers):
    """The MTP layer's tensors as GLM-4.5 checkpoints store them (model.layers.L.*, L = the
    decoder layer count), which transformers' causal LM does not load."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                 "shared_head.norm.weight", "self_attn.q_proj.weight"):
        tensors[f"model.layers.{layers}.{name}"] = torch.ones(4, 4)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def glm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4_moe")
    out = {name: make_hf_model("glm4_moe", str(root / name), **kw)
           for name, kw in VARIANTS.items()}
    _add_mtp_tensors(out["mtp"], 3)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers(megatron_single, glm_models, tmp_path, variant):
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    hf_dir = glm_models[variant]
    logs = []
    flags = convert(hf_dir, str(tmp_path / "base"), log=logs.append)["flags"]
    for flag in ("--moe-router-score-function sigmoid", "--moe-router-enable-expert-bias",
                 "--moe-router-dtype fp32",
                 "--add-qkv-bias", "--moe-shared-expert-intermediate-size 24"):
        assert flag in flags, (flag, flags)
    dense = 2 if variant == "mtp" else 1
    assert f"--moe-layer-freq [0]*{dense}+[1]*{3 - dense}" in flags
    assert ("--rotary-percent 0.5" in flags) == (variant != "mtp")
    assert ("--qk-layernorm" in flags) == (variant != "air")
    assert ("--moe-router-num-groups 4" in flags) == (variant != "air")
    assert any("multi-token-prediction" in s for s in logs) == (variant == "mtp")
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens()
    hf = verify.hf_logits(hf_dir, t)
    assert float(hf.abs().max()) > 1.0
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB), hf)
    print(f"{variant}: max |logits diff| {diff:.3g}")
    assert diff < TOL, f"{variant}: max |logits diff| {diff}"


def test_expert_bias_and_partial_rope_change_the_logits(megatron_single, glm_models, tmp_path):
    """The parity has teeth: transformers' logits move when the expert bias is zeroed or the
    RoPE is full, so a converter that dropped either would fail the parity test."""
    from transformers import AutoModelForCausalLM

    from megatron_drlora.hf import verify

    t = tokens()
    ref = verify.hf_logits(glm_models["groups"], t)
    model = AutoModelForCausalLM.from_pretrained(glm_models["groups"], dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert verify.max_abs_diff(verify.hf_logits(model, t), ref) > 1e-2
    full = make_hf_model("glm4_moe", str(tmp_path / "full"), partial_rotary_factor=1.0)
    assert verify.max_abs_diff(verify.hf_logits(full, t), ref) > 1e-2


@pytest.mark.parametrize("override,key", [
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(num_experts_per_tok=1), "norm_topk_prob"),
    (dict(num_experts_per_tok=6), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(partial_rotary_factor=0.1875), "partial_rotary_factor"),  # rotary dim 3
    (dict(first_k_dense_replace=3), "first_k_dense_replace"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                           "original_max_position_embeddings": 32}), "rope_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_glm4_moe_features_are_refused_by_key(tmp_path, override, key):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe

    with pytest.raises(HFInteropError, match=key):
        describe(hf_config("glm4_moe", **override), str(tmp_path))


@pytest.mark.slow
def test_expert_parallel_layout(megatron_single, glm_models, tmp_path):
    """EP2 (2 gloo processes, 4 experts per rank) gives transformers' logits; the EP2 base
    also loads at EP1 to the same logits."""
    import json

    from megatron_drlora.hf import verify
    from tests.dist_harness import run_torchrun

    root = tmp_path / "hf"
    os.makedirs(root)
    os.symlink(glm_models["groups"], root / "glm4_moe")
    out = tmp_path / "diffs.json"
    run_torchrun("hf_convert_worker.py", 2, [root, tmp_path / "save", out, "--layouts",
                                             "ep2:glm4_moe"], timeout=300)
    diffs = json.load(open(out))
    print(diffs)
    assert diffs["glm4_moe/ep2"] < TOL, diffs
    base = str(tmp_path / "save" / "ep2" / "glm4_moe")
    chunks, _ = verify.build_megatron(
        verify.model_args_from_file(os.path.join(base, "model.args"), SEQ), base)
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, tokens(), VOCAB),
                               verify.hf_logits(glm_models["groups"], tokens()))
    assert diff < TOL, diff


# --- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm_run(megatron_single, glm_models, tmp_path_factory):
    """A converted GLM-4.5 base with a DR-LoRA checkpoint as a run leaves it: grown ranks, a
    trained router and an expert bias moved by Megatron's bias update (here: by hand)."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from tests.tiny import save_run_like_checkpoint

    root = tmp_path_factory.mktemp("glm_export")
    base, adapters = str(root / "base"), str(root / "adapters")
    convert(glm_models["groups"], base, log=lambda s: None)
    margs, handle, base_logits, rank_map = save_run_like_checkpoint(base, adapters, SEQ, VOCAB,
                                                                   tokens())
    assert [layer.layer for layer in handle.layers] == [1, 2]  # layer 0 is dense
    assert all(layer.moe_layer.router.expert_bias is not None for layer in handle.layers)
    chunks, _ = verify.build_megatron(margs, base, adapters)  # reloaded from disk
    return dict(hf=glm_models["groups"], base=base, adapters=adapters, root=root,
                base_logits=base_logits, rank_map=rank_map,
                logits=verify.megatron_logits(chunks, tokens(), VOCAB))


@pytest.mark.parametrize("source", ["megatron_base", "hf_base"])
def test_merged_export_matches_megatron(glm_run, source):
    from safetensors import safe_open

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export

    save = str(glm_run["root"] / f"merged_{source}")
    kw = dict(pretrained_checkpoint=glm_run["base"]) if source == "megatron_base" else {}
    export(glm_run["adapters"], glm_run["hf"], "merged", save, log=lambda s: None, **kw)
    assert verify.max_abs_diff(glm_run["logits"], glm_run["base_logits"]) > 0.05
    diff = verify.max_abs_diff(verify.hf_logits(save, tokens()), glm_run["logits"])
    print(f"merged ({source}): max |logits diff| {diff:.3g}")
    assert diff < TOL, f"merged ({source}): {diff}"
    out = safe_open(os.path.join(save, "model.safetensors"), "pt")
    assert "model.layers.0.mlp.gate_proj.weight" in set(out.keys())
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # the trained one, not the base's
    base = safe_open(os.path.join(glm_run["hf"], "model.safetensors"), "pt").get_tensor(bias)
    assert (out.get_tensor(bias) - base).abs().max() > 0.05


def test_bf16_merged_export_keeps_the_expert_bias_fp32(glm_run):
    from safetensors import safe_open

    from megatron_drlora.hf.exporter import export

    save = str(glm_run["root"] / "merged_bf16")
    export(glm_run["adapters"], glm_run["hf"], "merged", save, dtype="bfloat16",
           log=lambda s: None)
    out = safe_open(os.path.join(save, "model.safetensors"), "pt")
    assert out.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == \
        torch.float32
    assert out.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16


def test_peft_export_matches_megatron(glm_run):
    """PEFT adapters on the routed experts only (no shared expert, no dense layer); the router
    (weight and expert bias) as modules_to_save."""
    pytest.importorskip("peft")
    import json

    from safetensors import safe_open

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export

    save = str(glm_run["root"] / "peft")
    export(glm_run["adapters"], glm_run["hf"], "peft", save, log=lambda s: None)
    config = json.load(open(os.path.join(save, "adapter_config.json")))
    assert config["modules_to_save"] == ["mlp.gate"]
    names = set(safe_open(os.path.join(save, "adapter_model.safetensors"), "pt").keys())
    lora = sorted(n for n in names if "lora_" in n)
    assert lora and all(".mlp.experts." in n and ".layers.0." not in n for n in lora), lora
    assert not any("shared_experts" in n for n in names)
    assert "base_model.model.model.layers.2.mlp.gate.e_score_correction_bias" in names
    diff = verify.max_abs_diff(verify.hf_logits(glm_run["hf"], tokens(), adapter=save),
                               glm_run["logits"])
    print(f"peft: max |logits diff| {diff:.3g}")
    assert diff < TOL, f"peft: {diff}"


def test_fused_checkpoint_imports_and_exports_in_its_style(glm_run, tmp_path):
    """A checkpoint in transformers 5's in-memory names (the model's own state_dict:
    mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj) converts to the same model, and
    a merged export keeps that style and equals the Megatron model."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    fused = tmp_path / "fused"
    shutil.copytree(glm_run["hf"], fused)
    model = AutoModelForCausalLM.from_pretrained(glm_run["hf"], dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    convert(str(fused), str(tmp_path / "base"), log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens()
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, t, VOCAB),
                               verify.hf_logits(glm_run["hf"], t))
    assert diff < TOL, diff
    save = str(tmp_path / "merged")
    export(glm_run["adapters"], str(fused), "merged", save, log=lambda s: None)
    names = set(safe_open(os.path.join(save, "model.safetensors"), "pt").keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    diff = verify.max_abs_diff(verify.hf_logits(save, t), glm_run["logits"])
    assert diff < TOL, diff


# --- the recipe and the converter --------------------------------------------------------------
GLM_FLAGS = {"--moe-router-enable-expert-bias", "--moe-router-num-groups",
             "--moe-router-group-topk", "--moe-router-topk-scaling-factor"}


def _recipe():
    from tests.dist_harness import REPO

    return REPO / "examples" / "recipes" / "glm45_air_drlora.args"


def _glm45_air():
    """zai-org/GLM-4.5-Air's config.json as far as the converter reads it."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.5,
        attention_bias=True, max_position_embeddings=131072, moe_intermediate_size=1408,
        norm_topk_prob=True, n_group=1, topk_group=1, n_routed_experts=128, n_shared_experts=1,
        routed_scaling_factor=1.0, num_experts_per_tok=8, first_k_dense_replace=1,
        rms_norm_eps=1e-5, rope_theta=1000000, num_nextn_predict_layers=1,
        tie_word_embeddings=False, use_qk_norm=False)


def test_recipe_flags_are_the_converters():
    """Every model flag the converter writes for GLM-4.5-Air is in the recipe with the same
    value, and the recipe sets no architecture flag the converter does not."""
    from megatron_drlora.hf.families import describe
    from tests.recipes import assert_recipe_fits_converter
    from tests.test_hf_import import ARCHITECTURE_FLAGS, _flags

    converter = _flags(describe(_glm45_air()).flags())
    recipe = _flags(open(_recipe()).read().splitlines())
    assert_recipe_fits_converter(recipe, converter, ARCHITECTURE_FLAGS | GLM_FLAGS,
                                 same=lambda a, b: a == b)
    # the paper's OLMoE column (schedule) with half its ranks, alpha = 2 x r_max
    for flag, value in {"--drlora-budget": ["32"], "--drlora-rank-init": ["16"],
                        "--drlora-rank-max": ["64"], "--drlora-alpha": ["128"],
                        "--drlora-grow-interval": ["200"], "--drlora-grow-buffer": ["200"],
                        "--drlora-p-grow": ["0.1"], "--drlora-beta": ["0.9"],
                        "--drlora-gamma": ["1.2"], "--drlora-targets": ["up,down"],
                        "--lr": ["2e-5"], "--lr-decay-style": ["linear"],
                        "--lr-warmup-fraction": ["0.03"]}.items():
        assert recipe.get(flag) == value, (flag, recipe.get(flag))


def _recipe_shaped_model(path):
    """A tiny random GLM-4.5 with the recipe's architecture (one group, scaling 1, no q/k norm,
    partial RoPE 0.5, biases, norm eps, RoPE base, one dense layer): only sizes differ."""
    return make_hf_model("glm4_moe", path, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                         use_qk_norm=False, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         num_experts_per_tok=2)


def _tiny_replace(base):
    """The recipe's size-dependent flags taken from the tiny base (the layer pattern too)."""
    from tests.test_hf_import import _flags

    tiny = _flags(open(os.path.join(base, "model.args")).read().splitlines())
    return {"--moe-layer-freq": tiny["--moe-layer-freq"][0],
            "--moe-shared-expert-intermediate-size":
                tiny["--moe-shared-expert-intermediate-size"][0]}


def test_recipe_loads_a_converted_base(megatron_single, tmp_path):
    """The recipe's model flags with only the sizes and layout replaced by a tiny random
    GLM-4.5's build a model that loads its converted base and gives transformers' logits."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs, padded_vocab_size
    from tests.recipes import tiny_recipe_argv
    from tests.test_hf_import import LAYOUT_FLAGS

    hf_dir = _recipe_shaped_model(str(tmp_path / "hf"))
    base = str(tmp_path / "base")
    convert(hf_dir, base, log=lambda s: None)
    replace = dict(LAYOUT_FLAGS, **_tiny_replace(base), **{"--seq-length": str(SEQ)})
    args = parse_megatron_args(tiny_recipe_argv(_recipe(), base, replace))
    assert args.moe_router_score_function == "sigmoid" and args.rotary_percent == 0.5
    margs = MoEModelArgs.from_megatron_args(
        args, padded_vocab_size(args.vocab_size, 1, args.make_vocab_size_divisible_by))
    chunks, _ = verify.build_megatron(margs, base)
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, tokens(), VOCAB),
                               verify.hf_logits(hf_dir, tokens()))
    assert diff < TOL, diff


@pytest.mark.slow
def test_recipe_trains_with_growth_and_exports(tmp_path):
    """End to end on a tiny random GLM-4.5 with a Hugging Face tokenizer: convert, run the
    recipe through examples/pretrain_gpt.py (1 process, 6 iterations, growth at 2 and 4, the
    router trained after warm-up, the expert bias updated by Megatron), then export merged and
    PEFT with --verify (transformers + peft against the Megatron model with the adapters)."""
    import sys

    from megatron_drlora.hf.importer import convert
    from tests.dist_harness import REPO
    from tests.hf_tiny import make_tokenizer
    from tests.recipes import training_argv
    from tests.train_flags import DATA
    from tests.test_hf_export import _cli
    from tests.megatron_runs import events, torchrun

    hf_dir = _recipe_shaped_model(str(tmp_path / "hf"))
    make_tokenizer(hf_dir)
    base, ckpt = str(tmp_path / "base"), str(tmp_path / "ckpt")
    convert(hf_dir, base, log=lambda s: None)
    argv = training_argv(_recipe(), base, ckpt, hf_dir, SEQ, nproc=1, data=DATA)
    for flag, value in dict(_tiny_replace(base), **{"--train-iters": "6",
                                                    "--save-interval": "6"}).items():
        argv[argv.index(flag) + 1] = value
    torchrun(1, argv, timeout=600)
    grown = events(tmp_path / "ckpt")
    assert [e["iteration"] for e in grown] == [2, 4]
    ranks = torch.tensor(grown[-1]["rank_map"])
    assert ranks.min() >= 16 and ranks.max() > 16  # r_init 16, grown
    for fmt in ("merged", "peft"):
        out = _cli([sys.executable, REPO / "tools" / "export_to_hf.py", "--load", ckpt,
                    "--pretrained-checkpoint", base, "--hf-path", hf_dir, "--format", fmt,
                    "--save", tmp_path / fmt, "--verify"], timeout=600)
        assert "> verified" in out, out[-2000:]
        print(fmt, [line for line in out.splitlines() if "> verified" in line])
    from safetensors import safe_open

    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # Megatron's update: 6 x 1e-3
    moved = (safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt").get_tensor(bias)
             - safe_open(os.path.join(hf_dir, "model.safetensors"), "pt").get_tensor(bias))
    assert moved.abs().max() > 1e-3


def test_recipe_submit_script(tmp_path):
    """`submit.sh glm45-air` hands this recipe to the sbatch script (stand-in sbatch)."""
    from tests.test_sbatch_scripts import test_recipe_submit_script as check

    check("glm45-air", "glm45_air_drlora.args", "drlora-glm45-air", tmp_path)
