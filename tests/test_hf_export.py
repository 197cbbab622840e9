"""DR-LoRA -> Hugging Face export (tools/export_to_hf.py), verified by logits.

For every family: a DR-LoRA checkpoint with heterogeneous per-expert ranks and a changed router
is exported merged and as a PEFT adapter (transformers-5 fused layout); transformers (+ peft)
logits equal the Megatron logits with the adapters (fp32, 1e-4), and the adapter config claims
exactly the ranks its tensors have. End to end: a base converted at EP2, fine-tuned with
examples/pretrain_gpt.py at EP2 (real growth events, trained router), exported by the CLI and
compared at EP1. The transformers-4 per-expert layout is loaded with transformers 4 when
DRLORA_TRANSFORMERS4_PATH names a directory with it installed (pip install --target DIR
"transformers==4.57.6" ...), else only its config/tensor consistency is checked.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.dist_harness import REPO  # noqa: E402
from tests.hf_tiny import FAMILIES, SEQ, VOCAB, make_hf_model, tokens  # noqa: E402

TOL = 1e-4
TF4_PATH = os.environ.get("DRLORA_TRANSFORMERS4_PATH")


def _adapted_checkpoint(family, base, save, targets):
    """A DR-LoRA checkpoint as a run saves it: random adapters, a grown (heterogeneous) rank
    map, a changed router; returns the Megatron logits of the adapted model."""
    from megatron_drlora import DRLoRAConfig
    from megatron_drlora.hf import verify
    from megatron_drlora.inject import apply_drlora
    from tests.tiny import grown_rank_map, randomize_adapters, save_adapter_checkpoint

    margs = verify.model_args_from_file(os.path.join(base, "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, base)
    base_logits = verify.megatron_logits(chunks, tokens(), VOCAB)
    cfg = DRLoRAConfig(budget=4, p_grow=0.5, targets=targets)
    handle = apply_drlora(chunks, cfg, log=lambda s: None)
    randomize_adapters(handle, scale=0.1)
    rank_map = grown_rank_map(handle)
    handle.set_rank_map(rank_map)
    with torch.no_grad():
        for layer in handle.layers:
            w = layer.moe_layer.router.weight
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(layer.layer)))
    save_adapter_checkpoint(save, 7, chunks, handle, rank_map)
    return base_logits, rank_map


@pytest.fixture(scope="module")
def runs(megatron_single, tmp_path_factory):
    """Per family: HF model, converted base, DR-LoRA checkpoint, Megatron logits."""
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.importer import convert

    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILIES:
        hf_dir = make_hf_model(family, str(root / "hf" / family))
        base = str(root / "base" / family)
        convert(hf_dir, base, log=lambda s: None)
        targets = ("gate", "up", "down") if family == "olmoe" else ("up", "down")
        adapters = str(root / "adapters" / family)
        base_logits, rank_map = _adapted_checkpoint(family, base, adapters, targets)
        margs = verify.model_args_from_file(os.path.join(base, "model.args"), SEQ)
        chunks, _ = verify.build_megatron(margs, base, adapters)  # reloaded from disk
        out[family] = dict(hf=hf_dir, base=base, adapters=adapters, rank_map=rank_map,
                           targets=targets, base_logits=base_logits,
                           logits=verify.megatron_logits(chunks, tokens(), VOCAB))
    return out, root


def _export(run, fmt, save, **kw):
    from megatron_drlora.hf.exporter import export

    return export(run["adapters"], run["hf"], fmt, save, log=lambda s: None, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_matches_megatron(runs, family):
    from megatron_drlora.hf import verify

    run, root = runs[0][family], runs[1]
    save = str(root / "merged" / family)
    # mixtral: weights from the HF model itself and tiny shards (index + several files)
    kw = (dict(max_shard_size="20KB") if family == "mixtral"
          else dict(pretrained_checkpoint=run["base"]))
    result = _export(run, "merged", save, **kw)
    if family == "mixtral":
        assert len(result["files"]) > 3
        assert os.path.isfile(os.path.join(save, "model.safetensors.index.json"))
    logits = verify.hf_logits(save, tokens())
    assert verify.max_abs_diff(run["logits"], run["base_logits"]) > 0.05  # adapters matter
    diff = verify.max_abs_diff(logits, run["logits"])
    assert diff < TOL, f"{family} merged: {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_fused_export_matches_megatron(runs, family):
    from megatron_drlora.hf import verify

    run, root = runs[0][family], runs[1]
    save = str(root / "peft" / family)
    _export(run, "peft", save)
    logits = verify.hf_logits(run["hf"], tokens(), adapter=save)
    diff = verify.max_abs_diff(logits, run["logits"])
    assert diff < TOL, f"{family} peft fused: {diff}"
    _assert_fused_config_matches_tensors(save, run)


def _assert_fused_config_matches_tensors(save, run):
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(save, "adapter_config.json")))
    ranks = json.load(open(os.path.join(save, "drlora_rank_map.json")))
    assert torch.equal(torch.tensor(ranks["rank_map"]), run["rank_map"])
    assert cfg["lora_dropout"] == 0 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    rank_map, projs = run["rank_map"], list(run["targets"])
    f = safe_open(os.path.join(save, "adapter_model.safetensors"), "pt")
    experts = rank_map.shape[1]
    for m, layer in enumerate(ranks["moe_layers"]):
        gate_up = sum(rank_map[m, :, projs.index(p)] for p in ("gate", "up") if p in projs)
        for param, want in (("gate_up_proj", int(gate_up.max())),
                            ("down_proj", int(rank_map[m, :, projs.index("down")].max()))):
            key = re.escape(f"model.layers.{layer}.mlp.experts.{param}")
            assert cfg["rank_pattern"][key] == want  # padded to the layer's largest rank
            module = (f"base_model.model.model.layers.{layer}.mlp.experts"
                      f"{'.base_layer' if param == 'gate_up_proj' else ''}")
            assert f.get_slice(f"{module}.lora_A.weight").get_shape()[0] == want * experts
            assert f.get_slice(f"{module}.lora_B.weight").get_shape()[1] == want * experts
    assert "mlp.gate" in cfg["modules_to_save"]  # the trained router travels with it


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_per_expert_export(runs, family, tmp_path):
    """Exact per-expert ranks; loaded with transformers 4 when available."""
    from safetensors import safe_open

    from megatron_drlora.hf import verify

    run = runs[0][family]
    save = str(tmp_path / "pe")
    _export(run, "peft", save, peft_layout="per-expert")
    cfg = json.load(open(os.path.join(save, "adapter_config.json")))
    assert len(cfg["rank_pattern"]) == len(set(run["rank_map"].flatten().tolist()))
    f = safe_open(os.path.join(save, "adapter_model.safetensors"), "pt")
    lora_a = [k for k in f.keys() if k.endswith("lora_A.weight")]
    assert len(lora_a) == run["rank_map"].numel()
    for key in lora_a:  # every module's tensor rank is its rank-map entry, and the config's
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        layer, expert, proj = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)$",
                                        module).groups()
        proj = {"w1": "gate", "w3": "up", "w2": "down"}.get(proj, proj.replace("_proj", ""))
        want = int(run["rank_map"][int(layer), int(expert), list(run["targets"]).index(proj)])
        assert f.get_slice(key).get_shape()[0] == want
        claimed = [r for k, r in cfg["rank_pattern"].items()
                   if re.match(rf"(.*\.)?({k})$", module)]
        assert claimed[:1] == [want]
    if not TF4_PATH:
        pytest.skip("loading the per-expert layout needs transformers 4 (transformers 5 fuses "
                    "experts; PEFT's conversion of per-expert adapters is wrong there): set "
                    "DRLORA_TRANSFORMERS4_PATH to a `pip install --target` directory with "
                    "transformers==4.57.6")
    tok = tmp_path / "tokens.pt"
    torch.save(tokens(), tok)
    env = dict(os.environ, PYTHONPATH=TF4_PATH, PYTHONWARNINGS="ignore")
    for adapter, hf_dir, name in ((save, run["hf"], "peft"),):
        out = tmp_path / f"{name}.pt"
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "hf4_logits.py"),
                               hf_dir, adapter, str(tok), str(out)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = torch.load(out)
        assert result["transformers"].startswith("4.")
        diff = verify.max_abs_diff(result["logits"], run["logits"])
        assert diff < TOL, f"{family} per-expert on transformers {result['transformers']}: {diff}"


# --- end to end: convert at EP2, fine-tune at EP2 with pretrain_gpt, export with the CLI ----
def _cli(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _two_ranks(script, args):
    """SCRIPT args in 2 ranks as torchrun starts them (tests/prefork.py); returns the output."""
    from tests.megatron_runs import torchrun

    proc = torchrun(2, [str(a) for a in args], timeout=300, entry=str(script))
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_end_to_end_ep2_training_exports_at_any_layout(megatron_single, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_drlora.checkpoint import drlora_state
    from megatron_drlora.hf import verify

    from tests.hf_tiny import make_tokenizer
    from tests.train_flags import DATA

    hf_dir = make_hf_model("olmoe", str(tmp_path / "hf"), seed=3,
                           name_or_path="allenai/OLMoE-1B-7B-0924")
    make_tokenizer(hf_dir)  # model.args names it: the run tokenizes with HuggingFaceTokenizer
    base, run = tmp_path / "base", tmp_path / "run"
    _two_ranks(REPO / "tools" / "convert_hf_to_megatron.py",
               ["--hf-path", hf_dir, "--save", base, "--expert-model-parallel-size", "2"])
    log = _two_ranks(REPO / "examples" / "pretrain_gpt.py", [
        f"@{REPO / 'examples' / 'cpu.args'}", f"@{base}/model.args",
        "--pretrained-checkpoint", base, "--expert-model-parallel-size", "2",
        "--moe-token-dispatcher-type", "alltoall",
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "8", "--data-path", DATA, "--split", "100,0,0", "--lr", "2e-2",
        "--lr-warmup-iters", "2",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
        "--ckpt-format", "torch_dist",
        "--log-interval", "4", "--save", run, "--save-interval", "8",
        "--drlora-budget", "4", "--drlora-rank-init", "2", "--drlora-rank-max", "8",
        "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2", "--drlora-grow-buffer", "1",
        "--drlora-targets", "up,down"])
    assert "growth event at step" in log
    common = dist_checkpointing.load_common_state_dict(str(run / "iter_0000008"))
    rank_map = torch.as_tensor(drlora_state(common)["rank_map"])
    assert len(set(rank_map.flatten().tolist())) > 1  # heterogeneous ranks
    export = [sys.executable, REPO / "tools" / "export_to_hf.py", "--load", run,
              "--hf-path", hf_dir]
    assert "--tokenizer-type HuggingFaceTokenizer" in open(base / "model.args").read()
    assert "padded vocab (size: 90)" in log  # Megatron-LM sized it from the HF tokenizer
    out = _cli(export + ["--pretrained-checkpoint", base, "--format", "merged", "--save",
                         tmp_path / "merged", "--verify"])
    assert "> verified:" in out
    out = _cli(export + ["--pretrained-checkpoint", base, "--format", "peft", "--save",
                         tmp_path / "peft", "--verify"])
    assert "> verified:" in out
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))[
        "base_model_name_or_path"] == "allenai/OLMoE-1B-7B-0924"
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")
    assert "base_model: allenai/OLMoE-1B-7B-0924" in open(tmp_path / "merged" /
                                                          "README.md").read()

    margs = verify.model_args_from_file(str(base / "model.args"), SEQ)  # EP1 here
    chunks, handle = verify.build_megatron(margs, str(base), str(run))
    assert handle.config.router == "warmup_frozen"  # router trained after warm-up
    mlogits = verify.megatron_logits(chunks, tokens(), VOCAB)
    base_logits = verify.hf_logits(hf_dir, tokens())
    assert verify.max_abs_diff(mlogits, base_logits) > 1e-3  # training changed the model
    merged = verify.hf_logits(str(tmp_path / "merged"), tokens())
    assert verify.max_abs_diff(merged, mlogits) < TOL
    peft = verify.hf_logits(hf_dir, tokens(), adapter=str(tmp_path / "peft"))
    assert verify.max_abs_diff(peft, mlogits) < TOL


# --- bad inputs -----------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors(runs, tmp_path):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    run = runs[0]["mixtral"]
    quiet = dict(log=lambda s: None)
    with pytest.raises(HFInteropError, match="--load .*no such directory"):
        export(str(tmp_path / "nope"), run["hf"], "merged", str(tmp_path / "o1"), **quiet)
    with pytest.raises(HFInteropError, match="a 'full' checkpoint, not DR-LoRA adapters"):
        export(run["base"], run["hf"], "peft", str(tmp_path / "o2"), **quiet)
    with pytest.raises(HFInteropError, match="--hf-path .*no config.json"):
        export(run["adapters"], str(tmp_path), "peft", str(tmp_path / "o3"), **quiet)
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").close()
    with pytest.raises(HFInteropError, match="not empty"):
        export(run["adapters"], run["hf"], "peft", str(tmp_path / "full"), **quiet)
    # an HF model with 8 experts: the adapters (4 experts) do not belong to it
    hf8 = make_hf_model("mixtral", str(tmp_path / "hf8"), num_local_experts=8)
    with pytest.raises(HFInteropError, match="adapters for 4 experts per layer, the HF model "
                                             "has 8"):
        export(run["adapters"], hf8, "peft", str(tmp_path / "o4"), **quiet)
    # a base with 8 experts given with the 4-expert HF model and adapters
    convert(hf8, str(tmp_path / "base8"), **quiet)
    with pytest.raises(HFInteropError, match="the base has 2 layers x 8 experts"):
        export(run["adapters"], run["hf"], "merged", str(tmp_path / "o5"),
               pretrained_checkpoint=str(tmp_path / "base8"), **quiet)
    # a base of another family (OLMoE's has q/k norms) with the Mixtral HF model
    with pytest.raises(HFInteropError, match="the base has q/k norms"):
        export(run["adapters"], run["hf"], "merged", str(tmp_path / "o6"),
               pretrained_checkpoint=runs[0]["olmoe"]["base"], **quiet)


def test_cli_reports_errors_without_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_to_hf.py"), "--load",
                           str(tmp_path / "missing"), "--hf-path", str(tmp_path), "--format",
                           "peft", "--save", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


# --- --verify ---------------------------------------------------------------------------------
def _hf_copy(run, dst, name_or_path=None, readme=None):
    """A copy of the run's HF directory with config.json's _name_or_path (and a README.md)."""
    import shutil

    shutil.copytree(run["hf"], dst)
    cfg_file = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["_name_or_path"] = name_or_path if name_or_path is not None else str(dst)
    json.dump(cfg, open(cfg_file, "w"), indent=2)
    if readme is not None:
        open(os.path.join(dst, "README.md"), "w").write(readme)
    return str(dst)


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_verify_passes_on_a_good_export(runs, tmp_path, fmt):
    run = runs[0]["olmoe"]  # gate, up and down adapted, trained router
    save = tmp_path / fmt
    result = _export(run, fmt, str(save), pretrained_checkpoint=run["base"], verify=True)
    v = result["verified"]
    assert v["max_rel_diff"] < 1e-5 and v["max_abs_diff"] < TOL, v
    assert (v["tolerance"], v["sequences"], v["seq_length"]) == (1e-3, 4, 32)
    card = open(save / "README.md").read()
    assert "## Verification" in card and f"{v['max_abs_diff']:.3g}" in card
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left


def _corrupt(save):
    """Noise on one expert's down projection of the merged shard (what a wrong merge, a bad
    rank or a truncated write would do)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(save, "model.safetensors")
    tensors = load_file(path)
    name = next(k for k in sorted(tensors)
                if re.search(r"layers\.1\..*experts\.0\.(down|w2)", k))
    g = torch.Generator().manual_seed(0)
    t = tensors[name]
    tensors[name] = (t.float() + 0.5 * torch.randn(t.shape, generator=g)).to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_fails_loudly_on_a_corrupted_export(runs, tmp_path):
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe
    from megatron_drlora.hf.verify import verify_export
    from transformers import AutoConfig

    run = runs[0]["olmoe"]
    save = str(tmp_path / "merged")
    _export(run, "merged", save, pretrained_checkpoint=run["base"])
    desc = describe(AutoConfig.from_pretrained(run["hf"]))
    verify_export(save, "merged", run["adapters"], run["base"], run["hf"], desc,
                  log=lambda s: None)  # the good export passes
    _corrupt(save)
    with pytest.raises(HFInteropError, match=r"--verify FAILED: merged export .* max abs diff "
                                             r"[\d.e+-]+, max rel diff [\d.e+-]+, median rel "
                                             r"diff .*the max must be <= 0\.001.*worst at "
                                             r"sequence"):
        verify_export(save, "merged", run["adapters"], run["base"], run["hf"], desc,
                      log=lambda s: None)


