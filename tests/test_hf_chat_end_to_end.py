"""From a Hugging Face model directory and a chat JSONL file to verified exports, per family.

For a tiny random model of every supported family, with a Hugging Face tokenizer that has a
chat template (built here, saved as save_pretrained does): tools/preprocess_data.py renders
the chat records with the template (loss on assistant tokens), the converter imports the model
(its model.args names the tokenizer), examples/pretrain_gpt.py fine-tunes it with DR-LoRA on
that data (growth events), and the merged and PEFT exports, loaded with transformers (+ peft),
give the Megatron model's logits (checked here; the exporter's own --verify is tested in
tests/test_hf_export.py)."""

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.dist_harness import REPO
from tests.hf_tiny import ALL_FAMILIES, SEQ, VOCAB, make_hf_model, make_tokenizer, tokens
from tests.megatron_runs import events, torchrun

pytestmark = pytest.mark.slow

TOL = 1e-4


def _chat_jsonl(path, n=48, seed=0, words=40):
    rng = random.Random(seed)
    say = lambda k: " ".join(f"w{rng.randrange(words)}" for _ in range(k))  # noqa: E731
    with open(path, "w") as fh:
        for _ in range(n):
            messages = [{"role": "system", "content": say(3)}]
            for _ in range(rng.randint(1, 2)):
                messages += [{"role": "user", "content": say(rng.randint(2, 5))},
                             {"role": "assistant", "content": say(rng.randint(2, 6))}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_chat_data_to_verified_exports(family, megatron_single, tmp_path):
    from megatron_drlora.hf import verify
    from megatron_drlora.hf.exporter import export
    from megatron_drlora.hf.importer import convert

    hf_dir = make_hf_model(family, str(tmp_path / "hf"), seed=5,
                           name_or_path=f"example-org/tiny-{family}")
    make_tokenizer(hf_dir)
    chat = _chat_jsonl(tmp_path / "chat.jsonl")
    prefix = tmp_path / "data" / "chat"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", chat,
                    "--output-prefix", str(prefix), "--append-eod",
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir],
                   check=True, capture_output=True, cwd=str(REPO), timeout=300)
    base, run = tmp_path / "base", tmp_path / "run"
    convert(hf_dir, str(base), log=lambda s: None)
    torchrun(1, [f"@{REPO / 'examples' / 'cpu.args'}", f"@{base}/model.args",
                 "--pretrained-checkpoint", str(base), "--data-path", f"{prefix}_text_document",
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
