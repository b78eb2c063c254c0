"""Position-based attention masks shared by the kernels, their references and the dispatcher.

Every kernel here masks by *positions*, not by array indices: a key at position `kp` is visible to a
query at position `qp` iff

    kp >= 0                      (−1 marks an empty cache slot or a padding key)
    and kp <= qp                 (causal; dropped when causal=False)
    and qp − kp < window         (sliding window: the current token plus window−1 earlier ones)

So ring-buffer caches (slot = position mod W), per-sequence lengths, chunked prefill at an offset and
left or right padding all come from the position arrays alone. `block_ranges` turns the same rule into
per-block loop bounds so a kernel only visits key blocks that hold a visible key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int | None, causal: bool = True) -> jax.Array:
    """Broadcasting visibility rule: q_pos [..., T, 1] against k_pos [..., 1, S] gives [..., T, S]."""
    vis = k_pos >= 0
    if causal:
        vis &= k_pos <= q_pos
    if window is not None:
        vis &= q_pos - k_pos < window
    return vis


def pad_axis(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
    """Pad `axis` of x up to a multiple of `multiple` with `value` (no copy when already aligned)."""
    n = x.shape[axis]
    extra = -n % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def block_visibility(q_pos_bt: jax.Array, k_pos_bs: jax.Array, block_q: int, block_k: int,
                     window: int | None, causal: bool) -> jax.Array:
    """[B, T/block_q, S/block_k] bool: may query block i see anything in key block j?

    Conservative (never False where a visible pair exists): it compares each key block's smallest and
    largest valid position with each query block's range. Needs T % block_q == S % block_k == 0.
    """
    b, t = q_pos_bt.shape
    s = k_pos_bs.shape[1]
    assert t % block_q == 0 and s % block_k == 0, (t, block_q, s, block_k)
    kp = k_pos_bs.reshape(b, s // block_k, block_k)
    kvalid = kp >= 0
    kmin = jnp.min(jnp.where(kvalid, kp, _BIG), axis=-1)  # [B, nk]
    kmax = jnp.max(jnp.where(kvalid, kp, -1), axis=-1)
    qp = q_pos_bt.reshape(b, t // block_q, block_q)
    qmax = jnp.max(qp, axis=-1)  # [B, nq]
    qmin = jnp.min(jnp.where(qp >= 0, qp, _BIG), axis=-1)  # rows at −1 are padding and see nothing
    vis = jnp.any(kvalid, axis=-1)[:, None, :] & (qmax >= 0)[:, :, None]
    if causal:
        vis &= kmin[:, None, :] <= qmax[:, :, None]
    if window is not None:
        vis &= kmax[:, None, :] > qmin[:, :, None] - window
    return vis


def ranges(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True index along the last axis (int32); (0, 0) where none is True."""
    n = vis.shape[-1]
    has = jnp.any(vis, axis=-1)
    lo = jnp.argmax(vis, axis=-1).astype(jnp.int32)
    hi = (n - jnp.argmax(vis[..., ::-1], axis=-1)).astype(jnp.int32)
    return jnp.where(has, lo, 0), jnp.where(has, hi, 0)
