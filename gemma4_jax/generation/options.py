"""Sampling options and their checks, and the power-of-two shape buckets, free of JAX: the command lines check
their flags with these before they import anything heavy or load a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least `minimum`) so that few shapes get compiled."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def check_context(lengths, new_tokens, context: int, *, who: Callable[[int], str] = lambda i: "a prompt",
                  new: str = "max_new_tokens") -> None:
    """The one length rule of a generation: prompt i (`lengths[i]` tokens) plus its new tokens (`new_tokens`, one
    count for all or one each) within `context`; else one sentence on the first prompt past it, named `who(i)`, its
    count of new tokens named `new`."""
    counts = [new_tokens] * len(lengths) if isinstance(new_tokens, int) else list(new_tokens)
    for i, (n, m) in enumerate(zip(lengths, counts, strict=True)):
        if n > context:
            raise ConfigError(f"{who(i)} is {n} tokens long, more than the context of {context}")
        if n + m > context:
            raise ConfigError(f"{who(i)} is {n} tokens long: with {new} {m} it exceeds the context of {context}")


@dataclass(frozen=True)
class Sampling:
    """Static sampling options. temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self, vocab: int | None = None) -> Sampling:
        """Ranges of the options (`vocab` None: no upper bound on top_k)."""
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.top_k is not None and not (1 <= int(self.top_k) <= (vocab or int(self.top_k))):
            size = f" {vocab}" if vocab else ""
            raise ConfigError(f"top_k must be between 1 and the vocabulary size{size}, got {self.top_k}")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


SEED_LIMIT = 2**63  # seeds are int64 in JAX's key derivation


def _number(name: str, value, kind) -> float | int:
    """`value` as an int (kind int) or a finite float, or a one-sentence ConfigError."""
    ok = isinstance(value, (int, np.integer)) if kind is int else isinstance(value, (int, float, np.number))
    if not ok or isinstance(value, bool):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return kind(value)


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum` (numpy integers too), or a one-sentence ConfigError."""
    n = _number(name, value, int)
    if n < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {n}")
    return n


def check_seed(value) -> int:
    """The sampling seed as an int in [0, 2**63), or a one-sentence ConfigError."""
    seed = _number("seed", value, int)
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be between 0 and 2**63 - 1, got {seed}")
    return seed


def check_sampling(*, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0,
                   vocab: int | None = None) -> Sampling:
    """Types and ranges of the sampling options (before any device work: the CLIs call it before loading);
    the Sampling they describe. `vocab` None skips top_k's upper bound."""
    check_count("max_new_tokens", max_new_tokens)
    check_seed(seed)
    s = Sampling(float(_number("temperature", temperature, float)),
                 None if top_k is None else _number("top_k", top_k, int),
                 None if top_p is None else float(_number("top_p", top_p, float)))
    return s.validate(vocab)
