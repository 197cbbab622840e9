"""HF -> Megatron import (tools/convert_hf_to_megatron.py): for every supported family the
Megatron model built from the written flags and base checkpoint gives the HF logits (fp32, 1e-4),
at TP1/EP1, at EP2 and TP2 (2 gloo processes), and bases written from EP2 / TP2 load at TP1/EP1.
Bad inputs fail with errors naming the file or config key."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.dist_harness import REPO, run_torchrun  # noqa: E402
from tests.hf_tiny import FAMILIES, SEQ, VOCAB, make_hf_model, tokens  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for family in FAMILIES:
        make_hf_model(family, str(root / family))
    return root


def _megatron_vs_hf(save, hf_dir, **layout):
    from megatron_drlora.hf import verify

    margs = verify.model_args_from_file(os.path.join(save, "model.args"), SEQ, **layout)
    chunks, _ = verify.build_megatron(margs, save)
    t = tokens()
    mlogits = verify.megatron_logits(chunks, t, VOCAB)
    hlogits = verify.hf_logits(str(hf_dir), t)
    assert float(hlogits.abs().max()) > 1.0  # weights large enough for a meaningful check
    return verify.max_abs_diff(mlogits, hlogits)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_hf_logits(megatron_single, hf_models, tmp_path, family):
    from megatron_drlora.hf.importer import convert

    result = convert(str(hf_models / family), str(tmp_path / "base"), log=lambda s: None)
    assert os.path.isfile(tmp_path / "base" / "iter_0000000" / "metadata.json")
    assert open(tmp_path / "base" / "latest_checkpointed_iteration.txt").read() == "0"
    flags = open(result["args_file"]).read()
    expected = {"mixtral": [], "qwen2_moe": ["--add-qkv-bias", "--moe-shared-expert-gate",
                                            "--moe-router-pre-softmax"],
                "qwen3_moe": ["--qk-layernorm", "--kv-channels 12"],
                "olmoe": ["--qk-layernorm-scope projection", "--moe-router-pre-softmax"]}[family]
    for flag in expected:
        assert flag in flags, (flag, flags)
    if family == "mixtral":
        assert "--moe-router-pre-softmax" not in flags  # Mixtral renormalises the top-k
    diff = _megatron_vs_hf(str(tmp_path / "base"), hf_models / family)
    assert diff < TOL, f"{family}: max |logits diff| {diff}"


def test_fused_expert_checkpoint_imports(megatron_single, hf_models, tmp_path):
    """A checkpoint that stores transformers-5 fused experts (gate_up_proj [E, 2I, H] with the
    gate rows first, down_proj [E, H, I]) converts to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_drlora.hf.importer import convert

    fused = tmp_path / "fused"
    shutil.copytree(hf_models / "qwen2_moe", fused)
    tensors = load_file(str(fused / "model.safetensors"))
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts"
        per = [[tensors.pop(f"{pre}.{e}.{p}_proj.weight") for p in ("gate", "up", "down")]
               for e in range(4)]
        tensors[f"{pre}.gate_up_proj"] = torch.stack([torch.cat(x[:2]) for x in per])
        tensors[f"{pre}.down_proj"] = torch.stack([x[2] for x in per])
    save_file(tensors, str(fused / "model.safetensors"))
    convert(str(fused), str(tmp_path / "base"), log=lambda s: None)
    diff = _megatron_vs_hf(str(tmp_path / "base"), hf_models / "qwen2_moe")
    assert diff < TOL, diff


