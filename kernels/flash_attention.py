"""Flash attention for prefill and chunked prefill (Pallas, Triton backend), with its jnp reference.

    o = softmax(scale · q kᵀ + mask) v      q [B,T,N,H], k/v [B,S,K,H], N = K·G (grouped-query attention)

The mask comes from positions (see `masking.py`): q_pos [B,T] and k_pos [B,S] int32, k_pos −1 for empty
or padding keys; causal and sliding-window rules on top. Queries may sit at any offset into the keys
(chunked prefill against a cache). A query row that sees no key at all returns zeros.

Layout of the work: one program owns one block of `block_m` query *rows* of one KV head, where a row is a
(token, query head) pair and the G query heads that share the KV head sit side by side. So one K/V tile
read from memory feeds G heads at once and repeated K/V is never materialised. The program walks only
the key blocks that `masking.block_visibility` says may hold a visible key (computed in the wrapper), with
the online softmax of FlashAttention-2 in base 2 and float32 statistics.

Constraints: head_dim and G are powers of two, head_dim in [16, 512]; T and S need no alignment (the
wrapper pads; padded queries get position −1 and padded keys position −1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import numerics
from .masking import block_visibility, pad_axis, ranges, visible

LOG2E = math.log2(math.e)
# A large finite negative rather than −inf: exp2(MASK − m) is exactly 0 for any real m and never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tuning knobs (hashable: a static argument of the jitted entry point).

    block_m: query rows per program (tokens × the G heads of one KV head); block_k: keys per step.
    The float32 accumulator is block_m × head_dim, so at head_dim 512 block_m stays ≤ 64 (64 × 512 × 4 B
    is half the register file; 8 warps hold it at 128 registers a thread); the Q tile and the K and V
    tiles (block_k × head_dim × num_stages) sit in shared memory, 227 KB on an H100.
    """

    block_m: int = 64
    block_k: int = 32
    num_warps: int = 8
    num_stages: int = 2


def default_config(head_dim: int, dtype=jnp.bfloat16, q_len: int = 4096) -> FlashConfig:
    """Defaults per head_dim, dtype and query length, from the H100 sweeps in docs/kernels.md.

    head_dim 512: 32-row tiles with 3 stages won at 4K queries (149 vs 130 TFLOP/s), 64-row tiles with 2
    stages at 16K (172 vs 156). float32 tiles take twice the shared memory (and the IEEE float32 dot
    more staging), so float32 gets small tiles and no pipelining: a correctness path, bf16 is the fast one.
    """
    if jnp.dtype(dtype).itemsize >= 4:
        return FlashConfig(block_m=32, block_k=16, num_warps=4, num_stages=1)
    if head_dim >= 512:
        if q_len <= 8192:
            return FlashConfig(block_m=32, block_k=32, num_warps=4, num_stages=3)
        return FlashConfig(block_m=64, block_k=32, num_warps=8, num_stages=2)
    return FlashConfig(block_m=128, block_k=64, num_warps=8, num_stages=2)  # head_dim 256: 194 TFLOP/s at 4K


