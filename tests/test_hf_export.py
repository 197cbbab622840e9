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

from tests.conftest import free_port  # noqa: E402
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


def _torchrun(script, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)] + list(args)


@pytest.mark.slow
def test_end_to_end_ep2_training_exports_at_any_layout(megatron_single, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_drlora.checkpoint import drlora_state
    from megatron_drlora.hf import verify

    hf_dir = make_hf_model("olmoe", str(tmp_path / "hf"), seed=3)
    base, run = tmp_path / "base", tmp_path / "run"
    _cli(_torchrun(REPO / "tools" / "convert_hf_to_megatron.py",
                   ["--hf-path", hf_dir, "--save", base, "--expert-model-parallel-size", "2"]))
    log = _cli(_torchrun(REPO / "examples" / "pretrain_gpt.py", [
        f"@{REPO / 'examples' / 'cpu.args'}", f"@{base}/model.args",
        "--pretrained-checkpoint", base, "--expert-model-parallel-size", "2",
        "--moe-token-dispatcher-type", "alltoall", "--tokenizer-type", "NullTokenizer",
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "8", "--mock-data", "--lr", "2e-2", "--lr-warmup-iters", "2",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
        "--ckpt-format", "torch_dist",
        "--log-interval", "4", "--save", run, "--save-interval", "8",
        "--drlora-budget", "4", "--drlora-rank-init", "2", "--drlora-rank-max", "8",
        "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2", "--drlora-grow-buffer", "1",
        "--drlora-targets", "up,down"]))
    assert "growth event at step" in log
    common = dist_checkpointing.load_common_state_dict(str(run / "iter_0000008"))
    rank_map = torch.as_tensor(drlora_state(common)["rank_map"])
    assert len(set(rank_map.flatten().tolist())) > 1  # heterogeneous ranks
    export = [sys.executable, REPO / "tools" / "export_to_hf.py", "--load", run,
              "--hf-path", hf_dir]
    _cli(export + ["--pretrained-checkpoint", base, "--format", "merged", "--save",
                   tmp_path / "merged"])
    _cli(export + ["--format", "peft", "--save", tmp_path / "peft"])

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
