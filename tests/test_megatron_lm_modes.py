"""Megatron-LM modes beyond the plain layouts, through examples/pretrain_gpt.py on CPU/gloo.

Each combined run takes the single-process reference's growth decisions and ends with its
tensors (tests/megatron_runs.py::assert_same_run): pipeline x expert parallel with the
distributed optimizer and overlapped gradient reduction; tensor x expert-tensor parallel with
the distributed optimizer, the all-gather dispatcher and full activation recompute. bf16 runs
with fp32 main parameters. A rank killed with SIGKILL while a 2-process checkpoint is being
written leaves the previous checkpoint the one to resume from, and the resumed run ends bit for
bit where an uninterrupted run ends, also with dropout on and with the distributed optimizer.
A resume in another (TP, PP) layout says that Megatron
reset the RNG state.
"""

import json
import shutil

import pytest
import torch

from tests.dist_harness import REPO
from tests.megatron_runs import (assert_same_run, drlora_run, events, read_checkpoint, steps,
                                 torchrun)
from tests.train_flags import DRLORA, EVENTS, LAYOUTS, TINY

pytestmark = pytest.mark.slow

MODES = {
    "pp2_ep2_distopt_overlap": (4, ["--pipeline-model-parallel-size", "2",
                                    "--expert-model-parallel-size", "2",
                                    "--moe-token-dispatcher-type", "alltoall",
                                    "--use-distributed-optimizer", "--overlap-grad-reduce"]),
    "tp2_etp2_distopt_allgather_recompute": (2, [
        "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--use-distributed-optimizer", "--moe-token-dispatcher-type", "allgather",
        "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1"]),
}


@pytest.fixture(scope="module")
def reference(work, base):
    return drlora_run(work, base, "reference", 1, [])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_takes_the_same_growth_decisions_as_one_process(mode, reference, work, base):
    nproc, extra = MODES[mode]
    run = drlora_run(work, base, mode, nproc, extra)
    assert_same_run(reference, run, work)


def test_bf16_grows_on_schedule_with_fp32_main_parameters(reference, work, base):
    run = drlora_run(work, base, "bf16", 1, ["--bf16"])
    got, want = events(run), events(reference)
    assert [e["iteration"] for e in got] == EVENTS
    for g, w in zip(got, want):  # bf16 noise may move near-ties, never the budget
        assert torch.tensor(g["rank_map"]).sum() == torch.tensor(w["rank_map"]).sum()
    steps = [json.loads(line) for line in open(run / "drlora_steps.jsonl")]
    assert all(s["stepped"] and s["grad_norm"] > 0 for s in steps)
    ckpt = read_checkpoint(run / "iter_0000008", work)["tensors"]
    assert ckpt["drlora.layers.0.up_A"].dtype == torch.bfloat16
    main = [k for k in ckpt if k.startswith("optimizer.") and "drlora.layers.0.up_A" in k]
    assert main and all(ckpt[k].dtype == torch.float32 for k in main), main


def test_kill_during_a_multi_process_save_resumes_from_the_previous_checkpoint(work, base):
    full = drlora_run(work, base, "ep2", 2, LAYOUTS["ep2"])
    run = work / "killed_in_save"
    shutil.rmtree(run, ignore_errors=True)
    args = TINY + DRLORA + LAYOUTS["ep2"] + ["--pretrained-checkpoint", str(base), "--save",
                                             str(run), "--load", str(run)]
    crashed = torchrun(2, args, expect_ok=False, env={"DRLORA_TEST_CRASH": "iter_0000008:1"},
                       entry=str(REPO / "tests" / "workers" / "crash_in_save.py"))
    assert crashed.returncode != 0
    assert "rank 1 killed after writing" in crashed.stdout
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (run / "iter_0000008").is_dir() and not (run / "iter_0000008" / ".metadata").exists()

    resumed = torchrun(2, args)
    assert "DR-LoRA state restored" in resumed.stdout + resumed.stderr
    # the first attempt logged iterations 5-8 (events at steps 4 and 6); they ran again
    assert "dropped 6 records of iterations after 4" in resumed.stdout
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    decisions = lambda r: [(e["iteration"], e["rank_map"], e["saliency"]) for e in events(r)]
    assert decisions(run) == decisions(full)
    grad_norms = lambda r: [(s["iteration"], s["grad_norm"]) for s in steps(r)]
    assert grad_norms(run) == grad_norms(full) and len(grad_norms(run)) == 8
    a, b = read_checkpoint(full / "iter_0000008", work), read_checkpoint(run / "iter_0000008", work)
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key


