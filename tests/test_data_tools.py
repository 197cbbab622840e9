"""generate_corpus -> train_tokenizer -> preprocess_data, read back with Megatron's reader.

The tools run in-process through their main(argv) (fast); one test runs them as a user would,
`python tools/X.py` from the repo root. preprocess_data's output is checked against the
tokenizer libraries themselves (sentencepiece, tokenizers), not against Megatron's wrappers.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy
import pytest

from megatron_drlora.data.synthetic import generate_mixed
from megatron_drlora.data.tokenizer import (
    TokenizerError,
    build_megatron_tokenizer,
    file_sha256,
    load_tokenizer,
    megatron_tokenizer_args,
)

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


def documents(prefix):
    ds = indexed(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def read_jsonl(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def sp_ids(model):
    """Independent tokenization: the sentencepiece library itself."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return lambda text: list(sp.encode(text))


def build_hf_tokenizer(directory, texts, bos=True):
    """A byte-level BPE Hugging Face tokenizer directory, built locally and saved like
    save_pretrained (tokenizer.json + tokenizer_config.json); with `bos`, every text starts
    with <s> (a TemplateProcessing post-processor, as Llama-style tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    return str(directory)


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
    texts = [v for name in ("inst", "text") for r in read_jsonl(d / name / "mixed.jsonl")
             for k, v in r.items() if k in ("prompt", "response", "text")]
    build_hf_tokenizer(d / "hf", texts)
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
                      "--workers", "2") == 0
    ids = sp_ids(workdir / "tok.model")
    records = read_jsonl(workdir / "inst" / "mixed.jsonl")
    tokens, mask = indexed(out + "_text_document"), indexed(out + "_text_document_lossmask")
    assert len(tokens) == len(mask) == len(records)
    assert numpy.array_equal(tokens.sequence_lengths, mask.sequence_lengths)
    assert numpy.array_equal(tokens.document_indices, mask.document_indices)
    assert tokens.index.dtype == numpy.uint16 and mask.index.dtype == numpy.uint8
    for i, r in enumerate(records):
        prompt, response = ids(r["prompt"]), ids(r["response"])
        assert tokens[i].tolist() == prompt + response + [2]
        assert mask[i].tolist() == [0] * len(prompt) + [1] * (len(response) + 1)
    meta = json.loads((workdir / "out" / "inst_text_document.meta.json").read_text())
    assert meta["tokenizer_sha256"] == file_sha256(str(workdir / "tok.model"))
    assert meta["tokenizer_model"] == str(workdir / "tok.model")
    assert (meta["vocab_size"], meta["eod"], meta["has_loss_mask"]) == (256, 2, True)
    assert meta["tokenizer_type"] == "SentencePieceTokenizer"
    assert meta["num_loss_tokens"] == int(sum(mask[i].sum() for i in range(len(mask))))
    assert meta["num_documents"] == len(records)
    assert meta["num_tokens"] == int(tokens.sequence_lengths.sum())
    assert not [f for f in os.listdir(workdir / "out") if ".tmp" in f]


def test_preprocess_text_is_megatron_format(workdir):
    out = str(workdir / "out" / "text")
    assert preprocess("--input", str(workdir / "text" / "mixed.jsonl"), "--output-prefix", out,
                      "--tokenizer-model", str(workdir / "tok.model"), "--append-eod") == 0
    ids = sp_ids(workdir / "tok.model")
    texts = [r["text"] for r in read_jsonl(workdir / "text" / "mixed.jsonl")]
    assert documents(out + "_text_document") == [ids(t) + [2] for t in texts]
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


def test_preprocess_sentencepiece_types_agree(workdir, tmp_path):
    """Megatron builds all three SentencePiece types alike; ids are the library's own, and
    match this package's wrapper (which build_gpt_datasets and the tests use)."""
    ids = sp_ids(workdir / "tok.model")
    src = workdir / "text" / "prose.jsonl"
    texts = [r["text"] for r in read_jsonl(src)]
    for kind in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        out = str(tmp_path / kind)
        assert preprocess_data.main(["--input", str(src), "--output-prefix", out,
                                     "--tokenizer-type", kind, "--tokenizer-model",
                                     str(workdir / "tok.model"), "--append-eod"]) == 0
        assert documents(out + "_text_document") == [ids(t) + [2] for t in texts]
        assert json.loads(open(out + "_text_document.meta.json").read())[
            "tokenizer_type"] == kind
    megatron_tok = build_megatron_tokenizer(megatron_tokenizer_args(
        "SentencePieceTokenizer", str(workdir / "tok.model")))
    wrapper = load_tokenizer(str(workdir / "tok.model"))
    assert (megatron_tok.vocab_size, megatron_tok.eod) == (wrapper.vocab_size, wrapper.eod)
    assert all(list(megatron_tok.tokenize(t)) == wrapper.tokenize(t) for t in texts)


