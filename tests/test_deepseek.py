"""DeepSeek-V2 / DeepSeek-V3 (Moonlight): multi-latent attention (q LoRA or plain q, rope pairs
interleaved or not, YaRN), the V2 softmax and V3 sigmoid routers against transformers' own,
import with logits parity, the CPU core attention MLA needs, merged and PEFT exports of a
DR-LoRA checkpoint, refusals by key, the two recipes against the converter, and (slow) EP2 and
the Moonlight recipe through examples/pretrain_gpt.py with growth and verified exports."""

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.hf_tiny import SEQ, VOCAB, hf_config, make_hf_model, tokens  # noqa: E402

TOL = 1e-4  # absolute, fp32 (the brief's); and relative to the logits' scale:
REL = 1e-5  # measured ~7e-7; transformers' 1e-6 latent-norm eps read as 1e-5 gives ~3e-5
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1}
# name: (family, overrides). hf_tiny's defaults: 3 layers (one dense), 8 experts, q LoRA 12,
# kv latent 16, q/k heads 8 + 4 rope channels, v heads 6, a shared expert.
VARIANTS = {
    "v2": ("deepseek_v2", {}),  # group_limited_greedy: 4 groups, 2 kept, top-2, scaling 1.5
    # DeepSeek-V2-Lite's shape: no q LoRA, greedy, YaRN with mscale
    "v2_lite": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", n_group=None,
                                    topk_group=None, routed_scaling_factor=1.0,
                                    rope_parameters=YARN)),
    "v3": ("deepseek_v3", {}),  # 4 groups, 2 kept, top-4, scaling 2.5
    # Moonlight's router (one group, top-2) without q LoRA; rotate-half rope pairs (rope rows
    # permuted on import); a multi-token-prediction layer in the checkpoint (skipped)
    # and Moonlight's rms_norm_eps 1e-5 (the latent norms keep transformers' 1e-6)
    "moonlight": ("deepseek_v3", dict(q_lora_rank=None, n_group=1, topk_group=1,
                                      num_experts_per_tok=2, routed_scaling_factor=2.446,
                                      rope_interleave=False, num_nextn_predict_layers=1,
                                      rms_norm_eps=1e-5)),
}


# --- the CPU core attention --------------------------------------------------------------------
def test_mla_core_attention_matches_sdpa(megatron_single):
    """compat.mla_attention.MLACoreAttention: causal softmax attention with q/k heads wider than
    v heads and MLA's scale, as torch's scaled_dot_product_attention computes it."""
    from megatron_drlora.compat.mla_attention import MLACoreAttention
    from megatron_drlora.modeling import MoEModelArgs, transformer_config

    config = transformer_config(MoEModelArgs(num_layers=1, hidden_size=32, num_attention_heads=4))
    attn = MLACoreAttention(config, 1, None, "self", softmax_scale=0.3, k_channels=12,
                            v_channels=6).eval()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(7, 2, 4, 12, generator=g) for _ in range(2))
    v = torch.randn(7, 2, 4, 6, generator=g)
    out = attn(q, k, v, None)
    expect = torch.nn.functional.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, scale=0.3)
    assert out.shape == (7, 2, 24)
    assert torch.allclose(out, expect.permute(2, 0, 1, 3).reshape(7, 2, 24), atol=1e-6)


# --- the routers -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["v2", "v2_lite", "v3", "moonlight"])
def test_megatron_router_equals_transformers(megatron_single, variant):
    """Same experts and weights as transformers' router (eval mode): V2 softmax over all
    experts, group-limited or not, unnormalised and scaled; V3 sigmoid with expert bias."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from megatron_drlora.hf.families import describe
    from megatron_drlora.modeling import MoEModelArgs, transformer_config

    family, over = VARIANTS[variant]
    cfg = hf_config(family, **over)
    hf = (DeepseekV2TopkRouter if family == "deepseek_v2" else DeepseekV3TopkRouter)(cfg).eval()
    margs = MoEModelArgs(**describe(cfg).model_kwargs(128))
    ours = TopKRouter(config=transformer_config(margs),
                      pg_collection=ProcessGroupCollection.use_mpu_process_groups()).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        ours.weight.copy_(hf.weight)
        if family == "deepseek_v3":
            hf.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=g))
            ours.expert_bias.copy_(hf.e_score_correction_bias)
        x = torch.randn(SEQ, 8, cfg.hidden_size, generator=g)
        _, w, e = hf(x.reshape(-1, cfg.hidden_size))
        probs, routing_map = ours(x)
    expect = torch.zeros_like(probs).scatter(1, e, w)
    assert torch.equal(routing_map, expect > 0)
    assert torch.allclose(probs, expect, atol=1e-6, rtol=0)


# --- import ------------------------------------------------------------------------------------
def _add_mtp_tensors(hf_dir, layers):
    """An MTP layer's tensors as DeepSeek-V3 checkpoints store them (model.layers.L.*)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        tensors[f"model.layers.{layers}.{name}"] = torch.ones(4, 4)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ds_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    out = {name: make_hf_model(family, str(root / name), **over)
           for name, (family, over) in VARIANTS.items()}
    _add_mtp_tensors(out["moonlight"], 3)
    return out


