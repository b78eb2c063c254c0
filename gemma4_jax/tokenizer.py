"""The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` library) and the chat format.

Owns encoding with BOS exactly once, decoding, the stop ids of a checkpoint (`config.json` plus
`generation_config.json`), and the Gemma 4 chat prompt: the checkpoint's own template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) rendered as transformers renders it
(`gemma4_jax.chat`) when present, else the built-in format of docs/architecture.md §4. No torch at run time.
`check_side_files` reads those files as `load` does, so that `load` and the converter refuse a malformed one
(one sentence naming it) before touching the weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .chat import EMPTY_THOUGHTS, THINK, check_conversation, render, split_thoughts
from .errors import CheckpointError, ConfigError

BOS, TURN_START, TURN_END = "<bos>", "<|turn>", "<turn|>"
IMAGE_MARK, AUDIO_MARK = "<|image|>", "<|audio|>"


def _text_of(content) -> str:
    """A message's content as text: a string, or a list of parts (text; image and audio parts become their
    placeholders), trimmed as the published templates trim it."""
    if isinstance(content, str):
        return content.strip()
    parts = []
    for p in content or ():
        kind = p.get("type") if isinstance(p, dict) else None
        parts.append(p.get("text", "").strip() if kind == "text" else
                     {"image": IMAGE_MARK, "audio": AUDIO_MARK}.get(kind, ""))
    return "".join(parts)


def builtin_chat_prompt(messages: list[dict], add_generation_prompt: bool = True,
                        enable_thinking: bool = False, empty_thoughts: bool = False) -> str:
    """The chat format of docs/architecture.md §4, for checkpoints that ship no template:
    `<bos>[<|turn>system\n[<|think|>\n]{system}<turn|>\n]<|turn>user\n{text}<turn|>\n…<|turn>model\n`.
    A system turn is written for a system/developer message or when thinking is on; earlier model turns lose
    their thought channels; `empty_thoughts` (the 26B/31B templates) writes an empty thought channel after the
    generation prompt when thinking is off."""
    messages = check_conversation(messages)
    parts = [BOS]
    first = messages[0]
    system = first["role"] in ("system", "developer")
    if system or enable_thinking:
        body = _text_of(first["content"]) if system else ""
        think = f"{THINK}\n" if enable_thinking else ""
        parts.append(f"{TURN_START}system\n{think}{body}{TURN_END}\n")
    for m in messages[1:] if system else messages:
        role = {"assistant": "model", "developer": "system"}.get(m["role"], m["role"])
        text = _text_of(m.get("content"))
        if role == "model":
            text = split_thoughts(text)[1]
        parts.append(f"{TURN_START}{role}\n{text}{TURN_END}\n")
    if add_generation_prompt:
        parts.append(f"{TURN_START}model\n")
        if empty_thoughts and not enable_thinking:
            parts.append(EMPTY_THOUGHTS)
    return "".join(parts)


class StreamDecoder:
    """Text of a token stream, piece by piece, never splitting a character.

    Byte-level tokens can carry part of a character (an emoji, CJK); decoding tokens one at a time would print
    U+FFFD for each part. `push(ids)` returns the text that became final: the decode of everything so far,
    less what was already returned, held back while it ends in an incomplete character (U+FFFD).
    `flush()` returns whatever is left at the end (U+FFFD included, if the stream really ends mid-character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._shown = 0  # characters of the full decode already returned

    def push(self, ids) -> str:
        self._ids.extend(int(t) for t in ids)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._shown = text[self._shown:], len(text)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        piece, self._shown = text[self._shown:], len(text)
        return piece


class Tokenizer:
    """Encode/decode and chat prompts for one checkpoint directory."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"{path}/tokenizer.json cannot be read ({str(err).splitlines()[0]})") from None
        self.bos_id = self._tok.token_to_id(BOS)
        self.template = _read_template(path)
        self.empty_thoughts = False  # the built-in format's size class (set by `load` from the config)

    @classmethod
    def maybe_load(cls, path: str) -> Tokenizer | None:
        return cls(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` with BOS exactly once at the front (when `add_bos`)."""
        if not isinstance(text, str):
            raise ConfigError(f"encode takes text (a str), got {type(text).__name__} {text!r:.40}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    @staticmethod
    def _check_ids(ids) -> list[int]:
        """`ids` as a list of non-negative ints, or one ConfigError sentence. An id past the tokenizer's vocabulary
        (a model's table may be padded beyond it) decodes to nothing, as transformers' tokenizers do."""
        ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0), None)
        if bad is not None:
            raise ConfigError(f"token ids must be non-negative integers, got {bad!r}")
        return [int(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        """The token's text; None for an id past the tokenizer's vocabulary."""
        return self._tok.id_to_token(self._check_ids([i])[0])

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tools: list[dict] | None = None) -> str:
        """The prompt for `messages` (transformers' format: `role`, `content` as a string or a list of parts
        `{"type": "text", "text": …}`, `{"type": "image"}`, `{"type": "audio"}`; `tool_calls`; role `tool`),
        rendered with the checkpoint's template exactly as transformers renders it (`gemma4_jax.chat`), or with
        the built-in format when the checkpoint has no template. A bad conversation raises `ConfigError`."""
        if self.template is None:
            if tools:
                raise ConfigError("this checkpoint has no chat template, and the built-in format has no tools")
            return builtin_chat_prompt(messages, add_generation_prompt, enable_thinking, self.empty_thoughts)

        return render(self.template, messages, add_generation_prompt=add_generation_prompt,
                      enable_thinking=enable_thinking, tools=tools)

    def chat_prompt(self, prompt, enable_thinking: bool = False) -> str:
        """The chat prompt of one user text, or of a message list."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.apply_chat_template(messages, enable_thinking=enable_thinking)

    def encode_chat(self, prompt, enable_thinking: bool = False) -> list[int]:
        return self.encode(self.chat_prompt(prompt, enable_thinking), add_bos=True)


def _read_text(file: str) -> str | None:
    """The text of `file`, or None when there is none; CheckpointError naming it when it cannot be read."""
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text") from None
    except OSError as err:
        raise CheckpointError(f"{file} cannot be read ({err.strerror or err})") from None


def _read_json(path: str, name: str) -> dict | None:
    """The JSON object in the side file `name` of the checkpoint directory `path`, or None when there is none;
    CheckpointError with one sentence naming the file when it is not one."""
    file = os.path.join(path, name)
    text = _read_text(file)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return raw


def _read_template(path: str) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`."""
    template = _read_text(os.path.join(path, "chat_template.jinja"))
    if template is None:
        template = (_read_json(path, "tokenizer_config.json") or {}).get("chat_template")
    return template if isinstance(template, str) else None


def stop_ids(path: str | None, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's plus generation_config.json's, in first-seen order. CheckpointError
    when generation_config.json is malformed or its `eos_token_id` is neither a token id nor a list of them."""
    gen = (_read_json(path, "generation_config.json") if path else None) or {}
    eos = gen.get("eos_token_id")
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_list):
        raise CheckpointError(f"{os.path.join(path, 'generation_config.json')} has eos_token_id {json.dumps(eos)}, "
                              "which is neither a token id nor a list of token ids")
    return tuple(dict.fromkeys(int(i) for i in [*config_eos, *eos_list]))


def check_side_files(path: str) -> None:
    """Read the small files of a checkpoint that `load` reads besides its weights and config
    (generation_config.json, tokenizer_config.json, chat_template.jinja), with the readers `load` uses:
    CheckpointError naming the first malformed one. tokenizer.json is checked by `Tokenizer` itself."""
    stop_ids(path, ())
    _read_template(path)
    _read_json(path, "tokenizer_config.json")  # not read above when there is a chat_template.jinja
