"""From a Hugging Face model directory and a chat JSONL file to verified exports, per family.

For a tiny random model of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (Phi-MoE: the recipe test
in tests/test_phimoe.py does the same with Phi's recipe), with a Hugging Face tokenizer that has a
chat template (built here, saved as save_pretrained does): tools/preprocess_data.py renders
the chat records with the template (loss on assistant tokens), the converter imports the model
(its model.args names the tokenizer), examples/pretrain_gpt.py fine-tunes it with DR-LoRA on
that data (growth events), and the merged and PEFT exports, loaded with transformers (+ peft),
give the Megatron model's logits (checked here; the exporter's own --verify is tested in
tests/test_hf_export.py)."""

import json

import pytest

from tests.dist_harness import REPO
from tests.hf_tiny import (FAMILIES, SEQ, VOCAB, make_chat_data, make_hf_model, make_tokenizer,
                           tokens)
from tests.megatron_runs import events, torchrun

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_data_to_verified_exports(family, megatron_single, tmp_path):
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    hf_dir = make_hf_model(family, str(tmp_path / "hf"), seed=5,
                           name_or_path=f"example-org/tiny-{family}")
    make_tokenizer(hf_dir)
    data = make_chat_data(hf_dir, tmp_path / "data")
    base, run = tmp_path / "base", tmp_path / "run"
    convert(hf_dir, str(base), log=lambda s: None)
    torchrun(1, [f"@{REPO / 'examples' / 'cpu.args'}", f"@{base}/model.args",
                 "--pretrained-checkpoint", str(base), "--data-path", data,
                 "--split", "100,0,0", "--seq-length", str(SEQ), "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--train-iters", "6", "--lr", "2e-2",
                 "--lr-warmup-iters", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
                 "--eval-iters", "0", "--log-interval", "3", "--ckpt-format", "torch_dist",
                 "--save", str(run), "--save-interval", "6",
                 "--drlora-budget", "4", "--drlora-rank-init", "2", "--drlora-rank-max", "8",
                 "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2",
                 "--drlora-grow-buffer", "1"])
    assert [e["iteration"] for e in events(run)] == [2, 4]

    margs = verify.model_args_from_file(str(base / "model.args"), SEQ)
    chunks, _ = verify.build_megatron(margs, str(base), str(run))
    want = verify.megatron_logits(chunks, tokens(), VOCAB)
    assert verify.max_abs_diff(want, verify.hf_logits(hf_dir, tokens())) > 1e-3  # it trained
    quiet = dict(log=lambda s: None)
    export(str(run), hf_dir, "merged", str(tmp_path / "merged"), pretrained_checkpoint=str(base),
           **quiet)
    export(str(run), hf_dir, "peft", str(tmp_path / "peft"), pretrained_checkpoint=str(base),
           **quiet)
    merged = verify.hf_logits(str(tmp_path / "merged"), tokens())
    assert verify.max_abs_diff(merged, want) < TOL
    peft = verify.hf_logits(hf_dir, tokens(), adapter=str(tmp_path / "peft"))
    assert verify.max_abs_diff(peft, want) < TOL
    config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == f"example-org/tiny-{family}"
