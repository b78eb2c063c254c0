"""Chooses how attention runs: the Pallas kernels or plain XLA, by platform and shape, overridable.

`impl` is one of
  'auto'      XLA on CPU (and on anything that is not a CUDA GPU); on a GPU the Pallas kernels for 16-bit
              inputs wherever they support the shape (power-of-two head_dim ≤ 512 and heads-per-KV-head),
              else XLA (float32 runs the kernels' small-tile correctness configuration, not a fast one);
  'xla'       always XLA;
  'pallas'    always the kernels (raises if the shape is unsupported);
  'interpret' the kernels in Pallas interpret mode (any platform; slow; for tests).
Within the kernels, a call with at most DECODE_MAX_TOKENS query tokens uses `decode_attention` (split-K
over the sequence), longer ones `flash_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .decode_attention import decode_attention
from .flash_attention import flash_attention, flash_attention_reference

IMPLS = ("auto", "xla", "pallas", "interpret")
DECODE_MAX_TOKENS = 8


def kernel_supports(head_dim: int, group: int) -> bool:
    """Shapes the kernels handle: power-of-two head_dim in [16, 512] and power-of-two query heads per KV head."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 512 and group >= 1 and group & (group - 1) == 0


def resolve(impl: str, *, head_dim: int, group: int, dtype=jnp.bfloat16, platform: str | None = None) -> str:
    """The concrete choice ('xla' | 'pallas' | 'interpret') for `impl` on this platform and shape."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("pallas", "interpret") and not kernel_supports(head_dim, group):
        raise ValueError(f"the Pallas kernels do not support head_dim={head_dim} with {group} heads per KV head")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda") and kernel_supports(head_dim, group) and jnp.dtype(dtype).itemsize == 2:
        return "pallas"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
              scale: float = 1.0, window: int | None = None, causal: bool = True, impl: str = "auto") -> jax.Array:
    """q [B,T,N,H] over k, v [B,S,K,H], masked by positions (see masking.py); returns [B,T,N,H]."""
    choice = resolve(impl, head_dim=q.shape[-1], group=q.shape[2] // k.shape[2], dtype=q.dtype)
    if choice == "xla":
        return flash_attention_reference(q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal)
    fn = decode_attention if q.shape[1] <= DECODE_MAX_TOKENS else flash_attention
    return fn(q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal, interpret=choice == "interpret")
