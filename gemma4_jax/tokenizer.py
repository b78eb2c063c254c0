"""The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` library) and the chat format.

Owns encoding with BOS exactly once, decoding, the stop ids of a checkpoint (`config.json` plus
`generation_config.json`), and the Gemma 4 chat prompt: the checkpoint's own template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) rendered with jinja2 when
present, else the built-in format of GEMMA4_SPEC.md §4. No torch at run time.
"""

from __future__ import annotations

import json
import os

from .errors import CheckpointError

BOS, TURN_START, TURN_END = "<bos>", "<|turn>", "<turn|>"


def builtin_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """`<bos><|turn>user\\n{text}<turn|>\\n<|turn>model\\n` (GEMMA4_SPEC.md §4)."""
    parts = [BOS]
    for m in messages:
        role = {"assistant": "model", "developer": "system"}.get(m["role"], m["role"])
        parts.append(f"{TURN_START}{role}\n{m['content']}{TURN_END}\n")
    if add_generation_prompt:
        parts.append(f"{TURN_START}model\n")
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
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"{path}/tokenizer.json cannot be read ({str(err).splitlines()[0]})") from None
        self.bos_id = self._tok.token_to_id(BOS)
        self.template = _read_template(path)

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

    def chat_prompt(self, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        if self.template is None:
            return builtin_chat_prompt(messages)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise CheckpointError(f"the chat template refused the prompt: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                     bos_token=BOS, eos_token="<eos>")

    def encode_chat(self, text: str) -> list[int]:
        return self.encode(self.chat_prompt(text), add_bos=True)


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
