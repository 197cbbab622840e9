"""Chat and instruction records rendered with a model's own chat template, loss on assistant
tokens only (used by tools/preprocess_data.py).

A record is either `{"messages": [{"role": ..., "content": ...}, ...]}` (the open-instruct /
Tulu form; roles system, user, assistant) or a prompt/response record (`prompt`, `response`,
optional `system`), which renders as [system], user, assistant. Only each message's `role`
and `content` reach the template.

Rendering and tokenization are exactly `tokenizer.apply_chat_template(messages,
tokenize=True)` of transformers: the template renders the text (with the tokenizer's special
tokens as template variables: `bos_token`, `eos_token`, ...) and the text is tokenized with
`add_special_tokens=False`, so a template that writes `{{ bos_token }}` gives one bos, never
two.

Where the assistant tokens are:
- a template that marks them with `{% generation %} ... {% endgeneration %}`: transformers'
  own `return_assistant_tokens_mask` (the marked character spans);
- any other template: prefix rendering. For the k-th message, if it is an assistant turn, its
  span starts where `render(messages[:k], add_generation_prompt=True)` ends and ends where
  `render(messages[:k+1])` ends. So the span holds the reply and whatever the template closes
  the turn with (`<|im_end|>\\n`, `eos_token`), and never the role header of the generation
  prompt. Both renderings must be prefixes of the whole conversation's text; a template that
  rewrites earlier turns (e.g. drops their reasoning) is refused with a hint to add generation
  markers.
In both cases a token is an assistant token when its characters overlap an assistant span (the
rule transformers uses), from the fast tokenizer's offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import List, Optional, Sequence, Tuple

from megatron_drlora.data.synthetic import JsonlError

ROLES = ("system", "user", "assistant")
"""Roles a chat record may use."""

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """No usable chat template; the message says which flag gives one."""


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_RE.search(template))


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def read_template_flag(value: Optional[str]) -> Optional[str]:
    """`--chat-template`: a Jinja file (read) or the template text itself; None stays None."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, "r", encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise ChatTemplateError(f"--chat-template {value!r}: neither a file nor a Jinja template")


def hf_tokenizer_of(megatron_tokenizer, tokenizer_model: Optional[str]):
    """The transformers tokenizer inside Megatron's HuggingFaceTokenizer (the very object whose
    ids training uses); AutoTokenizer.from_pretrained(tokenizer_model) if it cannot be found."""
    library = getattr(megatron_tokenizer, "_tokenizer", megatron_tokenizer)
    hf = getattr(library, "tokenizer", None)
    if hf is not None and hasattr(hf, "apply_chat_template"):
        return hf
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_model)


def resolve_template(hf_tokenizer, flag_template: Optional[str], tokenizer_model: str) -> str:
    """The chat template to render with: --chat-template's, else the tokenizer's own."""
    if flag_template:
        return flag_template
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (transformers 4): the default one
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            f"--tokenizer-model {tokenizer_model}: the tokenizer has no chat template (no "
            "chat_template in tokenizer_config.json, no chat_template.jinja), so chat records "
            "cannot be rendered; give the model's template with --chat-template FILE.jinja, or "
            "use prompt/response records without a template (prompt + response tokenized "
            "as they are)")
    return template


def chat_messages(record: dict, path: str, lineno: int, prompt_response: bool) -> List[dict]:
    """The record's conversation as [{'role', 'content'}], checked; JsonlError naming
    file:line otherwise (no assistant turn, unknown role, empty or non-text content)."""

    def error(text):
        return JsonlError(f"{path}:{lineno}: {text}")

    if prompt_response:
        messages = []
        if record.get("system") is not None:
            messages.append({"role": "system", "content": record["system"]})
        for key, role in (("prompt", "user"), ("response", "assistant")):
            if key not in record:
                present = ", ".join(sorted(record)) or "none"
                raise error(f"missing field {key!r} (fields present: {present})")
            messages.append({"role": role, "content": record[key]})
        where = {"system": "field 'system'", "user": "field 'prompt'",
                 "assistant": "field 'response'"}
    else:
        if "messages" not in record:
            present = ", ".join(sorted(record)) or "none"
            raise error(f"missing field 'messages' (fields present: {present}); a chat record "
                        "is {\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]}")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise error("field 'messages' must be a non-empty list of {role, content} objects")
        where = None
    out = []
    for i, message in enumerate(messages):
        name = where[message["role"]] if where else f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise error(f"{name} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise error(f"{name}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise error(f"{name} ({role}): content must be a string, got "
                        f"{type(content).__name__}")
        if not content.strip():
            raise error(f"{name} ({role}): empty content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise error("no assistant turn: nothing to train on (the loss is on assistant tokens "
                    "only); give every record at least one message with role 'assistant'")
    return out


@contextlib.contextmanager
def _template_errors(where: str):
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as err:
        raise JsonlError(f"{where}: the chat template refused this conversation: {err}") from None


class ChatRenderer:
    """Renders conversations with `template` through `hf_tokenizer` and finds the assistant
    tokens (module docstring). Needs a fast tokenizer (tokenizer.json) for character offsets."""

    def __init__(self, hf_tokenizer, template: str):
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ChatTemplateError(
                "chat data needs a fast Hugging Face tokenizer (a tokenizer.json in the "
                "directory; do not pass --tokenizer-hf-no-use-fast): the assistant tokens are "
                "found from its character offsets")
        self.tokenizer = hf_tokenizer
        self.template = template
        self.method = ("generation-markers" if has_generation_markers(template)
                       else "prefix-rendering")

    def render(self, messages: Sequence[dict], where: str,
               add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`; JsonlError naming `where` (file:line) when the
        template refuses them (its raise_exception, e.g. roles that must alternate)."""
        with _template_errors(where):
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: Sequence[dict], text: str,
                        where: str) -> List[Tuple[int, int]]:
        """Character spans of the assistant turns in `text` (= render(messages)), by prefix
        rendering."""
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], where, add_generation_prompt=True) if k else ""
            through = self.render(messages[:k + 1], where)
            if not (text.startswith(before) and text.startswith(through)):
                raise ChatTemplateError(
                    f"{where}: the chat template does not render the conversation up to "
                    f"message {k} as a prefix of the whole conversation (it rewrites earlier "
                    "turns), so the assistant tokens cannot be found by prefix rendering; mark "
                    "the assistant replies with {% generation %} ... {% endgeneration %} in the "
                    "template and pass it with --chat-template FILE.jinja")
            if len(through) <= len(before):
                raise ChatTemplateError(f"{where}: assistant message {k} renders to no text")
            spans.append((len(before), len(through)))
        return spans

    def encode(self, messages: Sequence[dict], where: str) -> Tuple[List[int], List[int]]:
        """(ids, mask): apply_chat_template's ids, mask 1 on assistant tokens."""
        if self.method == "generation-markers":
            with _template_errors(where):
                out = self.tokenizer.apply_chat_template(
                    list(messages), chat_template=self.template, tokenize=True,
                    return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
            if not any(mask):
                raise ChatTemplateError(
                    f"{where}: the template's {{% generation %}} blocks mark no token")
            return ids, mask
        text = self.render(messages, where)
        spans = self.assistant_spans(messages, text, where)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        s = 0
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            while s < len(spans) and start >= spans[s][1]:
                s += 1
            if s == len(spans):
                break
            if end > spans[s][0]:  # the token's characters overlap the span
                mask[t] = 1
        return ids, mask