def _assert_resumed_bitwise(full, part, work):
    """The resumed run's final checkpoint and every step's grad norm equal the uninterrupted
    run's exactly."""
    a, b = read_checkpoint(full / "iter_0000008", work), read_checkpoint(part / "iter_0000008", work)
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key
    grad_norms = lambda r: [(s["iteration"], s["grad_norm"]) for s in steps(r)]
    assert grad_norms(part) == grad_norms(full) and len(grad_norms(full)) == 8


def test_resume_with_dropout_is_bitwise_identical(work, base):
    """Dropout on (Megatron-LM's default 0.1, which converted bases' model.args keep): stopped
    at 3 and resumed, the run ends bit for bit where an uninterrupted one ends. On CPU this
    needs the data loader's own generator (compat.cpu): the CPU generator is also the one
    dropout draws from."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    full = drlora_run(work, base, "dropout", 1, dropout)
    part = drlora_run(work, base, "dropout_resumed", 1, dropout, stop_at=3)
    _assert_resumed_bitwise(full, part, work)


@pytest.mark.parametrize("bank", ["dense", "pool"])
def test_distributed_optimizer_resume_is_bitwise_identical(bank, work, base):
    """DP2 with the distributed optimizer, stopped at 3 and resumed, ends bit for bit where an
    uninterrupted run ends (dense bank and rank pool): Adam's moments and per-parameter step
    come back from the checkpoint's sharded optimizer state. On CPU (no Apex/Transformer
    Engine) this needs compat.cpu's distributed-optimizer patches: without them every such
    resume failed while loading, and then resumed with Adam's step reset to 0."""
    distopt = ["--use-distributed-optimizer"] + (["--drlora-rank-pool"] if bank == "pool"
                                                 else ["--no-drlora-rank-pool"])
    full = drlora_run(work, base, f"distopt_{bank}", 2, distopt)
    part = drlora_run(work, base, f"distopt_{bank}_resumed", 2, distopt, stop_at=3)
    _assert_resumed_bitwise(full, part, work)
    assert [e["rank_map"] for e in events(part)] == [e["rank_map"] for e in events(full)]


# DeepSeek-V3-style MoE in Megatron-Core's terms (multi-latent attention aside): a dense first
# layer, a shared expert, sigmoid scores with an aux-loss-free expert bias, group-limited top-k
# and a routed scaling factor.
DEEPSEEK_STYLE = ["--num-layers", "3", "--moe-layer-freq", "[0,1,1]", "--ffn-hidden-size", "64",
                  "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "32",
                  "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                  "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
                  "--moe-router-topk-scaling-factor", "2.5",
                  "--moe-router-load-balancing-type", "none", "--moe-router-dtype", "fp32"]


def test_deepseek_style_moe_adapts_routed_experts_and_keeps_the_expert_bias(work):
    """Adapters on the routed experts of the MoE layers only (not the dense first layer, not
    the shared expert); with the router frozen by DR-LoRA, Megatron-LM still updates the
    expert bias, and the checkpoint carries it, so a stopped and resumed EP2 run ends where
    one process ends."""
    base = work / "deepseek_style_base"
    if not base.exists():
        torchrun(1, TINY + DEEPSEEK_STYLE + ["--train-iters", "2", "--init-from-identity",
                                             "--save", str(base), "--save-interval", "2"])
    extra = DEEPSEEK_STYLE + ["--drlora-router", "frozen"]
    ref = drlora_run(work, base, "deepseek_style_ref", 1, extra)
    run = drlora_run(work, base, "deepseek_style_ep2", 2, extra + LAYOUTS["ep2"], stop_at=3)
    assert [e["iteration"] for e in events(run)] == EVENTS
    assert all(e["layers"] == [1, 2] for e in events(run))
    assert_same_run(ref, run, work)
    tensors = read_checkpoint(run / "iter_0000008", work)["tensors"]
    model_keys = {k for k in tensors if not k.startswith("optimizer.")}
    biases = {f"decoder.layers.{l}.mlp.router.expert_bias" for l in (1, 2)}
    assert model_keys == {f"drlora.layers.{l}.{p}_{w}" for l in (1, 2) for p in ("up", "down")
                          for w in "AB"} | biases | {
        f"drlora.layers.{l}.pool_table_{side}" for l in (1, 2) for side in ("hidden", "ffn")}
    for key in biases:  # moved by Megatron's aux-loss-free update from the base's zeros
        assert tensors[key].abs().max() > 0, key
