"""GPT datasets on CPU in one process: loss mask on response tokens only, blends, tokenizer
checks, batches.

The instruction corpus here has prompts without digits (prose) and responses made only of
digits, so "this label is a response token" can be checked from the token itself, without
re-deriving the dataset's document layout.
"""

import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy
import pytest
import torch

from megatron_drlora.data.dataset import (
    DataConfigError,
    PretrainingBatchSampler,
    TokenizerMismatchError,
    blend_cache_needs_process_group,
    build_data_iterator,
    build_gpt_datasets,
    check_tokenizer_matches,
    ensure_dataset_helpers,
    get_batch,
    parse_data_path,
    train_valid_test_num_samples,
)
from megatron_drlora.data.synthetic import generate, write_jsonl
from megatron_drlora.data.tokenizer import (
    build_megatron_tokenizer,
    load_tokenizer,
    megatron_tokenizer_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


from tests.test_data_tools import load_tool  # noqa: E402

train_tokenizer = load_tool("train_tokenizer")
preprocess_data = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset")
    rng = random.Random(0)
    inst = [{"prompt": r["prompt"], "response": str(rng.randint(0, 999))}
            for r in generate("prose", 200, seed=1)]
    write_jsonl(str(d / "inst.jsonl"), inst)
    write_jsonl(str(d / "text.jsonl"), generate("prose", 100, seed=2, fmt="text"))
    assert train_tokenizer.main(["--input", str(d / "inst.jsonl"), str(d / "text.jsonl"),
                                 "--vocab-size", "96", "--model-prefix", str(d / "tok")]) == 0
    for name in ("inst", "text"):
        assert preprocess_data.main(["--input", str(d / f"{name}.jsonl"), "--output-prefix",
                                     str(d / name), "--tokenizer-model", str(d / "tok.model"),
                                     "--append-eod"]) == 0
    tok = load_tokenizer(str(d / "tok.model"))
    return {"dir": d, "tok": tok, "inst": str(d / "inst_text_document"),
            "text": str(d / "text_text_document")}


def build(data, path=None, split="90,10,0", sizes=(60, 10, 0), seed=1234, **kw):
    kw.setdefault("data_cache_path", str(data["dir"] / "cache"))
    return build_gpt_datasets(path or [data["inst"]], split, SEQ, seed, data["tok"], sizes, **kw)


def label_kinds(tok):
    """id -> "response" (digits, eod), "prompt" (letter pieces) or "either" (the bare
    word-boundary piece, which starts a response and can also start a prompt word)."""
    kinds = {}
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if i == tok.eod or piece.lstrip("\u2581").isdigit():
            kinds[i] = "response"
        elif piece == "\u2581":
            kinds[i] = "either"
        else:
            kinds[i] = "prompt"
    return kinds


def check_response_only(tok, sample):
    """loss 1 on every response label, 0 on every prompt label; returns the counts."""
    kinds = label_kinds(tok)
    counts = {"prompt": 0, "response": 0, "either": 0}
    text = tok.detokenize(sample["labels"].tolist())
    for label, m in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()):
        kind = kinds[label]
        counts[kind] += 1
        if kind != "either":
            assert m == (1.0 if kind == "response" else 0.0), (kind, text)
    return counts


def test_helpers_are_prebuilt():
    ensure_dataset_helpers()  # megatron-core 0.16.1 wheels ship helpers_cpp: no compile step


def test_builds_on_cpu(data):
    train, valid, test = build(data)
    assert test is None, "a 0 share gives no dataset"
    assert len(train) >= 60 and len(valid) >= 1
    sample = train[0]
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert sample["attention_mask"].shape == (1, SEQ, SEQ)
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_loss_only_on_response_tokens(data):
    train, valid, _ = build(data)
    seen = {"prompt": 0, "response": 0, "either": 0}
    for ds in (train, valid):
        for i in range(len(ds)):
            for kind, n in check_response_only(data["tok"], ds[i]).items():
                seen[kind] += n
    assert seen["prompt"] > seen["response"] > 0