@pytest.fixture(scope="module")
def ds_bases(megatron_single, ds_models, tmp_path_factory):
    """Each variant converted once (shared by the parity and export tests): {name: (base,
    flags, log)}."""
    from megatron_drlora.hf.importer import convert

    root = tmp_path_factory.mktemp("deepseek_bases")
    out = {}
    for name, hf_dir in ds_models.items():
        logs = []
        flags = convert(hf_dir, str(root / name), log=logs.append)["flags"]
        out[name] = (str(root / name), flags, logs)
    return out


def _megatron_logits(base, adapters=None):
    from megatron_drlora.hf import verify

    margs = verify.model_args_from_file(os.path.join(base, "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, base, adapters)
    return verify.megatron_logits(chunks, tokens(), VOCAB)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers(ds_models, ds_bases, variant):
    from megatron_drlora.hf import verify

    base, flags, logs = ds_bases[variant]
    family, over = VARIANTS[variant]
    for flag in ("--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank 16",
                 "--qk-head-dim 8", "--qk-pos-emb-head-dim 4", "--v-head-dim 6",
                 "--moe-layer-freq [0]*1+[1]*2", "--moe-shared-expert-intermediate-size 12"):
        assert flag in flags, (flag, flags)
    assert ("--q-lora-rank 12" in flags) == ("q_lora_rank" not in over)
    assert ("--rope-type yarn" in flags) == (variant == "v2_lite")
    assert ("--moe-router-pre-softmax" in flags) == (family == "deepseek_v2")
    assert ("--moe-router-enable-expert-bias" in flags) == (family == "deepseek_v3")
    assert ("--moe-router-num-groups 4" in flags) == (variant in ("v2", "v3"))
    assert any("multi-token-prediction" in s for s in logs) == (variant == "moonlight")
    assert ("--mla-latent-norm-epsilon 1e-06" in flags) == (variant == "moonlight")
    hf = verify.hf_logits(ds_models[variant], tokens())
    assert float(hf.abs().max()) > 1.0
    diff = verify.max_abs_diff(_megatron_logits(base), hf)
    print(f"{variant}: max |logits diff| {diff:.3g}")
    assert diff < min(TOL, REL * float(hf.abs().max())), f"{variant}: max |logits diff| {diff}"


def test_rope_layout_and_yarn_change_the_logits(ds_models, tmp_path):
    """The parity has teeth: transformers' logits move when the same weights are read with the
    other rope pair layout, or without YaRN, so a converter that ignored either would fail."""
    import json
    import shutil

    from megatron_drlora.hf import verify

    t = tokens()
    for variant, change in (("moonlight", {"rope_interleave": True}),
                            ("v2_lite", {"rope_scaling": None, "rope_parameters": None})):
        copy = tmp_path / variant
        shutil.copytree(ds_models[variant], copy)
        cfg = json.load(open(copy / "config.json"))
        cfg.update(change)
        json.dump(cfg, open(copy / "config.json", "w"))
        moved = verify.max_abs_diff(verify.hf_logits(str(copy), t),
                                    verify.hf_logits(ds_models[variant], t))
        assert moved > 1e-2, (variant, moved)


@pytest.mark.parametrize("family,override,key", [
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v2", dict(num_experts_per_tok=4), "topk_group"),  # top-2 per group != max
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek_v2", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v2", dict(num_experts_per_tok=None), "num_experts_per_tok"),
    ("deepseek_v2", dict(n_group=None), "n_group"),
    ("deepseek_v2", dict(mlp_bias=True), "mlp_bias"),
    ("deepseek_v2", dict(rope_parameters=dict(YARN, original_max_position_embeddings=2048)),
     "original_max_position_embeddings"),
    ("deepseek_v2", dict(rope_parameters=dict(YARN, attention_factor=1.2)), "attention_factor"),
    ("deepseek_v2", dict(rope_parameters=dict(YARN, mscale=None)), "mscale_all_dim"),
    ("deepseek_v2", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                          "factor": 2.0}), "rope_type"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("deepseek_v3", dict(num_experts_per_tok=6), "topk_group"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek_v3", dict(first_k_dense_replace=3), "first_k_dense_replace"),
    ("deepseek_v3", dict(hidden_act="gelu"), "hidden_act"),
    ("deepseek_v3", dict(n_shared_experts=0), "n_shared_experts"),
])
def test_unsupported_features_are_refused_by_key(tmp_path, family, override, key):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe

    with pytest.raises(HFInteropError, match=key):
        describe(hf_config(family, **override), str(tmp_path))


def test_config_json_keys_transformers_does_not_read_are_checked(tmp_path):
    """DeepSeek's own config.json keys: moe_layer_freq != 1, a scoring_func other than the
    family's router and DeepSeek-V3's FP8 quantization_config are refused by name."""
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe

    for family, extra, key in (("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),
                               ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
                               ("deepseek_v3", {"quantization_config": {
                                   "quant_method": "fp8", "fmt": "e4m3"}},
                                "quantization_config")):
        cfg = hf_config(family)
        for k, v in extra.items():
            setattr(cfg, k, v)
        with pytest.raises(HFInteropError, match=key):
            describe(cfg, str(tmp_path))


@pytest.mark.slow
def test_expert_and_tensor_parallel_layouts(ds_models, tmp_path):
    """EP2 (2 gloo processes, 4 experts per rank) and TP2 (heads, latent projections and
    experts split, sequence parallel) give transformers' logits for V2 (q LoRA, groups) and
    Moonlight-shaped V3 (plain q, rotate-half rope rows), in one torchrun."""
    import json

    from tests.dist_harness import run_torchrun

    root = tmp_path / "hf"
    os.makedirs(root)
    for name, family in (("v2", "deepseek_v2"), ("moonlight", "deepseek_v3")):
        os.symlink(ds_models[name], root / family)
    out = tmp_path / "diffs.json"
    run_torchrun("hf_convert_worker.py", 2, [root, tmp_path / "save", out, "--layouts",
                                             "ep2:deepseek_v2,deepseek_v3",
                                             "tp2:deepseek_v2,deepseek_v3"], timeout=300)
    diffs = json.load(open(out))
    print(diffs)
    assert set(diffs) == {f"deepseek_v{v}/{layout}" for v in (2, 3) for layout in ("ep2", "tp2")}
    assert all(d < min(TOL, REL * 3.0) for d in diffs.values()), diffs  # logits ~3.4


# --- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds_runs(ds_models, ds_bases, tmp_path_factory):
    """DR-LoRA checkpoints of the V2 and Moonlight-shaped bases as a run leaves them: grown
    ranks, a trained router and (V3) an expert bias moved by hand. Built on first use."""
    from tests.tiny import save_run_like_checkpoint

    runs = {}

    def get(variant):
        if variant in runs:
            return runs[variant]
        base = ds_bases[variant][0]
        root = tmp_path_factory.mktemp(f"{variant}_export")
        adapters = str(root / "adapters")
        _, handle, base_logits, _ = save_run_like_checkpoint(base, adapters, SEQ, VOCAB,
                                                             tokens())
        assert [layer.layer for layer in handle.layers] == [1, 2]  # layer 0 is dense
        runs[variant] = dict(hf=ds_models[variant], base=base, adapters=adapters, root=root,
                             base_logits=base_logits, logits=_megatron_logits(base, adapters))
        return runs[variant]

    return get


@pytest.mark.parametrize("variant", ["v2", "moonlight"])
def test_merged_and_peft_exports_match_megatron(ds_runs, variant):
    """Merged exports (base from the Megatron checkpoint, then from the HF model: the MLA
    tensors go back through the inverse mapping, rope rows included) and the PEFT adapter
    (routed experts only; router and V3's expert bias as modules_to_save) load in transformers
    (+ peft) and give the Megatron model's logits with the adapters."""
    pytest.importorskip("peft")
    import json

    from safetensors import safe_open

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export

    run = ds_runs(variant)
    assert verify.max_abs_diff(run["logits"], run["base_logits"]) > 0.05
    scale = float(run["logits"].abs().max())
    for name, fmt, kw in (("merged_megatron_base", "merged",
                           dict(pretrained_checkpoint=run["base"])),
                          ("merged_hf_base", "merged", {}), ("peft", "peft", {})):
        save = str(run["root"] / name)
        export(run["adapters"], run["hf"], fmt, save, log=lambda s: None, **kw)
        got = verify.hf_logits(save, tokens()) if fmt == "merged" else \
            verify.hf_logits(run["hf"], tokens(), adapter=save)
        diff = verify.max_abs_diff(got, run["logits"])
        print(f"{variant} {name}: max |logits diff| {diff:.3g}")
        assert diff < min(TOL, REL * scale), (name, diff)
    names = set(safe_open(os.path.join(run["root"], "peft", "adapter_model.safetensors"),
                          "pt").keys())
    lora = sorted(n for n in names if "lora_" in n)
    assert lora and all(".mlp.experts." in n and ".layers.0." not in n for n in lora), lora
    assert not any("shared_experts" in n or "self_attn" in n for n in names)
    config = json.load(open(run["root"] / "peft" / "adapter_config.json"))
    assert config["modules_to_save"] == ["mlp.gate"]
    bias = "base_model.model.model.layers.2.mlp.gate.e_score_correction_bias"
    assert (bias in names) == (variant == "moonlight")
    merged = safe_open(os.path.join(run["root"], "merged_megatron_base",
                                    "model.safetensors"), "pt")
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in set(merged.keys())


# --- the recipes and the converter -------------------------------------------------------------
MLA_FLAGS = {"--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
             "--qk-pos-emb-head-dim", "--v-head-dim", "--rope-type", "--rotary-scaling-factor",
             "--mscale", "--mscale-all-dim", "--moe-router-enable-expert-bias",
             "--moe-router-num-groups", "--moe-router-group-topk",
             "--moe-router-topk-scaling-factor", "--moe-router-dtype", "--rotary-interleaved",
             "--mla-latent-norm-epsilon"}
MLA_SIZE_FLAGS = ("--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim", "--v-head-dim",
                  "--moe-layer-freq", "--moe-shared-expert-intermediate-size")


def _v2_lite():
    """deepseek-ai/DeepSeek-V2-Lite's config.json as far as the converter reads it."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy",
        n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
        rope_parameters=dict(YARN, rope_theta=10000.0), tie_word_embeddings=False)


def _moonlight():
    """moonshotai/Moonlight-16B-A3B's config.json as far as the converter reads it."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=50000.0,
        tie_word_embeddings=False, num_nextn_predict_layers=0)


RECIPES = {"v2_lite": ("deepseek_v2_lite_drlora.args", _v2_lite),
           "moonlight": ("moonlight_16b_drlora.args", _moonlight)}


def _recipe(name):
    from tests.dist_harness import REPO

    return REPO / "examples" / "recipes" / RECIPES[name][0]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_flags_are_the_converters(name):
    """Every model flag the converter writes for the real model's config is in the recipe with
    the same value, and the recipe sets no architecture flag the converter does not; the
    DR-LoRA block is the paper's OLMoE column (same 64 experts per layer)."""
    from megatron_drlora.hf.families import describe
    from tests.recipes import assert_recipe_fits_converter
    from tests.test_hf_import import ARCHITECTURE_FLAGS, _flags

    converter = _flags(describe(RECIPES[name][1]()).flags())
    recipe = _flags(open(_recipe(name)).read().splitlines())
    assert_recipe_fits_converter(recipe, converter, ARCHITECTURE_FLAGS | MLA_FLAGS)
    for flag, value in {"--drlora-budget": ["64"], "--drlora-rank-init": ["32"],
                        "--drlora-rank-max": ["128"], "--drlora-alpha": ["256"],
                        "--drlora-grow-interval": ["200"], "--drlora-grow-buffer": ["200"],
                        "--drlora-p-grow": ["0.1"], "--drlora-beta": ["0.9"],
                        "--drlora-gamma": ["1.2"], "--drlora-targets": ["up,down"],
                        "--lr": ["2e-5"], "--lr-decay-style": ["linear"],
                        "--lr-warmup-fraction": ["0.03"]}.items():
        assert recipe.get(flag) == value, (flag, recipe.get(flag))


def _recipe_shaped_model(name, path):
    """A tiny random model with the recipe's architecture (router, RoPE, norm eps, no q LoRA,
    one dense layer, a shared expert): only sizes differ."""
    if name == "v2_lite":
        return make_hf_model("deepseek_v2", path, **VARIANTS["v2_lite"][1])
    return make_hf_model("deepseek_v3", path, q_lora_rank=None, n_group=1, topk_group=1,
                         num_experts_per_tok=2, routed_scaling_factor=2.446, rms_norm_eps=1e-5,
                         rope_theta=50000.0)


def _tiny_replace(base):
    """The recipe's size-dependent flags taken from the tiny base."""
    from tests.test_hf_import import _flags

    tiny = _flags(open(os.path.join(base, "model.args")).read().splitlines())
    return {f: tiny[f][0] for f in MLA_SIZE_FLAGS}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_a_converted_base(megatron_single, tmp_path, name):
    """The recipe's model flags with only the sizes and layout replaced by a tiny random
    model's build a model that loads its converted base and gives transformers' logits."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs, padded_vocab_size
    from tests.recipes import tiny_recipe_argv
    from tests.test_hf_import import LAYOUT_FLAGS

    hf_dir = _recipe_shaped_model(name, str(tmp_path / "hf"))
    base = str(tmp_path / "base")
    convert(hf_dir, base, log=lambda s: None)
    replace = dict(LAYOUT_FLAGS, **_tiny_replace(base), **{"--seq-length": str(SEQ)})
    args = parse_megatron_args(tiny_recipe_argv(_recipe(name), base, replace))
    assert args.multi_latent_attention and args.q_lora_rank is None
    assert args.rope_type == ("yarn" if name == "v2_lite" else "rope")
    margs = MoEModelArgs.from_megatron_args(
        args, padded_vocab_size(args.vocab_size, 1, args.make_vocab_size_divisible_by))
    hf = verify.hf_logits(hf_dir, tokens())
    chunks, _ = verify.build_megatron(margs, base)
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, tokens(), VOCAB), hf)
    assert diff < min(TOL, REL * float(hf.abs().max())), diff


@pytest.mark.slow
def test_recipe_trains_with_growth_and_exports(megatron_single, tmp_path):
    """End to end on a tiny random Moonlight-shaped model with a Hugging Face tokenizer:
    convert, run the recipe through examples/pretrain_gpt.py (1 process, 6 iterations, growth
    at 2 and 4, the router trained after warm-up, the expert bias updated by Megatron), then
    export merged and PEFT with --verify (transformers + peft against the Megatron model with
    the adapters)."""
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert
    from tests.hf_tiny import make_tokenizer
    from tests.megatron_runs import events, torchrun
    from tests.recipes import training_argv
    from tests.train_flags import DATA

    hf_dir = _recipe_shaped_model("moonlight", str(tmp_path / "hf"))
    make_tokenizer(hf_dir)
    base, ckpt = str(tmp_path / "base"), str(tmp_path / "ckpt")
    convert(hf_dir, base, log=lambda s: None)
    argv = training_argv(_recipe("moonlight"), base, ckpt, hf_dir, SEQ, nproc=1, data=DATA)
    for flag, value in dict(_tiny_replace(base), **{"--train-iters": "6",
                                                    "--save-interval": "6"}).items():
        argv[argv.index(flag) + 1] = value
    torchrun(1, argv, timeout=600)
    grown = events(tmp_path / "ckpt")
    assert [e["iteration"] for e in grown] == [2, 4]
    ranks = torch.tensor(grown[-1]["rank_map"])
    assert ranks.min() >= 32 and ranks.max() > 32  # r_init 32, grown
    for fmt in ("merged", "peft"):  # in this process: tools/export_to_hf.py's export()
        logs = []
        result = export(ckpt, hf_dir, fmt, str(tmp_path / fmt), pretrained_checkpoint=base,
                        verify=True, log=logs.append)
        assert result["verified"]["max_rel_diff"] <= REL, result["verified"]
        print(fmt, [line for line in logs if "> verified" in line])


@pytest.mark.parametrize("recipe,args_file,name", [
    ("deepseek-v2-lite", "deepseek_v2_lite_drlora.args", "drlora-deepseek-v2-lite"),
    ("moonlight", "moonlight_16b_drlora.args", "drlora-moonlight-16b")])
def test_recipe_submit_script(tmp_path, recipe, args_file, name):
    """`submit.sh deepseek-v2-lite|moonlight` hands the recipe to the sbatch script."""
    from tests.test_sbatch_scripts import test_recipe_submit_script as check

    check(recipe, args_file, name, tmp_path)
