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
