"""Chat data: tools/preprocess_data.py renders `messages` (and prompt/response) records with a
Hugging Face tokenizer's chat template and writes the loss mask on assistant tokens only.

Expected values come from transformers itself: the ids are `apply_chat_template(...,
tokenize=True)`, and the mask is transformers' `return_assistant_tokens_mask` on the same
template with `{% generation %}` markers (tests/chat_tokenizers.py), an independent
computation of what the tool finds by prefix rendering.
"""

import json
import os

import pytest

from tests.chat_tokenizers import (
    CHATML,
    CHATML_MARKED,
    MIXTRAL,
    MIXTRAL_MARKED,
    TULU,
    TULU_MARKED,
    build_chat_tokenizer,
    chat_records,
    write_jsonl,
)
from tests.test_data_tools import documents, load_tool

preprocess_data = load_tool("preprocess_data")

# name -> (template, marked template, eos, bos post-processor)
TOKENIZERS = {
    "tulu": (TULU, TULU_MARKED, "</s>", True),  # bos from the template, eos closes each reply
    "chatml_base": (CHATML, CHATML_MARKED, "<|endoftext|>", False),  # eos not in the template
    "chatml_instruct": (CHATML, CHATML_MARKED, "<|im_end|>", False),  # eos closes each turn
    "mixtral": (MIXTRAL, MIXTRAL_MARKED, "</s>", True),  # SentencePiece-style tokenizer.json
}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    for name, (template, _, eos, bos_pp) in TOKENIZERS.items():
        build_chat_tokenizer(d / name, template, eos=eos, bos_post_processor=bos_pp,
                             metaspace=name == "mixtral")
    build_chat_tokenizer(d / "plain")  # no chat template
    write_jsonl(d / "chat.jsonl", chat_records(40, seed=3))
    write_jsonl(d / "chat_no_system.jsonl", chat_records(40, seed=5, system=False))
    return d


def hf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def run(tok_dir, src, out, *extra):
    return preprocess_data.main(["--input", str(src), "--output-prefix", str(out),
                                 "--tokenizer-type", "HuggingFaceTokenizer",
                                 "--tokenizer-model", str(tok_dir), *extra])