def sweep_keys(q, qp, kpos_ref, k_ref, v_ref, lo, hi, *, qk_scale: float, window: int | None, causal: bool,
               block_k: int):
    """The online softmax over key blocks lo..hi-1, the one loop of the prefill and the decode kernels: q [rows, H]
    (loaded; or a tuple of equal column pieces of it, in order), qp [rows, 1] its positions; k_ref, v_ref [S, H]
    and kpos_ref [S] in memory. Scores are in base 2 (`qk_scale` includes log2 e). Returns the unnormalised output
    [rows, H], the running max and the softmax denominator [rows] (float32); a row that saw no visible key has
    denominator 0 and output 0."""
    parts = q if isinstance(q, tuple) else (q,)  # column pieces of q side by side (the decode prologue's halves)
    rows, h, w = parts[0].shape[0], v_ref.shape[-1], parts[0].shape[1]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        if len(parts) == 1:
            s = numerics.kernel_dot(q, k_ref[ks, :], trans_b=True)
        else:
            s = sum(numerics.kernel_dot(part, k_ref[ks, pl.ds(i * w, w)], trans_b=True)
                    for i, part in enumerate(parts))
        s = s * qk_scale  # [rows, block_k] float32
        vis = visible(qp, kpos_ref[ks][None, :], window, causal)
        s = jnp.where(vis, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        # The where matters only while a row has seen no visible key (m_next still MASK_VALUE).
        p = jnp.where(vis, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + numerics.kernel_dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return lax.fori_loop(lo, hi, body, init)


def _flash_kernel(lo_ref, hi_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, *,
                  scale: float, window: int | None, causal: bool, block_k: int):
    # lo_ref, hi_ref: []          first / one-past-last key block this query block may see
    # qpos_ref: [bq]              positions of the block's tokens (−1: padding)
    # kpos_ref: [S]               key positions of this sequence (−1: empty / padding)
    # q_ref: [bq, G, H]           the G query heads of this program's KV head ([bq, H] when G = 1)
    # k_ref, v_ref: [S, H]        this sequence's keys / values for the KV head
    # o_ref: [bq, G, H]           ([bq, H] when G = 1)
    bq, h = q_ref.shape[0], q_ref.shape[-1]
    g = q_ref.shape[1] if q_ref.ndim == 3 else 1
    rows = bq * g
    q = q_ref[...].reshape(rows, h)
    qp = qpos_ref[...]
    if g > 1:
        qp = jnp.broadcast_to(qp[:, None], (bq, g)).reshape(rows)
    qp = qp[:, None]  # [rows, 1]
    qk_scale = scale * LOG2E  # scores in base 2: exp(x) = exp2(x·log2 e)
    acc, _, l_i = sweep_keys(q, qp, kpos_ref, k_ref, v_ref, lo_ref[()], hi_ref[()], qk_scale=qk_scale,
                             window=window, causal=causal, block_k=block_k)
    out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw nothing stay 0
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


def _check(q, k, v, q_pos, k_pos):
    b, t, n, h = q.shape
    assert k.shape == v.shape and k.ndim == 4 and k.shape[0] == b and k.shape[3] == h, (q.shape, k.shape, v.shape)
    assert n % k.shape[2] == 0, f"query heads {n} not a multiple of kv heads {k.shape[2]}"
    g = n // k.shape[2]
    assert g & (g - 1) == 0, f"heads per kv head must be a power of two, got {g}"
    assert h & (h - 1) == 0 and 16 <= h <= 512, f"head_dim must be a power of two in [16, 512], got {h}"
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    assert q_pos.shape == (b, t) and k_pos.shape == (b, k.shape[1]), (q_pos.shape, k_pos.shape)
    return g


@functools.partial(jax.jit, static_argnames=("scale", "window", "causal", "config", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                    scale: float = 1.0, window: int | None = None, causal: bool = True,
                    config: FlashConfig | None = None, interpret: bool = False) -> jax.Array:
    """Attention of q [B,T,N,H] over k, v [B,S,K,H] masked by q_pos [B,T] / k_pos [B,S]; returns [B,T,N,H]."""
    g = _check(q, k, v, q_pos, k_pos)
    b, t, n, h = q.shape
    kh = k.shape[2]
    cfg = config or default_config(h, q.dtype, t)
    bq = max(cfg.block_m // g, max(1, 16 // g))  # tokens per program; the dot needs ≥ 16 rows
    bk = cfg.block_k

    q_pos = pad_axis(q_pos.astype(jnp.int32), 1, bq, -1)
    k_pos = pad_axis(k_pos.astype(jnp.int32), 1, bk, -1)
    qp, kp, vp = pad_axis(q, 1, bq, 0), pad_axis(k, 1, bk, 0), pad_axis(v, 1, bk, 0)
    tp, sp = qp.shape[1], kp.shape[1]
    nq = tp // bq
    lo, hi = ranges(block_visibility(q_pos, k_pos, bq, bk, window, causal))  # [B, nq] each

    # Grid (query block, batch, kv head), query blocks in reverse: under a causal mask the late blocks
    # carry the most keys, so they start first and the short ones fill the tail.
    def qblk(i):
        return nq - 1 - i

    q_block = (None, bq, g, h) if g > 1 else (None, bq, None, h)  # G query heads side by side
    kernel = functools.partial(_flash_kernel, scale=float(scale), window=window, causal=causal, block_k=bk)
    out = pl.pallas_call(
        kernel,
        grid=(nq, b, kh),
        in_specs=[
            pl.BlockSpec((None, None), lambda i, bi, hi_: (bi, qblk(i))),  # lo
            pl.BlockSpec((None, None), lambda i, bi, hi_: (bi, qblk(i))),  # hi
            pl.BlockSpec((None, bq), lambda i, bi, hi_: (bi, qblk(i))),  # q_pos
            pl.BlockSpec((None, sp), lambda i, bi, hi_: (bi, 0)),  # k_pos
            pl.BlockSpec(q_block, lambda i, bi, hi_: (bi, qblk(i), hi_, 0)),  # q
            pl.BlockSpec((None, sp, None, h), lambda i, bi, hi_: (bi, 0, hi_, 0)),  # k
            pl.BlockSpec((None, sp, None, h), lambda i, bi, hi_: (bi, 0, hi_, 0)),  # v
        ],
        out_specs=pl.BlockSpec(q_block, lambda i, bi, hi_: (bi, qblk(i), hi_, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, n, h), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(lo, hi, q_pos, k_pos, qp, kp, vp)
    return out[:, :t]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float = 1.0) -> jax.Array:
    """The one XLA attention (the kernels' reference, and the model's XLA path): q [B,T,N,H] over k, v [B,S,K,H]
    (grouped queries) where `mask` [B,T,S] is True. Float32 scores and softmax, probabilities cast to v's dtype,
    float32 accumulation; float32 contractions summed in blocks (`numerics.einsum`); rows that see nothing give 0.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    q5 = q.reshape(b, t, kh, n // kh, h)
    s = numerics.einsum("btkgh,bskh->bkgts", q5, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        s = s * jnp.float32(scale)
    vis = mask[:, None, None]  # [B,1,1,T,S]
    # A large finite negative (not -inf) keeps rows that see nothing free of NaNs; they are zeroed below.
    s = jnp.where(vis, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.any(vis, axis=-1, keepdims=True), p, 0.0).astype(v.dtype)
    o = numerics.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype).reshape(b, t, n, h)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                              scale: float = 1.0, window: int | None = None, causal: bool = True) -> jax.Array:
    """`xla_attention` masked by positions (`masking.visible`): the kernels' semantics in plain jnp."""
    return xla_attention(q, k, v, visible(q_pos[:, :, None], k_pos[:, None, :], window, causal), scale=scale)