def test_olmoe_needs_the_whole_projection_norm(megatron_single, hf_models, tmp_path):
    """Megatron's per-head q/k norm would be silently wrong for OLMoE: make sure the test
    weights would catch that (the converted base, built with per-head norms, must not load)."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    convert(str(hf_models / "olmoe"), str(tmp_path / "base"), log=lambda s: None)
    margs = verify.model_args_from_file(str(tmp_path / "base" / "model.args"), SEQ,
                                        extra=["--qk-layernorm-scope", "head"])
    # (torch's CheckpointException is a BaseException; checkpoint.py re-raises Exceptions only)
    with pytest.raises(BaseException, match="q_layernorm.weight"):
        verify.build_megatron(margs, str(tmp_path / "base"))


@pytest.mark.slow
def test_multiprocess_layouts_and_ep2_base_loads_at_ep1(megatron_single, hf_models, tmp_path):
    out = tmp_path / "diffs.json"
    run_torchrun("hf_convert_worker.py", 2,
                 [hf_models, tmp_path / "save", out, "--layouts",
                  "ep2:" + ",".join(FAMILIES), "tp2:qwen2_moe,qwen3_moe,olmoe"], timeout=300)
    diffs = json.load(open(out))
    assert len(diffs) == 7
    for name, diff in diffs.items():
        assert diff < TOL, f"{name}: max |logits diff| {diff}"
    for name in diffs:  # written from EP2 / TP2 layouts, loaded at TP1/EP1
        family, layout = name.split("/")
        diff = _megatron_vs_hf(str(tmp_path / "save" / layout / family), hf_models / family)
        assert diff < TOL, f"{family} ({layout} -> TP1/EP1): {diff}"
    source = json.load(open(tmp_path / "save" / "ep2" / "olmoe" / "hf_source.json"))
    assert source["layout"] == {"tp": 1, "ep": 2, "pp": 1}


# --- bad inputs -----------------------------------------------------------------------------
def _convert_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py")]
                          + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(REPO))
    return proc.returncode, proc.stderr


def test_cli_missing_directory_is_a_clear_error(tmp_path):
    code, err = _convert_cli("--hf-path", tmp_path / "nope", "--save", tmp_path / "out")
    assert code == 2 and "--hf-path" in err and "no such directory" in err


def test_existing_checkpoint_in_save_is_refused_before_any_work(hf_models, tmp_path):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.importer import convert

    os.makedirs(tmp_path / "out")
    open(tmp_path / "out" / "latest_checkpointed_iteration.txt", "w").write("0")
    with pytest.raises(HFInteropError, match="--save .*holds a checkpoint already"):
        convert(str(hf_models / "mixtral"), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["latest_checkpointed_iteration.txt"]


def test_unknown_architecture_is_refused(tmp_path):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.importer import convert

    os.makedirs(tmp_path / "llama")
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
              open(tmp_path / "llama" / "config.json", "w"))
    torch.save({}, tmp_path / "llama" / "x.safetensors")  # not reached
    with pytest.raises(HFInteropError, match="unsupported model family model_type='llama'"):
        convert(str(tmp_path / "llama"), str(tmp_path / "out"))


@pytest.mark.parametrize("family,override,key", [
    ("mixtral", {"sliding_window": 8}, "sliding_window"),
    ("olmoe", {"clip_qkv": 4.0}, "clip_qkv"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                       "rope_theta": 10000.0}}, "rope_type"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, family, override, key):
    from transformers import AutoConfig

    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe
    from tests.hf_tiny import hf_config

    cfg = hf_config(family, **override)
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(HFInteropError, match=key):
        describe(AutoConfig.from_pretrained(str(tmp_path)), str(tmp_path))


def test_missing_tensor_and_no_safetensors_are_refused(hf_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_drlora.hf.checkpoint_io import HFCheckpoint
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import HFNames, describe
    from megatron_drlora.hf.importer import check_names

    broken = tmp_path / "broken"
    shutil.copytree(hf_models / "mixtral", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    hf = HFCheckpoint(str(broken))
    with pytest.raises(HFInteropError, match="experts.2.w3.weight"):
        check_names(hf, HFNames(describe(hf.hf_config()), "per_expert"))
    os.remove(broken / "model.safetensors")
    torch.save({}, broken / "pytorch_model.bin")
    with pytest.raises(HFInteropError, match="no \\*.safetensors weights.*pytorch_model.bin"):
        HFCheckpoint(str(broken))


# --- dtype ----------------------------------------------------------------------------------
def _saved_dtypes(save):
    from megatron_drlora.hf.megatron_reader import DistCheckpoint

    return {str(m.dtype) for m in DistCheckpoint(str(save), "--save").meta.values()}


def test_bf16_checkpoint_gives_a_bf16_base(megatron_single, tmp_path):
    """bf16 safetensors stay bf16 in the Megatron base (no fp32 copy on disk), and the base is
    the HF model exactly: Megatron in fp32 from the bf16 base = transformers in fp32 from the
    bf16 weights."""
    from megatron_drlora.hf.importer import convert

    hf_dir = make_hf_model("olmoe", str(tmp_path / "hf"), dtype=torch.bfloat16)
    result = convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)
    assert result["dtype"] == result["source_dtype"] == "bf16"
    assert _saved_dtypes(tmp_path / "base") == {"torch.bfloat16"}
    source = json.load(open(tmp_path / "base" / "hf_source.json"))
    assert source["dtype"] == source["source_dtype"] == "bf16"
    assert "stored in bf16" in open(tmp_path / "base" / "model.args").read()
    diff = _megatron_vs_hf(str(tmp_path / "base"), hf_dir)
    assert diff < TOL, diff


def test_dtype_flag_overrides_the_checkpoint_dtype(megatron_single, hf_models, tmp_path):
    from megatron_drlora.hf.importer import build_parser, convert

    hf_bf16 = make_hf_model("qwen3_moe", str(tmp_path / "hf"), dtype=torch.bfloat16)
    result = convert(hf_bf16, str(tmp_path / "fp32"), dtype="fp32", log=lambda s: None)
    assert (result["dtype"], result["source_dtype"]) == ("fp32", "bf16")
    assert _saved_dtypes(tmp_path / "fp32") == {"torch.float32"}
    assert _megatron_vs_hf(str(tmp_path / "fp32"), hf_bf16) < TOL  # bf16 -> fp32 is exact
    # an fp32 checkpoint (the tiny models) written as fp16
    result = convert(str(hf_models / "mixtral"), str(tmp_path / "fp16"), dtype="fp16",
                     log=lambda s: None)
    assert (result["dtype"], result["source_dtype"]) == ("fp16", "fp32")
    assert _saved_dtypes(tmp_path / "fp16") == {"torch.float16"}
    assert build_parser().parse_args(["--hf-path", "x", "--save", "y", "--dtype",
                                      "bf16"]).dtype == "bf16"
    assert build_parser().parse_args(["--hf-path", "x", "--save", "y"]).dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--hf-path", "x", "--save", "y", "--dtype", "fp8"])


# --- tokenizer flags and vocabulary padding -------------------------------------------------
def test_args_file_names_the_hf_tokenizer(megatron_single, hf_models, tmp_path):
    """With a tokenizer in the HF directory, model.args names it for Megatron-LM's
    HuggingFaceTokenizer; Megatron-LM pads the tokenizer's size (not config.json's vocab_size)
    to --make-vocab-size-divisible-by x TP, and the base loads into that vocabulary: the
    logits of every token the tokenizer has are the HF logits."""
    import shutil

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs
    from tests.hf_tiny import make_tokenizer

    hf_dir = tmp_path / "hf dir"  # a space: the args file quotes the path
    shutil.copytree(hf_models / "qwen2_moe", hf_dir)
    make_tokenizer(str(hf_dir), size=90)
    result = convert(str(hf_dir), str(tmp_path / "base"), make_vocab_size_divisible_by=32,
                     log=lambda s: None)
    assert result["flags"][-2:] == ["--tokenizer-type HuggingFaceTokenizer",
                                    f"--tokenizer-model '{hf_dir}'"]
    assert result["padded_vocab_size"] == 128  # config.json: 100 rows, padded to 32
    args = parse_megatron_args([f"@{tmp_path / 'base' / 'model.args'}", "--seq-length",
                                str(SEQ)])
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == str(hf_dir) and args.make_vocab_size_divisible_by == 32
    args.rank, args.padded_vocab_size = 0, None
    tokenizer = build_tokenizer(args)  # what examples/pretrain_gpt.py builds
    assert tokenizer.vocab_size == 90 and args.padded_vocab_size == 96  # < the base's 128 rows
    margs = MoEModelArgs.from_megatron_args(args, args.padded_vocab_size)
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    t = tokens() % 90
    mlogits = verify.megatron_logits(chunks, t, 90)
    hlogits = verify.hf_logits(str(hf_dir), t)[..., :90]
    assert verify.max_abs_diff(mlogits, hlogits) < TOL


def test_args_file_sets_the_models_dropout(megatron_single, tmp_path):
    """model.args carries transformers' dropout (attention probabilities from the config, none
    on the residual stream), so a run from it does not train with Megatron's defaults (0.1 and
    0.1); an attention_dropout that is no probability is refused by key."""
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args

    hf_dir = tmp_path / "hf"
    make_hf_model("mixtral", str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    config["attention_dropout"] = 0.25
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert(str(hf_dir), str(tmp_path / "base"), log=lambda s: None)
    args = parse_megatron_args([f"@{tmp_path / 'base' / 'model.args'}", "--seq-length",
                                str(SEQ)])
    assert (args.attention_dropout, args.hidden_dropout) == (0.25, 0.0)
    config["attention_dropout"] = 1.5
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFInteropError, match="attention_dropout=1.5"):
        convert(str(hf_dir), str(tmp_path / "base2"), log=lambda s: None)


def test_no_tokenizer_no_tokenizer_flags_and_oversized_tokenizer_is_refused(
        megatron_single, hf_models, tmp_path):
    import shutil

    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.importer import tokenizer_flags
    from tests.hf_tiny import make_tokenizer

    assert tokenizer_flags(str(hf_models / "mixtral"), VOCAB) == []
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models / "mixtral", hf_dir)
    make_tokenizer(str(hf_dir), size=VOCAB + 10)
    with pytest.raises(HFInteropError, match="the tokenizer has 110 tokens, the model's "
                                             "embedding 100 rows .*vocab_size"):
        tokenizer_flags(str(hf_dir), VOCAB)


# --- memory ---------------------------------------------------------------------------------
MEDIUM = dict(hidden_size=512, intermediate_size=512, num_experts=16, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)


@pytest.mark.slow
def test_peak_memory_is_the_base_plus_less_than_a_layer(tmp_path):
    """A 106 MiB bf16 OLMoE (4 layers x 16 experts, hidden 512): the converter's resident
    memory grows by the bf16 base it holds plus less than one layer (measured: +127.5 MiB for a
    106 MiB base, 26 MiB layers), not by an fp32 copy or a second copy at save time."""
    import re

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    hf_dir = tmp_path / "hf"
    make = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from tests.hf_tiny import "
            f"make_hf_model; make_hf_model('olmoe', sys.argv[2], dtype=torch.bfloat16, "
            f"**{MEDIUM!r})")
    subprocess.run([sys.executable, "-c", make, str(REPO), str(hf_dir)], check=True, env=env,
                   timeout=300)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                           "--hf-path", str(hf_dir), "--save", str(tmp_path / "base")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"resident memory ([\d.]+) MiB before the model was built, peak ([\d.]+) MiB",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    grown = (float(m.group(2)) - float(m.group(1))) * 2 ** 20
    from megatron_drlora.hf.checkpoint_io import HFCheckpoint

    hf = HFCheckpoint(str(hf_dir))
    model_bytes = sum(2 * torch.Size(hf.shape(n)).numel() for n in hf.names())
    layer_bytes = sum(2 * torch.Size(hf.shape(n)).numel() for n in hf.names()
                      if n.startswith("model.layers.0."))
    assert _saved_dtypes(tmp_path / "base") == {"torch.bfloat16"}
    print(f"model {model_bytes / 2 ** 20:.1f} MiB, layer {layer_bytes / 2 ** 20:.1f} MiB, "
          f"conversion +{grown / 2 ** 20:.1f} MiB")
    # the bound plus 32 MiB for allocator and import noise: an fp32 build (+106 MiB) or the
    # writer's clone of every fc1 half (+64 MiB, what the converter avoids) still fail
    assert grown < model_bytes + layer_bytes + 32 * 2 ** 20, (grown, model_bytes, layer_bytes)


# --- the OLMoE recipe and the converter ----------------------------------------------------
RECIPE = REPO / "examples" / "recipes" / "olmoe_1b_7b_drlora.args"
SIZE_FLAGS = {"--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
              "--moe-ffn-hidden-size", "--num-experts", "--moe-router-topk",
              "--max-position-embeddings", "--seq-length", "--vocab-size", "--num-query-groups",
              "--group-query-attention", "--kv-channels"}
LAYOUT_FLAGS = {"--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
                "--expert-model-parallel-size": "1", "--expert-tensor-parallel-size": "1"}
# Flags that change what the model computes from its weights: whatever the recipe sets of
# these, the converter must write the same.
ARCHITECTURE_FLAGS = {"--qk-layernorm", "--qk-layernorm-scope", "--add-qkv-bias", "--swiglu",
                      "--normalization", "--norm-epsilon", "--position-embedding-type",
                      "--rotary-base", "--rotary-percent", "--disable-bias-linear",
                      "--untie-embeddings-and-output-weights", "--moe-router-pre-softmax",
                      "--moe-router-score-function", "--moe-shared-expert-intermediate-size",
                      "--moe-shared-expert-gate", "--apply-layernorm-1p", "--kv-channels",
                      "--moe-layer-freq", "--use-rope-scaling"}


def _flags(lines):
    """{flag: [values]} of args-file lines (one or more flags per line, '#' comments)."""
    import shlex

    out, current = {}, None
    for line in lines:
        for tok in shlex.split(line.split("#", 1)[0]):
            if tok.startswith("--"):
                current = tok
                assert current not in out, f"{current} repeated"
                out[current] = []
            else:
                out[current].append(tok)
    return out


def _olmoe_1b_7b():
    """allenai/OLMoE-1B-7B-0924's config.json (transformers' OlmoeConfig defaults except the
    expert size)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(intermediate_size=1024)


