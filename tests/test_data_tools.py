"""generate_corpus -> train_tokenizer -> preprocess_data, read back with Megatron's reader.

The tools run in-process through their main(argv) (fast); one test runs them as a user would,
`python tools/X.py` from the repo root.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy
import pytest

from megatron_drlora.data.synthetic import generate_mixed
from megatron_drlora.data.tokenizer import TokenizerError, file_sha256, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                  os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_corpus = load_tool("generate_corpus")
train_tokenizer = load_tool("train_tokenizer")
preprocess_data = load_tool("preprocess_data")


def indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Instruction and text corpora of 3 domains and a 256-piece tokenizer trained on both."""
    d = tmp_path_factory.mktemp("tools")
    assert generate_corpus.main(["--domains", "arithmetic,reverse,prose", "--num-per-domain",
                                 "60", "--seed", "5", "--out", str(d / "inst")]) == 0
    assert generate_corpus.main(["--domains", "arithmetic,reverse,prose", "--num-per-domain",
                                 "20", "--seed", "5", "--out", str(d / "text"),
                                 "--format", "text"]) == 0
    assert train_tokenizer.main(["--input", str(d / "inst" / "mixed.jsonl"),
                                 str(d / "text" / "mixed.jsonl"), "--vocab-size", "256",
                                 "--model-prefix", str(d / "tok")]) == 0
    return d


def preprocess(*args):
    return preprocess_data.main(["--tokenizer-type", "SentencePieceTokenizer", *args])


# ------------------------------------------------------------------ generate_corpus


def test_generate_corpus_files(workdir):
    inst = sorted(os.listdir(workdir / "inst"))
    assert inst == ["arithmetic.jsonl", "mixed.jsonl", "prose.jsonl", "reverse.jsonl"]
    lines = (workdir / "inst" / "mixed.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 180 and {r["domain"] for r in records[:20]} == {
        "arithmetic", "reverse", "prose"}, "mixed.jsonl is shuffled"
    assert records == generate_mixed(["arithmetic", "reverse", "prose"], 60, seed=5)
    assert all("text" in json.loads(x) for x in
               (workdir / "text" / "prose.jsonl").read_text().splitlines())


def test_generate_corpus_is_deterministic(tmp_path, workdir):
    assert generate_corpus.main(["--domains", "arithmetic,reverse,prose", "--num-per-domain",
                                 "60", "--seed", "5", "--out", str(tmp_path)]) == 0
    for name in ("mixed.jsonl", "prose.jsonl"):
        assert (tmp_path / name).read_bytes() == (workdir / "inst" / name).read_bytes()


def test_generate_corpus_errors(tmp_path, capsys):
    assert generate_corpus.main(["--domains", "arithmetic,poetry", "--num-per-domain", "3",
                                 "--out", str(tmp_path)]) == 1
    assert "--domains: unknown domain(s) poetry" in capsys.readouterr().err
    assert generate_corpus.main(["--num-per-domain", "0", "--out", str(tmp_path)]) == 1
    assert "--num-per-domain must be > 0" in capsys.readouterr().err


# ------------------------------------------------------------------ train_tokenizer


def test_tokenizer_settings(workdir):
    tok = load_tokenizer(str(workdir / "tok.model"))
    assert tok.vocab_size == 256
    assert (tok.unk, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 2)
    assert tok._sp.pad_id() == -1, "no pad piece"
    assert len((workdir / "tok.vocab").read_text().splitlines()) == 256
    # digits are split, and every corpus string round-trips
    assert [tok.id_to_piece(i) for i in tok.tokenize("12+35=")][-6:] == [
        "1", "2", "+", "3", "5", "="]
    for line in (workdir / "inst" / "mixed.jsonl").read_text().splitlines():
        r = json.loads(line)
        for s in (r["prompt"], r["response"]):
            assert tok.detokenize(tok.tokenize(s)) == s
            assert tok.unk not in tok.tokenize(s)


def test_tokenizer_training_is_deterministic(workdir, tmp_path):
    args = ["--input", str(workdir / "inst" / "mixed.jsonl"), str(workdir / "text" / "mixed.jsonl"),
            "--vocab-size", "256", "--model-prefix", str(tmp_path / "again")]
    assert train_tokenizer.main(args) == 0
    # the model embeds no paths, so even another prefix gives identical bytes
    assert (tmp_path / "again.model").read_bytes() == (workdir / "tok.model").read_bytes()