def test_mask_gathered_through_the_same_indices_as_tokens(data):
    train, valid, _ = build(data)
    for ds in (train, valid):
        for i in range(len(ds)):
            # megatron-core 0.16 returns (text, document ids), 0.19 adds document lengths
            text = ds._query_document_sample_shuffle_indices(i)[0]
            gathered = ds.gather(ds.dataset, i)
            real = gathered != -1  # gather pads with -1, GPTDataset with its pad id
            assert numpy.array_equal(gathered[real], text[real])
            assert (text[~real] == ds._pad_token_id).all()


def test_same_samples_with_megatrons_tokenizer(data, tmp_path):
    """Training passes Megatron's own tokenizer object; samples and loss masks are the same."""
    tok = build_megatron_tokenizer(megatron_tokenizer_args(
        "SentencePieceTokenizer", str(data["dir"] / "tok.model")))
    ours, _, _ = build(data, sizes=(20, 4, 0))
    theirs, _, _ = build_gpt_datasets([data["inst"]], "90,10,0", SEQ, 1234, tok, (20, 4, 0),
                                      data_cache_path=str(tmp_path))
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(ours[i][key], theirs[i][key]), key


def test_eod_semantics(data):
    tok = data["tok"]
    train, _, _ = build(data, eod_mask_loss=True)
    eod_labels = 0
    for i in range(len(train)):
        s = train[i]
        assert (s["loss_mask"][s["tokens"] == tok.eod] == 0).all(), "Megatron eod masking kept"
        at_eod = s["labels"] == tok.eod
        assert (s["loss_mask"][at_eod] == 1).all(), "the model learns to stop"
        eod_labels += int(at_eod.sum())
    assert eod_labels > 0


def test_text_prefix_keeps_full_loss(data):
    train, _, _ = build(data, path=[data["text"]])
    assert train.loss_mask_dataset is None
    for i in range(len(train)):
        assert (train[i]["loss_mask"] == 1).all()


def test_weighted_blend(data):
    train, valid, test = build(data, path=["0.5", data["inst"], "0.5", data["text"]],
                               sizes=(40, 8, 0), data_cache_path=None)
    assert len(train) == 40 and test is None
    ids = set()
    for i in range(len(train)):
        s = train[i]
        ids.add(int(s["dataset_id"]))
        if s["dataset_id"] == 1:  # the text prefix
            assert (s["loss_mask"] == 1).all()
        else:
            check_response_only(data["tok"], s)
    assert ids == {0, 1}


@pytest.mark.slow
def test_blend_with_cache_path_without_torch_distributed(data, tmp_path):
    """megatron-core's BlendedDataset calls get_rank() when caching; must work without dist."""
    code = (
        "import torch, sys\n"
        "from megatron_drlora.data.dataset import build_gpt_datasets\n"
        "from megatron_drlora.data.tokenizer import load_tokenizer\n"
        "assert not torch.distributed.is_initialized()\n"
        f"tok = load_tokenizer({str(data['dir'] / 'tok.model')!r})\n"
        f"tr, va, te = build_gpt_datasets(['1', {data['inst']!r}, '2', {data['text']!r}],"
        f" '90,10,0', 16, 1, tok, [30, 6, 0], data_cache_path={str(tmp_path)!r})\n"
        "print(len(tr), len(va))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["30", "6"]
    if not blend_cache_needs_process_group():  # megatron-core 0.19: the cache path is used
        cached = os.listdir(tmp_path)
        assert any("BlendedDataset" in f for f in cached), cached
        assert any("LossMaskedGPTDataset" in f for f in cached), cached


def test_seeded(data, tmp_path):
    a, _, _ = build(data, seed=1, data_cache_path=str(tmp_path / "a"))
    b, _, _ = build(data, seed=1, data_cache_path=str(tmp_path / "b"))
    c, _, _ = build(data, seed=2, data_cache_path=str(tmp_path / "c"))
    first = [a[i]["tokens"] for i in range(5)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))


