"""Chat prompts, rendered exactly as transformers' `apply_chat_template` renders them, and the thought channel.

One renderer for every caller (the tokenizer's `apply_chat_template`, `generate_text`, the CLI, the GSM8K
script). The environment is transformers': a sandboxed Jinja environment with `trim_blocks`, `lstrip_blocks` and
the `loopcontrols` extension (`{% break %}`, `{% continue %}`); a `tojson` filter that is `json.dumps` with its
keyword arguments (`ensure_ascii=False` by default, no HTML escaping); the globals `raise_exception` and
`strftime_now`; and the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
(`bos_token`, …) and `enable_thinking`. A message's reasoning given under an older name (`thinking`, `reasoning`)
is also passed as `reasoning_content`, as transformers does.

Gemma 4's thinking mode: with `enable_thinking` the template writes `<|think|>` into a system turn, and the model
writes its thoughts in a channel, `<|channel>thought\\n…<channel|>`, before the answer. `split_thoughts` separates
the two in a decoded output.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError

THOUGHT_START, THOUGHT_END, THINK = "<|channel>", "<channel|>", "<|think|>"
EMPTY_THOUGHTS = f"{THOUGHT_START}thought\n{THOUGHT_END}"  # what the 26B/31B templates write when not thinking
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The Jinja template object for `template`, in transformers' environment (cached per template text)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"the chat template cannot be parsed (line {err.lineno}: {err.message})") from None


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def check_conversation(messages) -> list[dict]:
    """`messages` as a list, or one `ConfigError` sentence: it must be a non-empty list of dicts with a role."""
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"the conversation must be a list of messages, got {type(messages).__name__} "
                          f"{messages!r:.40}")
    if not messages:
        raise ConfigError("the conversation is empty: give at least one message")
    bad = next((m for m in messages if not (isinstance(m, dict) and isinstance(m.get("role"), str))), None)
    if bad is not None:
        raise ConfigError(f"each message must be a dict with a 'role' (and 'content'), got {bad!r:.80}")
    for m in messages:
        content = m.get("content")
        if not (content is None or isinstance(content, str) or (isinstance(content, (list, tuple))
                                                                  and all(isinstance(p, dict) for p in content))):
            raise ConfigError(f"a message's content must be text or a list of parts (dicts), got {content!r:.40} "
                              f"in the {m['role']} message")
    return list(messages)


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True, enable_thinking: bool = False,
           tools: list[dict] | None = None, documents: list[dict] | None = None) -> str:
    """The prompt `template` makes of `messages` (transformers' message format), as transformers renders it."""
    messages = [_with_reasoning_aliases(dict(m)) for m in check_conversation(messages)]
    try:
        return compile_template(template).render(messages=messages, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt,
                                                 enable_thinking=enable_thinking, **SPECIAL_TOKENS)
    except jinja2.TemplateError as err:  # raise_exception, undefined names, type errors in the template
        raise ConfigError(f"the chat template refused the conversation: {err}") from None


def split_thoughts(text: str) -> tuple[str, str]:
    """(thoughts, answer) of a decoded model output: the thought channel `<|channel>thought\\n…<channel|>` that
    opens it (empty when there is none), and the text after it. An unclosed channel is all thoughts."""
    head = text.lstrip()
    if not head.startswith(THOUGHT_START):
        return "", text
    body = head[len(THOUGHT_START):]
    if body.startswith("thought"):
        body = body[len("thought"):].removeprefix("\n")
    thoughts, closed, answer = body.partition(THOUGHT_END)
    return thoughts.strip(), answer.lstrip() if closed else ""


class ThoughtStream:
    """Splits a streamed output the way `split_thoughts` splits a whole one: text pieces in, the answer to
    `answer(text)` and the thoughts to `thoughts(text)` (None: dropped), each as soon as it is known to be one or
    the other (a piece that might be the start of a channel marker is held back until it is not)."""

    def __init__(self, answer, thoughts=None):
        self._answer, self._thoughts = answer, thoughts or (lambda text: None)
        self._buf, self._state = "", "start"

    def push(self, piece: str) -> None:
        self._buf += piece
        if self._state == "start":
            head = self._buf.lstrip()
            if len(head) < len(THOUGHT_START) and THOUGHT_START.startswith(head):
                return  # not yet known
            if not head.startswith(THOUGHT_START):
                self._state = "answer"
            else:
                self._state, self._buf = "label", head[len(THOUGHT_START):]
        if self._state == "label":  # the channel's name, `thought` and a newline, is not part of the thoughts
            if len(self._buf) < len("thought\n") and "thought\n".startswith(self._buf):
                return
            if self._buf.startswith("thought"):
                self._buf = self._buf[len("thought"):].removeprefix("\n")
            self._state = "thoughts"
        if self._state == "thoughts":
            if THOUGHT_END in self._buf:
                done, _, rest = self._buf.partition(THOUGHT_END)
                self._thoughts(done)
                self._state, self._buf = "answer-start", rest
            else:
                keep = len(THOUGHT_END) - 1  # a marker may be arriving in pieces
                if len(self._buf) > keep:
                    self._thoughts(self._buf[:-keep])
                    self._buf = self._buf[-keep:]
                return
        if self._state == "answer-start":  # the whitespace between the channel and the answer is not shown
            self._buf = self._buf.lstrip()
            if not self._buf:
                return
            self._state = "answer"
        self._answer(self._buf)
        self._buf = ""

    def flush(self) -> None:
        if self._state in ("label", "thoughts"):
            self._thoughts(self._buf)
        elif self._state in ("start", "answer"):
            self._answer(self._buf)
        self._buf = ""