def test_tokenizer_unigram(workdir, tmp_path):
    assert train_tokenizer.main(["--input", str(workdir / "inst" / "mixed.jsonl"),
                                 "--vocab-size", "64", "--model-type", "unigram",
                                 "--model-prefix", str(tmp_path / "uni")]) == 0
    assert load_tokenizer(str(tmp_path / "uni.model")).vocab_size == 64


def test_tokenizer_errors(workdir, tmp_path, capsys):
    prefix = str(tmp_path / "t")
    assert train_tokenizer.main(["--input", str(tmp_path / "nope.jsonl"),
                                 "--model-prefix", prefix]) == 1
    assert "--input file not found" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert train_tokenizer.main(["--input", str(tmp_path / "empty.jsonl"),
                                 "--model-prefix", prefix]) == 1
    assert "empty input" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{"body": "c"}\n')
    assert train_tokenizer.main(["--input", str(tmp_path / "bad.jsonl"),
                                 "--model-prefix", prefix]) == 1
    assert f"{tmp_path / 'bad.jsonl'}:2: none of the --json-keys" in capsys.readouterr().err
    (tmp_path / "badjson.jsonl").write_text('{"text": "a b"}\n{"text": \n')
    assert train_tokenizer.main(["--input", str(tmp_path / "badjson.jsonl"),
                                 "--model-prefix", prefix]) == 1
    assert f"{tmp_path / 'badjson.jsonl'}:2: invalid JSON" in capsys.readouterr().err
    assert train_tokenizer.main(["--input", str(workdir / "inst" / "mixed.jsonl"),
                                 "--vocab-size", "100000", "--model-prefix", prefix]) == 1
    assert "--vocab-size 100000 does not fit" in capsys.readouterr().err
    assert not os.path.exists(prefix + ".model")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found.*train_tokenizer"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))


# ------------------------------------------------------------------ preprocess_data


def test_preprocess_instruction_with_loss_mask(workdir):
    out = str(workdir / "out" / "inst")
    assert preprocess("--input", str(workdir / "inst" / "mixed.jsonl"), "--output-prefix", out,
                      "--tokenizer-model", str(workdir / "tok.model"), "--append-eod",
                      "--workers", "4") == 0
    tok = load_tokenizer(str(workdir / "tok.model"))
    records = [json.loads(x) for x in (workdir / "inst" / "mixed.jsonl").read_text().splitlines()]
    tokens, mask = indexed(out + "_text_document"), indexed(out + "_text_document_lossmask")
    assert len(tokens) == len(mask) == len(records)
    assert numpy.array_equal(tokens.sequence_lengths, mask.sequence_lengths)
    assert numpy.array_equal(tokens.document_indices, mask.document_indices)
    assert tokens.index.dtype == numpy.uint16 and mask.index.dtype == numpy.uint8
    for i, r in enumerate(records):
        prompt, response = tok.tokenize(r["prompt"]), tok.tokenize(r["response"])
        assert tokens[i].tolist() == prompt + response + [tok.eod]
        assert mask[i].tolist() == [0] * len(prompt) + [1] * (len(response) + 1)
    meta = json.loads((workdir / "out" / "inst_text_document.meta.json").read_text())
    assert meta["tokenizer_sha256"] == file_sha256(str(workdir / "tok.model"))
    assert meta["tokenizer_model"] == str(workdir / "tok.model")
    assert (meta["vocab_size"], meta["eod"], meta["has_loss_mask"]) == (256, 2, True)
    assert meta["num_documents"] == len(records)
    assert meta["num_tokens"] == int(tokens.sequence_lengths.sum())
    assert not [f for f in os.listdir(workdir / "out") if ".tmp" in f]


