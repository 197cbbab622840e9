"""`--drlora-shared-experts uniform`: uniform LoRA at r_target on the shared expert, outside the
DR-LoRA budget.

Compared with independent references: the adapted shared expert (gated, Qwen2-MoE style)
against base MLP + s * B A written here in plain PyTorch, outputs and factor gradients; (slow)
TP2 + sequence parallelism against TP1 in one 2-rank launch (tests/workers/shared_lora_worker.py);
(slow) examples/pretrain_gpt.py on a converted tiny Qwen2-MoE: growth happens, the shared
adapters train, a stopped run resumes bit for bit, a changed flag on resume is refused, the PEFT
and merged exports hold them and verify, a default run's export does not. The PEFT targets are
checked against the modules transformers builds for Qwen2-MoE, GLM-4.5 and DeepSeek-V3.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

RANK = 4  # r_target of the in-process tests


def _model(shared=40, gate=True, targets=("gate", "up", "down"), mode="uniform"):
    from megatron_drlora import DRLoRAConfig
    from tests.tiny import build, tiny_args

    margs = tiny_args(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=gate)
    return build(margs, DRLoRAConfig(budget=RANK, targets=targets, shared_experts=mode,
                                             p_grow=0.5))


def test_shared_expert_output_and_gradients_match_plain_pytorch(megatron_single):
    """SharedExpertMLP with the adapters (sigmoid gate untouched) == silu(gate) * up, down,
    each W x + s B A x, times sigmoid(g x): outputs and every factor's gradient."""
    chunks, handle = _model()
    layer = handle.layers[1]
    adapter, mlp = layer.shared, layer.moe_layer.shared_experts
    assert adapter is not None and layer.moe_layer.drlora_shared is adapter
    assert all(not p.requires_grad for p in mlp.parameters())  # frozen base, gate included
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give it values so the products matter
        for name in adapter.projection_names:
            adapter.factor(name, "B").copy_(0.3 * torch.randn(
                adapter.factor(name, "B").shape, generator=g))
    x = torch.randn(5, 2, 32, generator=g, requires_grad=True)
    out = mlp(x)
    weight = torch.randn(out.shape, generator=g)
    (out * weight).sum().backward()

    s = handle.config.scale
    ref = {(n, w): adapter.factor(n, w).detach().clone().requires_grad_(True)
           for n in ("gate", "up", "down") for w in ("A", "B")}
    w1, w2 = mlp.linear_fc1.weight.detach(), mlp.linear_fc2.weight.detach()
    inter = w2.shape[1]
    xr = x.detach().clone().requires_grad_(True)

    def lora(v, n):
        return s * (v @ ref[(n, "A")].T @ ref[(n, "B")].T)

    gate_h = xr @ w1[:inter].T + lora(xr, "gate")
    up_h = xr @ w1[inter:].T + lora(xr, "up")
    act = F.silu(gate_h) * up_h
    expect = (act @ w2.T + lora(act, "down")) * torch.sigmoid(xr @ mlp.gate_weight.detach().T)
    (expect * weight).sum().backward()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (n, w), t in ref.items():
        torch.testing.assert_close(adapter.factor(n, w).grad, t.grad, rtol=1e-5, atol=1e-6,
                                   msg=f"{n}_{w}")
        assert t.grad.abs().max() > 0, f"{n}_{w}"


def test_init_budget_and_checkpoint_keys(megatron_single):
    """B zero (the model starts at the base), A from the layout-independent seed, the shared
    adapters outside the routed banks, the rank map and the summary's routed budget, and their
    checkpoint keys."""
    from megatron_drlora.adapters.bank import init_seed, kaiming_uniform_a
    from megatron_drlora.checkpoint import adapter_sharded_state_dict

    chunks, handle = _model(targets=("up", "down"))
    adapter = handle.layers[0].shared
    assert adapter.rank == RANK and adapter.projection_names == ["up", "down"]
    assert adapter.factor("up", "B").abs().max() == 0
    expect = kaiming_uniform_a(RANK, 32, init_seed(handle.config.seed, 0, "shared", "up"))
    torch.testing.assert_close(adapter.factor("up", "A"), expect.float())
    routed = {id(p) for p in handle.lora_parameters()}
    shared = list(handle.shared_parameters())
    assert len(shared) == 2 * 2 * 2 and not routed & {id(p) for p in shared}
    assert handle.rank_map_shape() == (2, 4, 2)
    summary = handle.shared_summary()
    assert summary["params"] == 2 * RANK * (32 + 40 + 40 + 32)
    assert summary["routed_params_at_r_target"] == handle.summary()["params_at_r_target"]
    assert "outside the DR-LoRA budget" in handle.shared_summary_text()
    keys = adapter_sharded_state_dict(handle)
    assert {k for k in keys if k.startswith("drlora.shared.")} == {
        f"drlora.shared.{l}.{p}_{w}" for l in (0, 1) for p in ("up", "down") for w in "AB"}


