"""The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` library) and the chat format.

Owns encoding with BOS exactly once, decoding, the stop ids of a checkpoint (`config.json` plus
`generation_config.json`), and the Gemma 4 chat prompt: the checkpoint's own template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) rendered as transformers renders it
(`gemma4_jax.chat`) when present, else the built-in format of docs/architecture.md §4. No torch at run time.
"""

from __future__ import annotations

import json
import os

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
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

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


def _read_template(path: str) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def stop_ids(path: str | None, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's plus generation_config.json's, in first-seen order."""
    ids = list(config_eos)
    gen = os.path.join(path, "generation_config.json") if path else None
    if gen and os.path.exists(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys(int(i) for i in ids))