def test_olmoe_recipe_flags_are_the_converters():
    """Every model flag the converter writes for OLMoE-1B-7B is in the recipe with the same
    value (sizes included), and the recipe sets no architecture flag the converter does not."""
    from megatron_drlora.hf.families import describe

    converter = _flags(describe(_olmoe_1b_7b()).flags())
    recipe = _flags(open(RECIPE).read().splitlines())
    from tests.recipes import assert_recipe_fits_converter

    assert_recipe_fits_converter(recipe, converter, ARCHITECTURE_FLAGS)
    assert converter["--qk-layernorm-scope"] == ["projection"]  # transformers' OlmoeAttention


def test_olmoe_recipe_loads_a_converted_base(megatron_single, tmp_path):
    """The recipe's model flags, with only the sizes (and the layout) replaced by a tiny random
    OLMoE's, build a Megatron model that loads the converted base and gives transformers'
    logits: a recipe that disagrees with the converter (per-head q/k norms, renormalised top-k,
    a bias, ...) fails here."""
    import shlex

    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert
    from megatron_drlora.megatron_lm.arguments import parse_megatron_args
    from megatron_drlora.modeling import MoEModelArgs, padded_vocab_size

    hf_dir = make_hf_model("olmoe", str(tmp_path / "hf"), rms_norm_eps=1e-5)
    convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)
    tiny = _flags(open(tmp_path / "base" / "model.args").read().splitlines())
    argv = []
    for line in open(RECIPE).read().splitlines():
        argv += shlex.split(line.split("#", 1)[0])
    recipe = _flags([shlex.join(argv)])
    keep = {f: v for f, v in recipe.items()
            if f not in SIZE_FLAGS and f not in LAYOUT_FLAGS and f not in
            ("--moe-grouped-gemm", "--bf16")}  # CPU test in fp32: SequentialMLP experts
    sizes = {f: v for f, v in tiny.items() if f in SIZE_FLAGS}
    sizes["--seq-length"] = [str(SEQ)]
    flat = []
    for flag, values in {**keep, **sizes, **LAYOUT_FLAGS}.items():
        flat += [flag] + (values if isinstance(values, list) else [values])
    args = parse_megatron_args(flat)
    assert args.qk_layernorm and args.qk_layernorm_scope == "projection"
    margs = MoEModelArgs.from_megatron_args(
        args, padded_vocab_size(args.vocab_size, 1, args.make_vocab_size_divisible_by))
    chunks, _ = verify.build_megatron(margs, str(tmp_path / "base"))
    diff = verify.max_abs_diff(verify.megatron_logits(chunks, tokens(), VOCAB),
                               verify.hf_logits(hf_dir, tokens()))
    assert diff < TOL, diff