_PID_LOG = None


def _recording_worker(chunk):
    """encode_chunk_in_worker, noting which process ran it (slow enough that both workers
    take chunks)."""
    import time

    from megatron_drlora.data.tokenizer import encode_chunk_in_worker

    with open(_PID_LOG, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.02)
    return encode_chunk_in_worker(chunk)


def test_preprocess_workers_are_parallel_and_byte_identical(workdir, tmp_path, monkeypatch,
                                                            capsys):
    global _PID_LOG
    monkeypatch.setattr(preprocess_data, "CHUNK_LINES", 16)
    outputs = {}
    for workers in ("1", "2"):
        for name in ("inst", "text"):
            out = tmp_path / workers / name
            if workers == "2":
                _PID_LOG = str(tmp_path / f"pids_{name}")
                monkeypatch.setattr(preprocess_data, "encode_chunk_in_worker",
                                    _recording_worker)
            assert preprocess("--input", str(workdir / name / "mixed.jsonl"), "--output-prefix",
                              str(out), "--tokenizer-model", str(workdir / "tok.model"),
                              "--append-eod", "--workers", workers, "--log-interval", "50") == 0
            err = capsys.readouterr().err
            assert "processed 50 documents" in err and "docs/s" in err, err
        outputs[workers] = {f: (tmp_path / workers / f).read_bytes()
                            for f in sorted(os.listdir(tmp_path / workers))}
    assert len(outputs["1"]) == 2 * 3 + 2, "text: bin/idx/meta; inst: also the loss mask"
    assert outputs["1"] == outputs["2"]
    for name in ("inst", "text"):
        pids = set(open(tmp_path / f"pids_{name}").read().split())
        assert len(pids) == 2 and str(os.getpid()) not in pids, pids


def test_preprocess_worker_errors_name_file_and_line(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preprocess_data, "CHUNK_LINES", 8)
    lines = (workdir / "text" / "mixed.jsonl").read_text().splitlines()  # 60 records
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:40] + ['{"text": "x"'] + lines[40:]) + "\n")
    _expect_error(capsys, tmp_path, f"{bad}:41: invalid JSON", "--input", str(bad),
                  "--tokenizer-model", str(workdir / "tok.model"), "--workers", "2")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    _expect_error(capsys, tmp_path, f"{bad}:2: not UTF-8", "--input", str(bad),
                  "--tokenizer-model", str(workdir / "tok.model"), "--workers", "2")