def test_cli_verify_failure_exits_nonzero_and_publishes_nothing(runs, tmp_path, monkeypatch,
                                                                capsys):
    """The CLI with --verify: a corrupted export (corrupted right after it was written) exits 2
    with the differences on stderr; --save is not created, the export waits in SAVE.unverified."""
    from megatron_drlora.hf import export_merged as em
    from megatron_drlora.hf.exporter import main

    run = runs[0]["olmoe"]
    argv = ["--load", run["adapters"], "--pretrained-checkpoint", run["base"], "--hf-path",
            run["hf"], "--format", "merged", "--verify"]
    assert main(argv + ["--save", str(tmp_path / "good")]) == 0
    assert "> verified:" in capsys.readouterr().out
    original = em.export_merged

    def corrupting(*args, **kwargs):
        result = original(*args, **kwargs)
        _corrupt(args[4])  # the (staged) output directory
        return result

    monkeypatch.setattr(em, "export_merged", corrupting)
    bad = tmp_path / "bad"
    assert main(argv + ["--save", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--verify FAILED" in err and "max abs diff" in err and "max rel diff" in err, err
    assert not bad.exists() and (tmp_path / "bad.unverified" / "model.safetensors").exists()


def test_verify_needs_the_converted_base(runs, tmp_path):
    from megatron_drlora.hf.common import HFInteropError

    run = runs[0]["mixtral"]
    with pytest.raises(HFInteropError, match="--verify needs --pretrained-checkpoint"):
        _export(run, "peft", str(tmp_path / "a"), verify=True)
    os.makedirs(tmp_path / "nobase")
    with pytest.raises(HFInteropError, match="no model.args"):
        _export(run, "peft", str(tmp_path / "b"), verify=True,
                pretrained_checkpoint=str(tmp_path / "nobase"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(HFInteropError, match="--verify --peft-layout per-expert: .*transformers "
                                             "4 only"):
        _export(run, "peft", str(tmp_path / "c"), verify=True, peft_layout="per-expert",
                pretrained_checkpoint=run["base"])


@pytest.mark.slow
def test_bf16_base_merged_bf16_export_verifies(megatron_single, tmp_path):
    """bf16 HF model -> bf16 Megatron base -> DR-LoRA -> merged export in the config's bf16,
    verified within the bf16 tolerance (every merged weight is rounded to bf16)."""
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    hf_dir = make_hf_model("qwen2_moe", str(tmp_path / "hf"), dtype=torch.bfloat16)
    convert(hf_dir, str(tmp_path / "base"), log=lambda s: None)
    _adapted_checkpoint("qwen2_moe", str(tmp_path / "base"), str(tmp_path / "adapters"),
                        ("up", "down"))
    result = export(str(tmp_path / "adapters"), hf_dir, "merged", str(tmp_path / "merged"),
                    pretrained_checkpoint=str(tmp_path / "base"), verify=True,
                    log=lambda s: None)
    v = result["verified"]
    assert result["dtype"] == "bfloat16" and (v["criterion"], v["tolerance"]) == ("median", 1e-2)
    assert 0 < v["median_rel_diff"] < 1e-2 and v["max_rel_diff"] > 1e-3, v  # rounding shows
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.families import describe
    from megatron_drlora.hf.verify import verify_export
    from transformers import AutoConfig

    _corrupt(str(tmp_path / "merged"))  # a wrong expert is still caught in bf16
    with pytest.raises(HFInteropError, match="--verify FAILED: .*the median must be <= 0.01"):
        verify_export(str(tmp_path / "merged"), "merged", str(tmp_path / "adapters"),
                      str(tmp_path / "base"), hf_dir, describe(AutoConfig.from_pretrained(hf_dir)),
                      dtype="bfloat16", log=lambda s: None)


# --- hub id ---------------------------------------------------------------------------------
def test_hub_id_resolution():
    from megatron_drlora.hf.common import HFInteropError
    from megatron_drlora.hf.exporter import resolve_hub_id

    logs = []
    hub = "allenai/OLMoE-1B-7B-0924"
    assert resolve_hub_id({"_name_or_path": hub}, None, logs.append) == hub
    assert resolve_hub_id({"_name_or_path": "gpt2"}, None, logs.append) == "gpt2"
    assert resolve_hub_id({"_name_or_path": "/abs/olmoe"}, "org/model", logs.append) == \
        "org/model"
    assert not logs
    for local in ("/abs/olmoe", "./olmoe", "../m/olmoe", "~/olmoe", "a/b/c", "", None):
        assert resolve_hub_id({"_name_or_path": local}, None, logs.append) is None
    assert len(logs) == 7 and "--hf-model-id" in logs[0]
    for bad in ("/abs/olmoe", "org/name/x", "../x"):
        with pytest.raises(HFInteropError, match="--hf-model-id .*not a Hugging Face hub id"):
            resolve_hub_id({}, bad, logs.append)


def test_peft_base_model_is_the_hub_id_never_a_local_path(runs, tmp_path):
    run = dict(runs[0]["qwen3_moe"])
    run["hf"] = _hf_copy(run, tmp_path / "hf_hub", "Qwen/Qwen3-30B-A3B")
    _export(run, "peft", str(tmp_path / "hub"))
    cfg = json.load(open(tmp_path / "hub" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen3-30B-A3B"
    assert "base_model: Qwen/Qwen3-30B-A3B" in open(tmp_path / "hub" / "README.md").read()

    run["hf"] = _hf_copy(run, tmp_path / "hf_local")  # _name_or_path: a local absolute path
    logs = []
    from megatron_drlora.hf.exporter import export

    export(run["adapters"], run["hf"], "peft", str(tmp_path / "local"), log=logs.append)
    text = open(tmp_path / "local" / "adapter_config.json").read()
    assert json.loads(text).get("base_model_name_or_path") is None
    assert str(tmp_path) not in text and "base_model:" not in \
        open(tmp_path / "local" / "README.md").read()
    assert any("hub id is unknown" in line for line in logs)
    export(run["adapters"], run["hf"], "peft", str(tmp_path / "flag"), log=logs.append,
           hf_model_id="org/tiny-qwen3-moe")
    assert json.load(open(tmp_path / "flag" / "adapter_config.json"))[
        "base_model_name_or_path"] == "org/tiny-qwen3-moe"


# --- model card -----------------------------------------------------------------------------
def test_merged_export_has_its_own_model_card(runs, tmp_path):
    run = dict(runs[0]["olmoe"])
    run["hf"] = _hf_copy(run, tmp_path / "hf", "allenai/OLMoE-1B-7B-0924",
                         readme="# OLMoE base card: not this model\n")
    save = tmp_path / "merged"
    _export(run, "merged", str(save), pretrained_checkpoint=run["base"])
    card = open(save / "README.md").read()
    assert "OLMoE base card" not in card
    assert card.startswith("---\nbase_model: allenai/OLMoE-1B-7B-0924\nlibrary_name: "
                           "transformers\n")
    assert "DR-LoRA" in card and "2601.04823" in card
    for setting in ("| budget (r_target) | 4 |", "| p_grow | 0.5 |", "| r_max | 8 |",
                    "| targets | gate, up, down |", "| router | warmup_frozen |"):
        assert setting in card, setting
    rank_map, projs = run["rank_map"], list(run["targets"])
    for m, layer in enumerate(range(rank_map.shape[0])):
        for p, proj in enumerate(projs):
            r = rank_map[m, :, p]
            row = (f"| {layer} | {proj} | {int(r.min())} | {float(r.float().mean()):.2f} | "
                   f"{int(r.max())} | {int(r.sum())} |")
            assert row in card, row
    ranks = json.load(open(save / "drlora_rank_map.json"))
    assert ranks["layout"] == "merged" and ranks["rank_map"] == rank_map.tolist()


# --- crash safety ---------------------------------------------------------------------------
def test_a_failed_export_leaves_nothing_at_save(runs, tmp_path, monkeypatch):
    from megatron_drlora.hf import checkpoint_io

    run = runs[0]["mixtral"]

    def crash(self):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_io.ShardWriter, "close", crash)
    with pytest.raises(OSError, match="simulated"):
        _export(run, "merged", str(tmp_path / "out"), pretrained_checkpoint=run["base"])
    assert os.listdir(tmp_path) == []  # neither --save nor a staging directory
    os.makedirs(tmp_path / "empty")  # an empty --save is allowed and replaced
    monkeypatch.undo()
    _export(run, "peft", str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path / "empty")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "drlora_rank_map.json"]