def test_refusals_name_the_flag(megatron_single):
    """No shared expert + uniform: refused by apply_drlora and before any work by the entry's
    argument check; so is --moe-shared-expert-overlap."""
    from megatron_drlora.inject import DRLoRAInjectionError
    from megatron_drlora.megatron_lm.arguments import (DRLoRAArgumentError, parse_megatron_args,
                                                       validate)

    with pytest.raises(DRLoRAInjectionError, match="--drlora-shared-experts"):
        _model(shared=None, gate=False)
    argv = ["--num-experts", "4", "--drlora-shared-experts", "uniform",
            "--pretrained-checkpoint", "/nonexistent"]
    with pytest.raises(DRLoRAArgumentError, match="--drlora-shared-experts uniform: this model"):
        validate(parse_megatron_args(argv))
    with pytest.raises(DRLoRAArgumentError, match="--moe-shared-expert-overlap"):
        validate(parse_megatron_args(argv + ["--moe-shared-expert-intermediate-size", "40",
                                             "--moe-shared-expert-overlap"]))


@pytest.mark.parametrize("family,module", [("qwen2_moe", "shared_expert"),
                                           ("glm4_moe", "shared_experts"),
                                           ("deepseek_v3", "shared_experts")])
def test_peft_targets_the_shared_expert_modules_transformers_builds(family, module):
    """The PEFT export's shared-expert targets are modules of the transformers model of each
    family with shared experts (nn.Linear of the right shape), s folded into B."""
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from megatron_drlora.hf.export_peft import PREFIX, _shared
    from megatron_drlora.hf.families import HFNames, describe
    from tests.hf_tiny import hf_config

    cfg = hf_config(family)
    desc = describe(cfg)
    inter, hidden = desc.shared_expert_ffn, desc.hidden_size
    layer = desc.num_layers - 1
    factors = {"gate": {"A": torch.ones(RANK, hidden), "B": torch.ones(inter, RANK)},
               "down": {"A": torch.ones(RANK, inter), "B": torch.ones(hidden, RANK)}}
    fake = SimpleNamespace(layers=[layer], scale=0.5, shared_factors=lambda l: factors)
    tensors, modules = _shared(fake, HFNames(desc, "fused"))
    assert modules == [f"model.layers.{layer}.mlp.{module}.{p}_proj" for p in ("gate", "down")]
    hf = dict(AutoModelForCausalLM.from_config(cfg).named_modules())
    for name, proj in zip(modules, ("gate", "down")):
        linear = hf[name]
        assert isinstance(linear, torch.nn.Linear)
        assert tensors[f"{PREFIX}{name}.lora_A.weight"].shape[1] == linear.in_features
        b = tensors[f"{PREFIX}{name}.lora_B.weight"]
        assert b.shape[0] == linear.out_features and torch.all(b == 0.5)


