"""examples/pretrain_gpt.py inside Megatron-LM's own loop, on CPU/gloo, with real processes.

One base (trained by the same entry without DR-LoRA), one single-process DR-LoRA reference run,
then the DP2, EP2, TP2 and PP2 layouts: the same growth decisions as one process, checkpoints
that hold only what trains, bitwise resume, loading in another layout, and refusals.
The checkpoints are read back by tests/workers/read_checkpoint.py, which knows nothing of the
model code.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.dist_harness import REPO
from tests.megatron_runs import ENTRY, assert_same_run, events, read_checkpoint, torchrun
from tests.megatron_runs import drlora_run as _drlora_run
from tests.train_flags import CPU as CPU_ARGS, DRLORA, EVENTS, LAYOUTS, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(work, base):
    return _drlora_run(work, base, "reference", 1, [])


def test_reference_grows_at_planned_steps_and_saves_only_what_trains(reference, work):
    assert [e["iteration"] for e in events(reference)] == EVENTS
    final = torch.tensor(events(reference)[-1]["rank_map"])
    assert (final.sum(dim=(1, 2)) == 4 * 2 * 4).all()  # every layer at budget x modules
    assert {"iter_0000004", "iter_0000008", "drlora_rank_heatmap.png"} <= set(os.listdir(reference))
    ckpt = read_checkpoint(reference / "iter_0000008", work)
    keys = set(ckpt["tensors"])
    model_keys = {k for k in keys if not k.startswith("optimizer.")}
    assert model_keys == {f"drlora.layers.{l}.{p}_{w}" for l in (0, 1) for p in ("up", "down")
                          for w in "AB"} | {"decoder.layers.mlp.router.weight"} | {
        f"drlora.layers.{l}.pool_table_{side}" for l in (0, 1) for side in ("hidden", "ffn")}
    assert any(k.startswith("optimizer.state.exp_avg.drlora.") for k in keys)
    assert torch.equal(ckpt["drlora"]["rank_map"], final)
    assert ckpt["drlora"]["settings"]["t_warmup"] == 2


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_takes_the_same_growth_decisions_as_one_process(layout, reference, work, base):
    """Every layout trains, grows, saves and resumes (all but EP2 are stopped at iteration 3
    and resumed; EP2's resume is compared bitwise below) like one process."""
    extra = LAYOUTS[layout] + (["--async-save"] if layout == "dp2" else [])
    run = _drlora_run(work, base, layout, 2, extra, stop_at=None if layout == "ep2" else 3)
    assert [e["iteration"] for e in events(run)] == EVENTS
    assert_same_run(reference, run, work)


def test_resume_is_bitwise_identical(work, base):
    full = _drlora_run(work, base, "ep2", 2, LAYOUTS["ep2"])
    part = _drlora_run(work, base, "ep2_resumed", 2, LAYOUTS["ep2"], stop_at=3)
    decisions = lambda run: [(e["iteration"], e["rank_map"], e["saliency"]) for e in events(run)]
    assert decisions(part) == decisions(full)
    steps = lambda run: [(s["iteration"], s["grad_norm"]) for s in
                         map(json.loads, open(run / "drlora_steps.jsonl"))]
    assert steps(part) == steps(full) and len(steps(full)) == 8  # exact floats
    a = read_checkpoint(full / "iter_0000008", work)
    b = read_checkpoint(part / "iter_0000008", work)
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key
    assert torch.equal(a["drlora"]["rank_map"], b["drlora"]["rank_map"])
    for key, value in a["drlora"]["saliency"].items():
        assert torch.equal(value, b["drlora"]["saliency"][key]), key


@pytest.mark.parametrize("source", ["ep2", "tp2"])
def test_checkpoint_loads_in_another_layout(source, work, base):
    """Resume the 2-process run's iteration-4 checkpoint in one process: adapters, ranks,
    saliency and optimizer state carry over, so iterations 5-8 end where the 2-process run
    ended (up to fp32 layout noise)."""
    src = _drlora_run(work, base, source, 2, LAYOUTS[source])
    copy = work / f"{source}_to_1"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    shutil.copytree(src / "iter_0000004", copy / "iter_0000004")
    (copy / "latest_checkpointed_iteration.txt").write_text("4")
    proc = torchrun(1, TINY + DRLORA + ["--pretrained-checkpoint", str(base), "--save",
                                        str(copy), "--load", str(copy)])
    assert "DR-LoRA state restored: average rank 3.00" in proc.stdout
    # Megatron-LM restores the RNG state where (TP, PP) match (ep2 -> 1: data-parallel rank
    # 0's) and says it resets it where they do not; DR-LoRA's own state holds no RNG
    assert ("RNG state will be ignored" in proc.stdout) == (source == "tp2")
    want = read_checkpoint(src / "iter_0000008", work)
    got = read_checkpoint(copy / "iter_0000008", work)
    assert torch.equal(want["drlora"]["rank_map"], got["drlora"]["rank_map"])
    for key, ref_t in want["tensors"].items():
        if ".pool_table_" in key:
            continue  # slot numbers are per layout (each EP rank numbers its own pool)
        scale = ref_t.abs().max().item()
        assert torch.allclose(got["tensors"][key], ref_t, rtol=0, atol=1e-4 * scale), key


def test_resume_with_other_drlora_settings_is_refused(work, base):
    src = _drlora_run(work, base, "ep2", 2, LAYOUTS["ep2"])
    copy = work / "ep2_other_settings"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(src, copy)
    args = TINY + DRLORA + ["--pretrained-checkpoint", str(base), "--load", str(copy),
                            "--drlora-gamma", "0.5", "--drlora-grow-interval", "3"]
    proc = torchrun(1, args, expect_ok=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "gamma 1.2 (this run: 0.5)" in text and "grow_interval 2 (this run: 3)" in text


def _parse_only(extra):
    """The entry refuses before any process group: plain python, no torchrun."""
    return subprocess.run([sys.executable, ENTRY] + TINY + ["--train-iters", "4"] + extra,
                          capture_output=True, text=True, cwd=str(REPO), timeout=180)


B4 = ["--drlora-budget", "4", "--drlora-p-grow", "0.5"]


REFUSALS = [
    (B4 + ["--drlora-saliency", "magic"], "--drlora-saliency"),
    (B4, "--pretrained-checkpoint BASE"),
    (B4 + ["--pretrained-checkpoint", "/nope/base"],
     "--pretrained-checkpoint /nope/base: no such directory"),
    (B4 + ["--drlora-rank-init", "6", "--pretrained-checkpoint", "."], "--drlora-rank-init"),
    (B4 + ["--pretrained-checkpoint", ".", "--save", "x", "--save-interval", "2",
           "--ckpt-format", "torch"], "use --ckpt-format torch_dist"),
    (["--no-such-megatron-flag"], "unrecognized arguments: --no-such-megatron-flag"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every case through the entry's argument parsing, in one process
    (tests/workers/parse_cases.py); the CLI path itself is tested by
    test_a_base_given_to_load_is_refused_before_any_work."""
    tmp = tmp_path_factory.mktemp("refusals")
    cases = [TINY + ["--train-iters", "4"] + extra for extra, _ in REFUSALS]
    json.dump(cases, open(tmp / "cases.json", "w"))
    torchrun(1, [tmp / "cases.json", tmp / "out.json"], timeout=180,
             entry=str(REPO / "tests" / "workers" / "parse_cases.py"))
    return json.load(open(tmp / "out.json"))


@pytest.mark.parametrize("case", range(len(REFUSALS)), ids=[n for _, n in REFUSALS])
def test_bad_flags_are_refused_before_any_work(case, refusals):
    got, needle = refusals[case], REFUSALS[case][1]
    assert got["returncode"] == 2, (got["stdout"][-2000:], got["stderr"][-2000:])
    assert needle in got["stderr"]
    assert "initializing torch distributed" not in got["stdout"]


# Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh, flag for flag: only the
# sizes are scaled down (marked), the tokenizer is a tiny SentencePiece model made here.
MIXTRAL_SCRIPT = [
    "--use-mcore-models", "--disable-bias-linear", "--seq-length", "32",  # 256
    "--max-position-embeddings", "64", "--num-layers", "2", "--hidden-size", "64",  # 2048, 256
    "--ffn-hidden-size", "128", "--num-attention-heads", "2", "--init-method-std", "0.01",  # 896
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion",
    "--no-position-embedding", "--rotary-base", "1000000",
    "--num-experts", "2", "--moe-router-topk", "2", "--moe-router-load-balancing-type",
    "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
    "--overlap-param-gather", "--overlap-grad-reduce",
    "--tokenizer-type", "Llama2Tokenizer", "--mock-data", "--split", "99990,8,2",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4", "--train-iters", "7",
    "--min-lr", "1.0e-5", "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--sequence-parallel",
    "--eval-iters", "10", "--no-load-optim", "--no-load-rng",
]


def _sentencepiece_model(path) -> str:
    import sentencepiece

    text = [f"expert {i} routes token {i * 7 % 13} to layer {i % 3} and back" for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text),
                                             model_prefix=str(path), vocab_size=64,
                                             model_type="bpe", eos_id=2, bos_id=1, unk_id=0,
                                             pad_id=-1, minloglevel=2)
    return str(path) + ".model"


def test_megatron_lm_example_script_runs_with_drlora_flags_added(work):
    script = [CPU_ARGS] + MIXTRAL_SCRIPT + ["--tokenizer-model",
                                           _sentencepiece_model(work / "llama2_tok")]
    base = work / "mixtral_base"
    torchrun(2, script + ["--save", str(base), "--save-interval", "7"])
    run = work / "mixtral_drlora"
    # the real torchrun here: the command a user types, agent and all
    proc = torchrun(2, script + ["--pretrained-checkpoint", str(base), "--save", str(run),
                                 "--save-interval", "7", "--drlora-budget", "4",
                                 "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2",
                                 "--drlora-grow-buffer", "1"], launcher="torchrun")
    text = proc.stdout + proc.stderr
    assert "growth event at step" in text and "drlora avg rank" in text
    steps = [json.loads(line) for line in open(run / "drlora_steps.jsonl")]
    assert [s["iteration"] for s in steps] == list(range(1, 8))
    assert steps[-1]["average_rank"] > 2.0  # grown from r_init 2 towards the budget 4
    assert (run / "iter_0000007").is_dir()


def test_a_base_given_to_load_is_refused_before_any_work(base):
    proc = _parse_only(B4 + ["--pretrained-checkpoint", str(base), "--load", str(base)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds a model without DR-LoRA state" in proc.stderr
    assert "initializing torch distributed" not in proc.stdout


def test_steps_megatron_skips_leave_the_saliency_untouched(work, base):
    """fp16 with a loss scale too large for the first steps: Megatron-LM skips them (gradient
    overflow) and halves the scale; DR-LoRA drops those steps' statistics (the EMAs count only
    the applied steps) and still runs the growth event due in between, on unscaled gradients
    afterwards."""
    run = work / "fp16"
    torchrun(1, TINY + DRLORA + ["--pretrained-checkpoint", str(base), "--save", str(run),
                                 "--fp16", "--initial-loss-scale", str(2 ** 21),
                                 "--hysteresis", "1"])
    steps = [json.loads(line) for line in open(run / "drlora_steps.jsonl")]
    stepped = [s["stepped"] for s in steps]
    assert not stepped[0] and sum(stepped) >= 3, stepped  # measured: F F F T T F T T
    assert all(s["statistics_dropped"] == "the optimizer skipped this step"
               for s in steps if not s["stepped"])
    assert [e["iteration"] for e in events(run)] == EVENTS  # the event at 2 was a skipped step
    state = read_checkpoint(run / "iter_0000008", work)["drlora"]
    assert int(state["saliency"]["updates"]) == sum(stepped)


def test_flags_that_do_not_fit_the_base_are_refused_naming_tensor_and_flag(work, base):
    proc = torchrun(1, TINY + DRLORA + ["--pretrained-checkpoint", str(base),
                                        "--num-experts", "8", "--train-iters", "2"],
                    expect_ok=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "does not fit the model these flags build" in text
    assert ("decoder.layers.mlp.router.weight: (2, 4, 32) in the base, (2, 8, 32) with these "
            "flags (--num-experts" in text), text[-3000:]
    assert "iteration        1/" not in text  # refused before any training