@pytest.mark.slow
def test_olmoe_recipe_trains_with_growth(tmp_path):
    """The OLMoE recipe through examples/pretrain_gpt.py on a converted tiny random OLMoE with
    a Hugging Face tokenizer, on chat data rendered with its chat template (sizes, length,
    batch and data replaced; r_init 32 / r_max 128 and
    the other DR-LoRA settings the recipe's): it trains, grows at the planned iterations, the
    router trains after the warm-up and the checkpoint carries it."""
    from megatron_drlora.hf.importer import convert
    from tests.hf_tiny import make_chat_data, make_tokenizer
    from tests.megatron_runs import events, torchrun
    from tests.recipes import training_argv

    hf_dir = make_hf_model("olmoe", str(tmp_path / "hf"), rms_norm_eps=1e-5)
    make_tokenizer(hf_dir)
    data = make_chat_data(hf_dir, tmp_path / "data")
    base, ckpt = str(tmp_path / "base"), str(tmp_path / "ckpt")
    convert(hf_dir, base, log=lambda s: None)
    proc = torchrun(1, training_argv(RECIPE, base, ckpt, hf_dir, SEQ, nproc=1, data=data),
                    timeout=900)
    assert "router trainable from iteration 2" in proc.stdout
    grown = events(tmp_path / "ckpt")
    assert [e["iteration"] for e in grown] == [2, 4, 6]
    ranks = torch.tensor(grown[-1]["rank_map"])
    assert ranks.min() >= 32 and ranks.max() > 32  # the recipe's r_init 32, grown