@pytest.mark.slow
def test_tp2_sequence_parallel_matches_tp1(tmp_path):
    """One 2-rank launch: TP2 + sequence parallelism, then TP1 (DP2) on the same global model
    and batch: logits, loss, the shared adapters' gradients after Megatron's finalize and
    their grad-norm contribution agree; adapters saved at TP2 load at TP1
    (tests/workers/shared_lora_worker.py)."""
    from tests.dist_harness import load, run_torchrun

    out = tmp_path / "shared.pt"
    run_torchrun("shared_lora_worker.py", 2, [out])
    res = load(out)
    tp1, tp2 = res[1], res[2]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tp2["loss"], tp1["loss"], rtol=0, atol=1e-6)
    assert set(tp1["grads"]) == set(tp2["grads"]) and len(tp1["grads"]) == 2 * 3 * 2
    for key, ref in tp1["grads"].items():
        scale = ref.abs().max().item()
        assert scale > 0, key
        err = (tp2["grads"][key] - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"{key}: {err:.3e} vs scale {scale:.3e}"
    assert abs(tp2["grad_norm"] - tp1["grad_norm"]) <= 1e-5 * tp1["grad_norm"]
    assert tp1["resharded"]  # saved at TP2, loaded at TP1 under the same global keys


# --- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    """A tiny random Qwen2-MoE (gated shared expert) with a tokenizer, converted once."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from megatron_drlora.hf.importer import convert
    from tests.hf_tiny import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("qwen2_shared")
    hf_dir = make_hf_model("qwen2_moe", str(root / "hf"))
    make_tokenizer(hf_dir)
    convert(hf_dir, str(root / "base"), log=lambda s: None)
    return hf_dir, str(root / "base")


def _argv(hf_dir, base, ckpt, iters, extra=()):
    from tests.dist_harness import REPO
    from tests.hf_tiny import SEQ
    from tests.train_flags import DATA

    return ["@" + str(REPO / "examples" / "cpu.args"), f"@{base}/model.args",
            "--pretrained-checkpoint", base, "--save", ckpt, "--load", ckpt,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
            "--data-path", DATA, "--split", "100,0,0", "--seq-length", str(SEQ),
            "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--save-interval",
            str(iters), "--eval-iters", "0", "--log-interval", "1", "--lr", "1e-2",
            "--lr-warmup-iters", "1", "--weight-decay", "0", "--ckpt-format", "torch_dist",
            "--hidden-dropout", "0", "--attention-dropout", "0",  # bitwise resume on CPU
            "--drlora-budget", "4", "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2",
            "--drlora-grow-buffer", "1", "--drlora-targets", "gate,up,down"] + list(extra)


def _adapter_tensors(path):
    from megatron_drlora.hf.megatron_reader import AdapterCheckpoint

    adapters = AdapterCheckpoint(str(path))
    out = {}
    for layer in adapters.layers:
        for kind, factors in (("routed", adapters.factors(layer)),
                              ("shared", adapters.shared_factors(layer))):
            out.update({(kind, layer, p, w): t for p, f in factors.items() for w, t in f.items()})
    return adapters, out


@pytest.mark.slow
def test_end_to_end_trains_resumes_exports_and_verifies(qwen2_base, tmp_path):
    """examples/pretrain_gpt.py with --drlora-shared-experts uniform: growth events, the start-up
    line, non-zero shared B, the settings saved; stopped at 3 and resumed, the same tensors
    bit for bit; resuming with the flag changed is refused naming it; PEFT (targets
    mlp.shared_expert.{gate,up,down}_proj) and merged exports verify; a default run's PEFT
    export has no shared-expert target."""
    from megatron_drlora.hf.exporter import export
    from tests.megatron_runs import events, torchrun

    hf_dir, base = qwen2_base
    uniform = ["--drlora-shared-experts", "uniform"]
    ckpt, resumed = tmp_path / "ckpt", tmp_path / "resumed"
    run = torchrun(1, _argv(hf_dir, base, str(ckpt), 5, uniform), timeout=300)
    assert "DR-LoRA shared experts: uniform LoRA rank 4 on the shared experts of 2" in run.stdout
    assert [e["iteration"] for e in events(ckpt)] == [1, 3]
    adapters, tensors = _adapter_tensors(ckpt)
    assert adapters.shared_adapted and adapters.config.shared_experts == "uniform"
    state = adapters.common["model"]["drlora_state"]
    assert state["settings"]["shared_experts"] == "uniform"
    assert state["shared_experts"]["params"] == 2 * 4 * 3 * (32 + 40)
    shared_b = [t for (kind, _, _, w), t in tensors.items() if kind == "shared" and w == "B"]
    assert len(shared_b) == 6 and all(t.abs().max() > 0 for t in shared_b)  # trained from 0

    first = torchrun(1, _argv(hf_dir, base, str(resumed), 5, uniform + ["--exit-interval", "3"]),
                     timeout=300)
    assert "exiting program at iteration 3" in first.stdout + first.stderr
    refused = torchrun(1, _argv(hf_dir, base, str(resumed), 5), timeout=300, expect_ok=False)
    assert refused.returncode == 2 and "trained with --drlora-shared-experts uniform" in (
        refused.stderr), refused.stderr[-2000:]
    last = torchrun(1, _argv(hf_dir, base, str(resumed), 5, uniform), timeout=300)
    assert "DR-LoRA state restored" in last.stdout + last.stderr
    _, again = _adapter_tensors(resumed)
    assert again.keys() == tensors.keys()
    for key, t in tensors.items():
        assert torch.equal(again[key], t), key

    for fmt in ("peft", "merged"):
        result = export(str(ckpt), hf_dir, fmt, str(tmp_path / fmt), pretrained_checkpoint=base,
                        verify=True, log=lambda s: None)
        assert result["verified"]["max_rel_diff"] <= 1e-3, (fmt, result["verified"])
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert sorted(cfg["target_modules"]) == sorted(
        f"model.layers.{l}.mlp.shared_expert.{p}_proj" for l in (0, 1)
        for p in ("gate", "up", "down"))

    plain = tmp_path / "plain"
    torchrun(1, _argv(hf_dir, base, str(plain), 2, ["--drlora-method", "uniform"]),
             timeout=300)  # the default --drlora-shared-experts none (plain LoRA: 2 steps)
    export(str(plain), hf_dir, "peft", str(tmp_path / "peft_plain"), log=lambda s: None)
    cfg = json.load(open(tmp_path / "peft_plain" / "adapter_config.json"))
    assert not cfg["target_modules"] and cfg["target_parameters"]
    assert not any("shared" in k for k in cfg["rank_pattern"])