def test_pickles_for_dataloader_workers(data):
    train, _, _ = build(data)
    clone = pickle.loads(pickle.dumps(train))
    for key, value in train[3].items():
        assert torch.equal(clone[3][key], value)


# ------------------------------------------------------------------ tokenizer checks


def test_tokenizer_mismatch(data, tmp_path):
    d = data["dir"]
    check_tokenizer_matches(data["inst"], data["tok"])  # the right one passes

    assert train_tokenizer.main(["--input", str(d / "inst.jsonl"), "--vocab-size", "80",
                                 "--model-prefix", str(tmp_path / "small")]) == 0
    small = load_tokenizer(str(tmp_path / "small.model"))
    with pytest.raises(TokenizerMismatchError, match="vocab size 96.*has 80"):
        check_tokenizer_matches(data["inst"], small)
    with pytest.raises(TokenizerMismatchError, match="vocab size"):
        build_gpt_datasets([data["inst"]], "90,10,0", SEQ, 1, small, [10, 2, 0])

    # same vocab size, other corpus: caught by the sha256 in the meta file
    write_jsonl(str(tmp_path / "units.jsonl"), generate("units", 50, seed=0, fmt="text"))
    assert train_tokenizer.main(["--input", str(tmp_path / "units.jsonl"), str(d / "inst.jsonl"),
                                 "--vocab-size", "96", "--model-prefix",
                                 str(tmp_path / "other")]) == 0
    other = load_tokenizer(str(tmp_path / "other.model"))
    assert other.vocab_size == data["tok"].vocab_size
    with pytest.raises(TokenizerMismatchError, match="sha256"):
        check_tokenizer_matches(data["inst"], other)

    # what training hands over: Megatron's own tokenizer, bare or through setup's adapter
    from types import SimpleNamespace

    from megatron_drlora.megatron_lm.setup import _TokenizerIdentity

    def megatron(kind, model=None, vocab_size=None, **overrides):
        args = megatron_tokenizer_args(kind, model, vocab_size, **overrides)
        return build_megatron_tokenizer(args), args

    for tok, args in (megatron("SentencePieceTokenizer", str(d / "tok.model")),
                      megatron("Llama2Tokenizer", str(d / "tok.model"))):
        check_tokenizer_matches(data["inst"], tok)
        check_tokenizer_matches(data["inst"], _TokenizerIdentity(tok, args))
    tok, args = megatron("SentencePieceTokenizer", str(tmp_path / "other.model"))
    with pytest.raises(TokenizerMismatchError, match="sha256"):
        check_tokenizer_matches(data["inst"], _TokenizerIdentity(tok, args))
    # NullTokenizer (ids only, e.g. with a converted base): data of any tokenizer whose ids
    # fit; its eod (95 here, the data's is 2) matters only where the run uses the eod
    tok, args = megatron("NullTokenizer", vocab_size=96)
    check_tokenizer_matches(data["inst"], _TokenizerIdentity(tok, args))
    check_tokenizer_matches(data["inst"], megatron("NullTokenizer", vocab_size=200,
                                                   null_tokenizer_eod_id=2)[0])
    with pytest.raises(TokenizerMismatchError, match="eod is 95.*--null-tokenizer-eod-id 2"):
        check_tokenizer_matches(data["inst"], tok)  # a bare tokenizer: the eod counts
    args.eod_mask_loss = True
    with pytest.raises(TokenizerMismatchError, match="eod is 95.*--null-tokenizer-eod-id 2"):
        check_tokenizer_matches(data["inst"], _TokenizerIdentity(tok, args))
    args.null_tokenizer_eod_id = 2
    check_tokenizer_matches(data["inst"], _TokenizerIdentity(
        megatron("NullTokenizer", vocab_size=96, null_tokenizer_eod_id=2)[0], args))
    with pytest.raises(TokenizerMismatchError, match="vocab size 96 .*more than --vocab-size 90"):
        check_tokenizer_matches(data["inst"], megatron("NullTokenizer", vocab_size=90)[0])
    # no tokenizer object (the documented NullTokenizer crash): the flags say what it is
    args = megatron_tokenizer_args("NullTokenizer", vocab_size=96)
    check_tokenizer_matches(data["inst"], _TokenizerIdentity(None, args))
    with pytest.raises(TokenizerMismatchError, match="no training tokenizer"):
        check_tokenizer_matches(data["inst"], _TokenizerIdentity(
            None, megatron_tokenizer_args("SentencePieceTokenizer", str(d / "tok.model"))))
    no_eod = SimpleNamespace(vocab_size=96, eod=None, model_path=None)
    with pytest.raises(TokenizerMismatchError, match="eod is None"):
        check_tokenizer_matches(data["inst"], no_eod)

    # data without a meta file (e.g. made by Megatron-LM): the id range check still works
    bare = str(tmp_path / "bare_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(data["text"] + ext, bare + ext)
    check_tokenizer_matches(bare, data["tok"])
    with pytest.raises(TokenizerMismatchError, match=r"token id \d+ >= vocab size 80"):
        check_tokenizer_matches(bare, small)


# ------------------------------------------------------------------ configuration errors


def test_parse_data_path():
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    for bad in (["0.3", "a", "b"], ["a", "0.3"], [], ["0", "a"]):
        with pytest.raises(DataConfigError, match="--data-path"):
            parse_data_path(bad)


def test_missing_prefix_and_bad_split(data, tmp_path):
    with pytest.raises(DataConfigError, match="Did you mean .*inst_text_document"):
        build(data, path=[str(data["dir"] / "inst")])
    with pytest.raises(DataConfigError, match="--split"):
        build(data, split="ninety,ten")
    # 3 documents: a 1% valid share gets none of them
    write_jsonl(str(tmp_path / "few.jsonl"), generate("prose", 3, seed=0, fmt="text"))
    assert preprocess_data.main(["--input", str(tmp_path / "few.jsonl"), "--output-prefix",
                                 str(tmp_path / "few"), "--tokenizer-model",
                                 str(data["dir"] / "tok.model"), "--append-eod"]) == 0
    with pytest.raises(DataConfigError, match="valid split 0 of the 3 documents"):
        build(data, path=[str(tmp_path / "few_text_document")], split="99,1,0")


def test_loss_mask_meta_disagreement(data, tmp_path):
    prefix = str(tmp_path / "x_text_document")
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(data["inst"] + ext, prefix + ext)
    with pytest.raises(DataConfigError, match="has_loss_mask=True but .*_lossmask.bin/.idx is "
                                              "missing"):
        build(data, path=[prefix])


def test_num_samples_like_megatron():
    assert train_valid_test_num_samples(100, 8, 50, 5) == [800, 120, 40]


# ------------------------------------------------------------------ batches


def test_get_batch(data):
    train, _, _ = build(data)
    it = build_data_iterator(train, micro_batch_size=4)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(it, device="cpu")
    assert tokens.shape == labels.shape == loss_mask.shape == position_ids.shape == (4, SEQ)
    assert attention_mask.shape == (4, 1, SEQ, SEQ) and attention_mask.dtype == torch.bool
    assert torch.equal(tokens[1], train[1]["tokens"]), "dataset order, as Megatron reads it"
    assert get_batch(None) == (None,) * 5

    flat, _, _ = build(data, create_attention_mask=False)
    assert get_batch(build_data_iterator(flat, 2))[3] is None


def test_pretraining_sampler_data_parallel_and_resume():
    r0 = list(PretrainingBatchSampler(20, 2, 0, 2))
    r1 = list(PretrainingBatchSampler(20, 2, 1, 2))
    assert r0[:2] == [[0, 1], [4, 5]] and r1[:2] == [[2, 3], [6, 7]]
    assert len(r0) == 5
    assert list(PretrainingBatchSampler(20, 2, 0, 2, consumed_samples=8))[0] == [8, 9]
    cyclic = iter(PretrainingBatchSampler(6, 2, 0, 1, cyclic=True))
    assert [next(cyclic) for _ in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    with pytest.raises(DataConfigError, match="fewer than one step"):
        PretrainingBatchSampler(3, 2, 0, 2)
