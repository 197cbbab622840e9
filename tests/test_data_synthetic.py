"""The synthetic corpus: determinism, checkable answers, small vocabulary, JSONL I/O."""

import json
import os

import pytest

from megatron_drlora.data import synthetic
from megatron_drlora.data.synthetic import (
    DOMAINS,
    JsonlError,
    expected_response,
    generate,
    generate_mixed,
    is_correct,
    iter_jsonl,
    write_jsonl,
)


def test_at_least_four_domains_with_both_formats():
    assert len(DOMAINS) >= 4
    for domain in DOMAINS:
        (inst,) = generate(domain, 1, seed=0)
        assert set(inst) == {"domain", "prompt", "response"} and inst["domain"] == domain
        (text,) = generate(domain, 1, seed=0, fmt="text")
        assert set(text) == {"domain", "text"}
        # text is the instruction pair joined as the tokenizer sees it
        assert text["text"] == inst["prompt"] + " " + inst["response"]


def test_deterministic_and_seed_dependent():
    for domain in DOMAINS:
        assert generate(domain, 50, seed=7) == generate(domain, 50, seed=7)
        assert generate(domain, 50, seed=7) != generate(domain, 50, seed=8)
    # a domain's stream does not depend on which other domains are generated
    assert generate_mixed(["code", "units"], 5, 3)[0] in generate("code", 5, 3) + generate(
        "units", 5, 3)


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_answer_is_checkable(domain):
    for record in generate(domain, 300, seed=1):
        prompt, response = record["prompt"], record["response"]
        assert expected_response(domain, prompt) == response
        assert is_correct(domain, prompt, response)
        assert is_correct(domain, prompt, "  " + response + " ")  # detokenized leading space
        assert not is_correct(domain, prompt, response + " x")
        assert not is_correct(domain, prompt, "")


def test_domains_are_different_skills():
    prompts = {d: generate(d, 20, seed=2)[0]["prompt"] for d in DOMAINS}
    for domain, prompt in prompts.items():
        for other in DOMAINS:
            if other != domain:
                with pytest.raises(ValueError):
                    expected_response(other, prompt)


def test_known_answers():
    assert expected_response("arithmetic", "calc 12+35=") == "47"
    assert expected_response("arithmetic", "calc 7*8=") == "56"
    assert expected_response("arithmetic", "calc 9-3=") == "6"
    assert expected_response("code", "run x=3;y=x*4;print(y)") == "12"
    assert expected_response("code", "run s='abcd';print(len(s))") == "4"
    assert expected_response("code", "run print(max(3,7))") == "7"
    assert expected_response("units", "convert 7 km to m") == "7000"
    assert expected_response("units", "convert 120 min to h") == "2"
    assert expected_response("dates", "3 days after friday") == "monday"
    assert expected_response("dates", "1 day before monday") == "sunday"
    assert expected_response("reverse", "reverse: a b c") == "c b a"
    assert expected_response("sort", "sort: c a b") == "a b c"
    assert expected_response("prose", "today the old cat chases the") == "mouse"
    assert is_correct("arithmetic", "calc 12+35=", " 47")
    assert not is_correct("arithmetic", "calc 12+35=", "48")
    with pytest.raises(ValueError, match="unknown domain"):
        is_correct("poetry", "x", "y")


def test_small_vocabulary_single_line_ascii():
    chars, words = set(), set()
    for domain in DOMAINS:
        for r in generate(domain, 500, seed=3, fmt="text"):
            text = r["text"]
            assert text == " ".join(text.split()), "single spaces, no newlines"
            assert text.isascii() and text == text.lower()
            chars.update(text)
            words.update(text.split())
    assert len(chars) < 64
    # words here are whitespace-separated chunks incl. numbers and code; a 512-piece
    # SentencePiece model covers them because digits are split
    assert len([w for w in words if w.isalpha()]) < 120


def test_exclude_prompts_gives_held_out_set():
    train = generate("code", 200, seed=1)
    held_out = generate("code", 100, seed=2,
                        exclude_prompts={r["prompt"] for r in train})
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    all_dates = {r["prompt"] for r in generate("dates", 3000, seed=0)}
    with pytest.raises(ValueError, match="exclude"):
        generate("dates", 5, seed=1, exclude_prompts=all_dates)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        generate("nope", 1, 0)
    with pytest.raises(ValueError, match="unknown format"):
        generate("code", 1, 0, fmt="chat")


def test_write_jsonl_atomic(tmp_path):
    path = tmp_path / "sub" / "a.jsonl"
    records = generate("sort", 10, seed=0)
    write_jsonl(str(path), records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(str(path), [{"ok": 1}, {"bad": object()}])
    assert path.read_bytes() == before, "a failed write leaves the old file intact"
    assert os.listdir(path.parent) == ["a.jsonl"], "no temporary file left behind"


def test_iter_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(JsonlError, match=rf"{path}:4: invalid JSON"):
        list(iter_jsonl(str(path)))
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=rf"{path}:2: expected a JSON object"):
        list(iter_jsonl(str(path)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_jsonl(str(tmp_path / "missing.jsonl")))
    with pytest.raises(JsonlError, match=r"x.jsonl:5: missing field 'text'"):
        synthetic.get_field({"prompt": "p"}, "text", "x.jsonl", 5)