def expected(tok, marked, messages, append_eod):
    """(ids, mask) from transformers alone, plus the eod rule: appended (a loss token when the
    record ends with a reply) unless the last reply or what follows it holds the eos."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    out = tok.apply_chat_template(messages, chat_template=marked, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == list(ids), "the markers do not change the rendering"
    ids, mask = list(ids), list(out["assistant_masks"])
    last_start = max(i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
    if append_eod and tok.eos_token_id not in ids[last_start:]:
        ids.append(tok.eos_token_id)
        mask.append(int(messages[-1]["role"] == "assistant"))
    return ids, mask


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_chat_tokens_and_assistant_mask(chat, tmp_path, name):
    template, marked, _, _ = TOKENIZERS[name]
    out = tmp_path / "c"
    src = chat / ("chat_no_system.jsonl" if name == "mixtral" else "chat.jsonl")
    assert run(chat / name, src, out, "--append-eod") == 0
    tok = hf(chat / name)
    records = [json.loads(x) for x in open(src)]
    docs, masks = documents(f"{out}_text_document"), documents(f"{out}_text_document_lossmask")
    appended = 0
    for record, doc, mask in zip(records, docs, masks, strict=True):
        messages = record["messages"]
        want_ids, want_mask = expected(tok, marked, messages, append_eod=True)
        assert doc == want_ids and mask == want_mask, record["id"]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        n = len(tok(rendered, add_special_tokens=False)["input_ids"])
        assert tok.decode(doc[:n], skip_special_tokens=False) == rendered
        appended += len(doc) - n
        # each reply's text is among the loss tokens, no user/system text is
        kept = tok.decode([t for t, m in zip(doc, mask) if m], skip_special_tokens=False)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        for m in messages:
            if m["role"] == "assistant":
                assert m["content"] in kept
            elif not any(m["content"] in r for r in replies):
                assert m["content"] not in kept
    if name == "chatml_base":
        assert appended == len(records), "the template never writes <|endoftext|>"
        assert tok.decode(docs[0][-3:]) == "<|im_end|>\n<|endoftext|>"
    else:
        assert appended == 0, "the template closes replies with the eos already"
    if name in ("tulu", "mixtral"):
        bos = tok.bos_token_id
        assert all(d[0] == bos and d[1] != bos for d in docs), "exactly one bos"
        rendered = tok.apply_chat_template(records[0]["messages"], tokenize=False)
        assert tok(rendered)["input_ids"][:2] == [bos, bos], (
            "this tokenizer adds bos itself: the tool must not let it")
    meta = json.loads(open(f"{out}_text_document.meta.json").read())
    assert (meta["mode"], meta["json_keys"], meta["assistant_mask_method"],
            meta["chat_template_source"]) == ("chat", ["messages"], "prefix-rendering",
                                              "tokenizer")
    assert meta["num_loss_tokens"] == sum(sum(m) for m in masks)


def test_generation_markers_give_the_same_data(chat, tmp_path):
    """A template with {% generation %} goes through transformers' assistant mask; the result
    equals the prefix rendering of the plain template."""
    marked = tmp_path / "marked.jinja"
    marked.write_text(TULU_MARKED)
    assert run(chat / "tulu", chat / "chat.jsonl", tmp_path / "a", "--append-eod") == 0
    assert run(chat / "tulu", chat / "chat.jsonl", tmp_path / "b", "--append-eod",
               "--chat-template", str(marked)) == 0
    for suffix in ("_text_document", "_text_document_lossmask"):
        assert documents(f"{tmp_path / 'a'}{suffix}") == documents(f"{tmp_path / 'b'}{suffix}")
    meta = json.loads(open(f"{tmp_path / 'b'}_text_document.meta.json").read())
    assert meta["assistant_mask_method"] == "generation-markers"
    assert meta["chat_template_source"] == "--chat-template"


def test_prompt_response_records_through_the_template(chat, tmp_path):
    rows = [{"prompt": "what is three plus four", "response": "seven"},
            {"system": "you are a kind bot", "prompt": "hello", "response": "hello world"}]
    src = write_jsonl(tmp_path / "pr.jsonl", rows)
    as_chat = write_jsonl(tmp_path / "as_chat.jsonl", [{"messages": (
        [{"role": "system", "content": r["system"]}] if "system" in r else []) + [
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["response"]}]} for r in rows])
    tok_dir = chat / "chatml_base"
    assert run(tok_dir, src, tmp_path / "pr", "--append-eod", "--apply-chat-template") == 0
    assert run(tok_dir, as_chat, tmp_path / "ch", "--append-eod") == 0
    for suffix in ("_text_document", "_text_document_lossmask"):
        assert documents(f"{tmp_path / 'pr'}{suffix}") == documents(f"{tmp_path / 'ch'}{suffix}")
    # without the flag: prompt + response concatenated, no template (unchanged behaviour)
    assert run(tok_dir, src, tmp_path / "raw", "--append-eod") == 0
    tok = hf(tok_dir)
    assert documents(f"{tmp_path / 'raw'}_text_document")[0] == (
        tok("what is three plus four")["input_ids"] + tok("seven")["input_ids"]
        + [tok.eos_token_id])


def test_truncation(chat, tmp_path):
    out = tmp_path / "t"
    assert run(chat / "chatml_base", chat / "chat.jsonl", out, "--append-eod",
               "--max-document-length", "40") == 0
    full = tmp_path / "f"
    assert run(chat / "chatml_base", chat / "chat.jsonl", full, "--append-eod") == 0
    docs, masks = documents(f"{out}_text_document"), documents(f"{out}_text_document_lossmask")
    full_docs = documents(f"{full}_text_document")
    full_masks = documents(f"{full}_text_document_lossmask")
    kept = [(d, m) for d, m in zip(full_docs, full_masks) if any(m[:40])]
    assert [(d[:40], m[:40]) for d, m in kept] == list(zip(docs, masks))
    meta = json.loads(open(f"{out}_text_document.meta.json").read())
    assert meta["truncated_documents"] == sum(len(d) > 40 for d in full_docs) > 0
    assert meta["dropped_documents_without_loss_tokens"] == len(full_docs) - len(kept) > 0
    assert meta["max_document_length"] == 40


def test_workers_give_identical_output(chat, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preprocess_data, "CHUNK_LINES", 4)
    files = {}
    for workers in ("1", "2"):
        out = tmp_path / workers
        out.mkdir()
        assert run(chat / "tulu", chat / "chat.jsonl", out / "c", "--append-eod",
                   "--workers", workers, "--log-interval", "16") == 0
        err = capsys.readouterr().err
        assert "processed 16 documents" in err and "% of the input" in err, err
        assert "checked 40 chat records" in err, err
        files[workers] = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    assert len(files["1"]) == 5 and files["1"] == files["2"]


# ------------------------------------------------------------------ bad input


def _fails(capsys, tmp_path, tok_dir, records, expected, *extra, lines=None):
    src = tmp_path / "bad.jsonl"
    if lines is None:
        write_jsonl(src, records)
    else:
        src.write_text(lines)
    out = tmp_path / "err"
    assert run(tok_dir, src, out, "--append-eod", *extra) == 1
    err = capsys.readouterr().err
    assert expected.format(src=src) in err, err
    assert not list(tmp_path.glob("err*")), "nothing written on error"


def test_bad_chat_records_fail_before_any_tokenization(chat, tmp_path, capsys, monkeypatch):
    class NoEncoding(preprocess_data.DocumentEncoder):
        def encode_chunk(self, chunk):
            raise AssertionError("tokenization started before the records were checked")

    monkeypatch.setattr(preprocess_data, "DocumentEncoder", NoEncoding)
    good = chat_records(30, seed=1)
    tok = chat / "chatml_base"
    user = {"role": "user", "content": "hello"}
    reply = {"role": "assistant", "content": "hi there"}
    cases = [
        ({"messages": [user]}, "{src}:31: no assistant turn"),
        ({"messages": [{"role": "tool", "content": "x"}, user, reply]},
         "{src}:31: messages[0]: unknown role 'tool'; roles are system, user, assistant"),
        ({"messages": [user, {"role": "assistant", "content": "  "}]},
         "{src}:31: messages[1] (assistant): empty content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}, reply]},
         "{src}:31: messages[0] (user): content must be a string"),
        ({"messages": []}, "{src}:31: field 'messages' must be a non-empty list"),
        ({"messages": [{"content": "x"}, reply]},
         "{src}:31: messages[0] must be an object with 'role' and 'content'"),
        ({"conversation": [user, reply]}, "{src}:31: missing field 'messages'"),
    ]
    for bad, message in cases:
        _fails(capsys, tmp_path, tok, good + [bad], message, "--workers", "2")
    _fails(capsys, tmp_path, tok, [{"prompt": "q", "response": ""}],
           "{src}:1: field 'response' (assistant): empty content", "--apply-chat-template")
    # the template itself refuses a conversation (Mixtral's: user first, then alternating)
    system = {"role": "system", "content": "be kind"}
    _fails(capsys, tmp_path, chat / "mixtral", chat_records(5, 2, system=False) + [
        {"messages": [system, user, reply]}], "{src}:6: the chat template refused this "
        "conversation: Conversation roles must alternate", "--workers", "2")


def test_tokenizer_without_chat_template(chat, tmp_path, capsys):
    records = chat_records(3)
    _fails(capsys, tmp_path, chat / "plain", records,
           f"--tokenizer-model {chat / 'plain'}: the tokenizer has no chat template")
    err_hint = "--chat-template FILE.jinja, or use prompt/response records"
    _fails(capsys, tmp_path, chat / "plain", records, err_hint)
    # the flag fixes it: the template given on the command line renders the data
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    assert run(chat / "plain", write_jsonl(tmp_path / "ok.jsonl", records), tmp_path / "ok",
               "--append-eod", "--chat-template", str(template)) == 0
    _fails(capsys, tmp_path, chat / "plain", records,
           "--chat-template 'no-such.jinja': neither a file nor a Jinja template",
           "--chat-template", "no-such.jinja")


def test_chat_needs_a_hugging_face_tokenizer(chat, tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", chat_records(2))
    assert preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "err"),
                                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "50",
                                 "--append-eod"]) == 1
    assert "need --tokenizer-type HuggingFaceTokenizer" in capsys.readouterr().err


def test_template_that_rewrites_earlier_turns_is_refused(chat, tmp_path, capsys):
    """A template that renders earlier replies differently (as reasoning-stripping templates
    do) breaks prefix rendering: refused with the generation-marker hint."""
    rewriting = tmp_path / "rewrite.jinja"
    rewriting.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ 'A: (earlier)\\n' }}{% else %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    user = {"role": "user", "content": "hello"}
    reply = {"role": "assistant", "content": "hi there"}
    _fails(capsys, tmp_path, chat / "plain", [{"messages": [user, reply, user, reply]}],
           "{src}:1: the chat template does not render the conversation up to message 1 as a "
           "prefix", "--chat-template", str(rewriting))
    _fails(capsys, tmp_path, chat / "plain", [{"messages": [user, reply, user, reply]}],
           "{{% generation %}} ... {{% endgeneration %}}", "--chat-template", str(rewriting))


# ------------------------------------------------------------------ training reads it


def _cased_records(n, seed=0):
    """Replies in upper case only, everything else in lower case: whether a label is a reply
    token can be read off the token itself."""
    records = chat_records(n, seed)
    for r in records:
        if r["messages"][0]["role"] != "system":  # ChatML's default one is capitalised
            r["messages"].insert(0, {"role": "system", "content": "you are a kind bot"})
        for m in r["messages"]:
            m["content"] = m["content"].upper() if m["role"] == "assistant" else m["content"]
    return records


def test_gpt_dataset_trains_on_reply_tokens_only(chat, tmp_path):
    """LossMaskedGPTDataset (what examples/pretrain_gpt.py builds) over chat data packed into
    short samples: loss 1 on every label inside a reply, 0 on every other text label."""
    from megatron_drlora.data.dataset import build_gpt_datasets
    from megatron_drlora.data.tokenizer import build_megatron_tokenizer, megatron_tokenizer_args

    tok_dir = chat / "chatml_base"
    src = write_jsonl(tmp_path / "cased.jsonl", _cased_records(60, seed=4))
    assert run(tok_dir, src, tmp_path / "d", "--append-eod") == 0
    tokenizer = build_megatron_tokenizer(megatron_tokenizer_args("HuggingFaceTokenizer",
                                                                 str(tok_dir)))
    train, _, _ = build_gpt_datasets([f"{tmp_path / 'd'}_text_document"], "100,0,0", 24, 7,
                                     tokenizer, [40, None, None],
                                     data_cache_path=str(tmp_path / "cache"))
    tok = hf(tok_dir)
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    seen = {0: 0, 1: 0}
    for i in range(len(train)):
        sample = train[i]
        for label, m in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()):
            text = tok.decode([label])
            if label in special or not any(c.isalpha() for c in text):
                continue
            assert m == float(text.isupper()), (text, m)
            seen[int(m)] += 1
    assert seen[0] > 0 and seen[1] > 0


@pytest.mark.slow
def test_entry_trains_on_chat_data_with_the_hf_tokenizer(chat, tmp_path):
    """examples/pretrain_gpt.py: a base trained with --tokenizer-type NullTokenizer on data
    made by the HF tokenizer (the converted-model path), then a DR-LoRA fine-tune with
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR that grows ranks."""
    from tests.megatron_runs import events, torchrun
    from tests.train_flags import TINY

    tok_dir = chat / "chatml_base"
    assert run(tok_dir, write_jsonl(tmp_path / "c.jsonl", chat_records(120, seed=9)),
               tmp_path / "c", "--append-eod") == 0
    drop = {"--data-path": 1, "--split": 1, "--tokenizer-type": 1, "--vocab-size": 1}
    flags, skip = [], 0
    for f in TINY:
        if skip:
            skip -= 1
        elif f in drop:
            skip = drop[f]
        else:
            flags.append(f)
    flags += ["--data-path", f"{tmp_path / 'c'}_text_document", "--split", "100,0,0"]
    base = tmp_path / "base"
    torchrun(1, flags + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "300",
                         "--train-iters", "2", "--save", str(base), "--save-interval", "2"])
    out = tmp_path / "run"
    proc = torchrun(1, flags + [
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir),
        "--pretrained-checkpoint", str(base), "--save", str(out), "--save-interval", "4",
        "--train-iters", "4", "--lr-warmup-iters", "1", "--drlora-budget", "4",
        "--drlora-p-grow", "0.5", "--drlora-grow-interval", "1", "--drlora-grow-buffer", "1"])
    log = proc.stdout + proc.stderr
    assert "iteration        4/       4" in log and "lm loss" in log
    assert [e["iteration"] for e in events(out)] == [1, 2, 3]