def test_preprocess_text_is_megatron_format(workdir):
    out = str(workdir / "out" / "text")
    assert preprocess("--input", str(workdir / "text" / "mixed.jsonl"), "--output-prefix", out,
                      "--tokenizer-model", str(workdir / "tok.model"), "--append-eod") == 0
    tok = load_tokenizer(str(workdir / "tok.model"))
    texts = [json.loads(x)["text"] for x in
             (workdir / "text" / "mixed.jsonl").read_text().splitlines()]
    ds = indexed(out + "_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [2] for t in texts]
    assert not os.path.exists(out + "_text_document_lossmask.bin")
    meta = json.loads(open(out + "_text_document.meta.json").read())
    assert meta["has_loss_mask"] is False and meta["json_keys"] == ["text"]


def test_preprocess_removes_stale_loss_mask(workdir, tmp_path):
    out = str(tmp_path / "p")
    common = ["--output-prefix", out, "--tokenizer-model", str(workdir / "tok.model"),
              "--append-eod"]
    assert preprocess("--input", str(workdir / "inst" / "prose.jsonl"), *common) == 0
    assert os.path.exists(out + "_text_document_lossmask.idx")
    assert preprocess("--input", str(workdir / "text" / "prose.jsonl"), *common) == 0
    assert not os.path.exists(out + "_text_document_lossmask.idx")
    assert not os.path.exists(out + "_text_document_lossmask.bin")


def test_preprocess_explicit_keys(workdir, tmp_path, capsys):
    inst = str(workdir / "inst" / "reverse.jsonl")
    common = ["--tokenizer-model", str(workdir / "tok.model"), "--append-eod"]
    # explicit prompt/response == auto-detection
    assert preprocess("--input", inst, "--output-prefix", str(tmp_path / "a"),
                      "--json-keys", "prompt", "response", *common) == 0
    assert os.path.exists(tmp_path / "a_text_document_lossmask.bin")
    # one dataset per key, Megatron-LM style
    assert preprocess("--input", inst, "--output-prefix", str(tmp_path / "b"),
                      "--json-keys", "domain", *common) == 0
    assert len(indexed(str(tmp_path / "b_domain_document"))) == 60
    assert preprocess("--input", inst, "--output-prefix", str(tmp_path / "c"),
                      "--json-keys", "prompt", *common) == 1
    assert "'prompt' and 'response' go together" in capsys.readouterr().err


def _expect_error(capsys, tmp_path, expected, *args):
    out = tmp_path / "err"
    assert preprocess("--output-prefix", str(out), *args) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert not list(tmp_path.glob("err*")), "nothing written on error"


def test_preprocess_errors(workdir, tmp_path, capsys):
    tok = str(workdir / "tok.model")
    _expect_error(capsys, tmp_path, f"--input file not found: {tmp_path / 'nope.jsonl'}",
                  "--input", str(tmp_path / "nope.jsonl"), "--tokenizer-model", tok)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "calc 1+2= 3"}\n{"text": "calc 2+2= 4"}\n{"text": "x"\n')
    _expect_error(capsys, tmp_path, f"{bad}:3: invalid JSON",
                  "--input", str(bad), "--tokenizer-model", tok, "--append-eod")

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "calc 1+2=", "response": "3"}\n'
                       '{"prompt": "calc 2+2="}\n')
    _expect_error(capsys, tmp_path, f"{missing}:2: missing field 'response'",
                  "--input", str(missing), "--tokenizer-model", tok, "--append-eod")
    _expect_error(capsys, tmp_path, f"{missing}:1: missing field 'text'",
                  "--input", str(missing), "--tokenizer-model", tok, "--json-keys", "text")

    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": 5}\n')
    _expect_error(capsys, tmp_path, f"{typed}:1: field 'text' must be a string",
                  "--input", str(typed), "--tokenizer-model", tok)

    good = str(workdir / "text" / "prose.jsonl")
    _expect_error(capsys, tmp_path, "tokenizer model not found",
                  "--input", good, "--tokenizer-model", str(tmp_path / "none.model"))
    _expect_error(capsys, tmp_path, "--tokenizer-type GPT2BPETokenizer is not supported",
                  "--input", good, "--tokenizer-model", tok,
                  "--tokenizer-type", "GPT2BPETokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _expect_error(capsys, tmp_path, "is empty", "--input", str(empty), "--tokenizer-model", tok)


def test_tools_run_as_scripts_from_repo_root(workdir, tmp_path):
    """What a user types; the CLI must not need PYTHONPATH or an installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "tools/generate_corpus.py", "--domains", "units",
                    "--num-per-domain", "5", "--out", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=60)
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "units.jsonl"),
         "--output-prefix", str(tmp_path / "u"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(workdir / "tok.model"), "--append-eod"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "5 documents" in proc.stdout
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                           str(tmp_path / "units.jsonl"), "--output-prefix", "x",
                           "--tokenizer-model", "missing.model"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: tokenizer model not found")