def test_preprocess_huggingface_tokenizer(workdir, tmp_path):
    from tokenizers import Tokenizer

    from megatron_drlora.data.dataset import TokenizerMismatchError, check_tokenizer_matches

    hf = str(workdir / "hf")
    lib = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
    bos, eos = lib.token_to_id("<s>"), lib.token_to_id("</s>")
    common = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf,
              "--append-eod", "--workers", "2"]
    text = str(tmp_path / "text")
    assert preprocess_data.main(["--input", str(workdir / "text" / "mixed.jsonl"),
                                 "--output-prefix", text, *common]) == 0
    texts = [r["text"] for r in read_jsonl(workdir / "text" / "mixed.jsonl")]
    assert documents(text + "_text_document") == [lib.encode(t).ids + [eos] for t in texts]
    assert all(lib.encode(t).ids[0] == bos for t in texts), "the post-processor adds bos"

    inst = str(tmp_path / "inst")
    assert preprocess_data.main(["--input", str(workdir / "inst" / "prose.jsonl"),
                                 "--output-prefix", inst, *common]) == 0
    records = read_jsonl(workdir / "inst" / "prose.jsonl")
    tokens, mask = documents(inst + "_text_document"), documents(
        inst + "_text_document_lossmask")
    for r, doc, m in zip(records, tokens, mask, strict=True):
        prompt = lib.encode(r["prompt"]).ids
        response = lib.encode(r["response"], add_special_tokens=False).ids
        assert doc == prompt + response + [eos], "bos starts the prompt only"
        assert m == [0] * len(prompt) + [1] * (len(response) + 1)

    meta = json.loads(open(text + "_text_document.meta.json").read())
    assert meta["tokenizer_type"] == "HuggingFaceTokenizer"
    assert meta["tokenizer_model"] == hf
    assert meta["tokenizer_sha256"] == file_sha256(os.path.join(hf, "tokenizer.json"))
    assert (meta["vocab_size"], meta["eod"]) == (lib.get_vocab_size(), eos)

    training = build_megatron_tokenizer(megatron_tokenizer_args("HuggingFaceTokenizer", hf))
    check_tokenizer_matches(text + "_text_document", training)
    # same vocabulary, another tokenizer.json (no bos): the sha256 tells them apart
    other = build_hf_tokenizer(tmp_path / "other", texts, bos=False)
    with pytest.raises(TokenizerMismatchError, match="sha256"):
        check_tokenizer_matches(text + "_text_document", build_megatron_tokenizer(
            megatron_tokenizer_args("HuggingFaceTokenizer", other)))


def test_preprocess_null_tokenizer(tmp_path, capsys):
    """Pre-tokenized input: a JSON list of ids per record (or Megatron-LM's "1 2 3" string)."""
    from megatron_drlora.data.dataset import TokenizerMismatchError, check_tokenizer_matches

    rows = [[5, 17, 3], [0], "7 8 9", [1, 2] * 30]
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    out = str(tmp_path / "ids")
    common = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--append-eod"]
    assert preprocess_data.main(["--input", str(src), "--output-prefix", out, *common]) == 0
    expected = [r if isinstance(r, list) else [int(x) for x in r.split()] for r in rows]
    assert documents(out + "_text_document") == [r + [49] for r in expected]
    meta = json.loads(open(out + "_text_document.meta.json").read())
    assert (meta["tokenizer_type"], meta["tokenizer_model"], meta["tokenizer_sha256"],
            meta["vocab_size"], meta["eod"]) == ("NullTokenizer", None, None, 50, 49)
    null = build_megatron_tokenizer(megatron_tokenizer_args("NullTokenizer", vocab_size=50))
    check_tokenizer_matches(out + "_text_document", null)
    with pytest.raises(TokenizerMismatchError, match="vocab size 50"):
        check_tokenizer_matches(out + "_text_document", build_megatron_tokenizer(
            megatron_tokenizer_args("NullTokenizer", vocab_size=60)))

    assert preprocess_data.main(["--input", str(src), "--output-prefix", out, *common,
                                 "--null-tokenizer-eod-id", "0"]) == 0
    assert documents(out + "_text_document")[0] == [5, 17, 3, 0]

    inst = tmp_path / "inst.jsonl"
    inst.write_text(json.dumps({"prompt": [4, 4], "response": [9]}) + "\n")
    assert preprocess_data.main(["--input", str(inst), "--output-prefix", out, *common]) == 0
    assert documents(out + "_text_document") == [[4, 4, 9, 49]]
    assert documents(out + "_text_document_lossmask") == [[0, 0, 1, 1]]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": [1, 2]}\n{"text": [3, 50]}\n')
    _expect_error(capsys, tmp_path, f"{bad}:2: field 'text': token id 50 outside [0, 50)",
                  "--input", str(bad), *common)
    bad.write_text('{"text": "hello"}\n')
    _expect_error(capsys, tmp_path, f"{bad}:1: field 'text' must be a list of token ids",
                  "--input", str(bad), *common)
    _expect_error(capsys, tmp_path, "NullTokenizer needs --vocab-size", "--input", str(src),
                  "--tokenizer-type", "NullTokenizer")


@pytest.mark.slow
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
