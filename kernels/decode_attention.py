"""Decode attention: one or a few query tokens against a KV cache (Pallas, Triton backend), with its reference.

    o = softmax(scale · q kᵀ + mask) v      q [B,T,N,H] (T small), cache k/v [B,S,K,H], N = K·G

The mask comes from positions (see `masking.py`): q_pos [B,T], and the cache's slot positions k_pos [B,S]
(−1 = empty). Ring-buffer sliding caches (slot = position mod W) and sequences of different lengths in one
batch need nothing beyond those arrays.

Decode reads the whole cache once and does little arithmetic per byte, so the work is split for
bandwidth: the grid is (split, batch, kv head); each program reads one contiguous slice of the sequence
for one KV head and computes all T·G query rows that share it (one K/V read serves G heads). Each split
returns its own normalised output (in the input dtype, to keep the extra traffic small) with its max
score and softmax denominator in float32; a log-sum-exp combine in XLA merges the splits. Key blocks
that hold no visible key (beyond a sequence's length, outside the window) are skipped through per-split
loop bounds computed in the wrapper.

With a `QueryPrologue` the queries come raw (or as their projection's unadded float32 K splits) and each program
makes them attention's queries itself: the splits added, rms_norm with the layer's q_norm, RoPE. At a decode step
that takes the kernels that would do it off the step's chain (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .flash_attention import LOG2E, MASK_VALUE, flash_attention_reference, sweep_keys
from .masking import block_visibility, pad_axis, ranges


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs (hashable).

    block_k: keys per step (K and V tiles of block_k × head_dim × num_stages in shared memory).
    target_programs: the split count is chosen so batch × kv heads × splits reaches about this many
    programs (about one per multiprocessor: 132 on an H100), capped by the number of key blocks.
    """

    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 128


def default_config(head_dim: int, dtype=jnp.bfloat16) -> DecodeConfig:
    """Defaults per head_dim and dtype (float32: small tiles, see flash_attention.default_config)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return DecodeConfig(block_k=16, num_warps=4, num_stages=1)
    if head_dim >= 512:  # measured best at 32K context, batch 1 (docs/kernels.md)
        return DecodeConfig(block_k=32, num_warps=4, num_stages=3, target_programs=128)
    return DecodeConfig(block_k=64, num_warps=4, num_stages=3, target_programs=128)  # not measured separately


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QueryPrologue:
    """Queries handed to the kernel raw, as their projection gives them: the kernel itself makes them

        q = rope(rms_norm(q_raw) · norm)    rms_norm in float32 over H (rounded to the input dtype after the
                                             weight), rotate-half RoPE: channel j pairs with j + H/2

    so the two small kernels that would do it sit off a decode step's chain. norm [H]; cos, sin [B,T,H] (what
    the model's `rope_cos_sin` gives); eps static. Needs H ≥ 32 (each half feeds a dot of at least 16).
    """

    norm: jax.Array
    cos: jax.Array
    sin: jax.Array
    eps: float = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NewKey:
    """The step's own token's key and value, raw (as their projections give them, [B,1,K,H], or as the projections'
    unadded float32 K splits [S', R, K·H] whose first B rows are the sequences'), with the keys' norm weight [H]:
    the kernel attends to the token itself with k = rope(rms_norm(k) · norm) and v = rms_norm(v) (no weight; a layer
    whose values are its keys passes the raw keys again), eps and RoPE as its `QueryPrologue`'s. So the cache it
    reads need not hold the token yet: the kernel writes it into its slot itself (`slot` [B], the cache updated in
    place and returned), so no cache write sits between the projections and attention on a decode step's chain.
    One query token a sequence; in the cache given, the slot must be empty or hold a key outside the window (a ring
    buffer's oldest), and the cache must need no padding (`writes_in_place`)."""

    k: jax.Array
    v: jax.Array
    norm: jax.Array
    slot: jax.Array


def _splits(b: int, kh: int, s: int, h: int, dtype, config: DecodeConfig | None) -> tuple[int, int, int]:
    """(block_k, key splits, key blocks a split) of a call: the one rule the wrapper and `writes_in_place` share."""
    cfg = config or default_config(h, dtype)
    nk = -(-s // cfg.block_k)
    ns = num_splits(b, kh, nk, cfg.target_programs)
    return cfg.block_k, ns, -(-nk // ns)


def writes_in_place(b: int, kh: int, s: int, h: int, dtype, config: DecodeConfig | None = None) -> bool:
    """Whether a call over a cache of `s` slots reads the cache unpadded, so that a `NewKey` can be written into it
    in place (a padded copy would be written instead, and lost)."""
    bk, ns, per = _splits(b, kh, s, h, dtype, config)
    return h >= 32 and per * ns * bk == s


def _rounded(x, dtype):
    """To `dtype` and back to float32: the model rounds there (a projection, a norm, each of RoPE's ops)."""
    return x.astype(dtype).astype(jnp.float32)


def _rope_halves(x1, x2, cos1, cos2, sin1, sin2, dtype):
    """Rotate-half RoPE of a head's halves (float32, each product and sum rounded to `dtype` as the model's)."""
    return (_rounded(_rounded(x1 * cos1, dtype) - _rounded(x2 * sin1, dtype), dtype),
            _rounded(_rounded(x2 * cos2, dtype) + _rounded(x1 * sin2, dtype), dtype))


def _norm_rope(x1, x2, norm_ref, tables, eps: float, dtype):
    """rms_norm over a head's halves [R, H/2] (float32, the row's sum of squares), times the norm weight, rounded to
    `dtype`, then RoPE with `tables` (cos and sin halves, [R or 1, H/2]): the model's queries' and keys' math."""
    half = x1.shape[-1]
    inv = jax.lax.rsqrt((jnp.sum(x1 * x1, axis=-1, keepdims=True) + jnp.sum(x2 * x2, axis=-1, keepdims=True))
                        / (2 * half) + eps)
    y1, y2 = (_rounded(x * inv * norm_ref[pl.ds(i * half, half)].astype(jnp.float32)[None, :], dtype)
              for i, x in enumerate((x1, x2)))
    return _rope_halves(y1, y2, *tables, dtype)


def _new_key(k_ref, v_ref, norm_ref, cos_ref, sin_ref, eps: float):
    """The new token's normalised, rotated key halves [1, H/2] and normalised value [H], float32 (dtype-rounded),
    from its raw projections: refs of one head [H], or of its K splits [S', H] (added in split order, then rounded)."""
    dtype, h = cos_ref.dtype, k_ref.shape[-1]
    half = h // 2
    first, second = pl.ds(0, half), pl.ds(half, half)

    def vector(ref, c, n):
        if ref.ndim == 1:
            return ref[c].astype(jnp.float32)
        total = jax.lax.fori_loop(0, ref.shape[0], lambda sk, a: a + ref[sk, c].astype(jnp.float32),
                                  jnp.zeros((n,), jnp.float32))
        return _rounded(total, dtype)

    k1, k2 = (vector(k_ref, c, half)[None, :] for c in (first, second))
    tables = [ref[0, c].astype(jnp.float32)[None, :] for ref in (cos_ref, sin_ref) for c in (first, second)]  # row 0
    k1, k2 = _norm_rope(k1, k2, norm_ref, tables, eps, dtype)
    v = vector(v_ref, pl.ds(0, h), h)
    return (k1, k2), _rounded(v * jax.lax.rsqrt(jnp.sum(v * v) / h + eps), dtype)


def _queries(q_ref, valid, prologue_refs, eps: float):
    """This program's queries [Mp, H] as the kernel's dot takes them: loaded, or (with the prologue's norm, cos and
    sin refs) normalised and rotated in halves, returned as the two column halves (`sweep_keys` takes pieces). A
    q_ref of float32 K-split partials [S, Mp, H] is added up first (in split order) and rounded to the queries'
    dtype, as the projection would have returned them."""
    if prologue_refs is None:
        return plgpu.load(q_ref, mask=valid[:, None], other=0)
    norm_ref, cos_ref, sin_ref = prologue_refs
    dtype, h = cos_ref.dtype, q_ref.shape[-1]
    half = h // 2
    first, second = pl.ds(0, half), pl.ds(half, half)

    def load(c, sk=None):  # one indexer: Triton's lowering takes no view of a view
        view = q_ref.at[:, c] if sk is None else q_ref.at[sk, :, c]
        return plgpu.load(view, mask=valid[:, None], other=0).astype(jnp.float32)

    if q_ref.ndim == 3:  # the projection's K-split partials
        def add(sk, acc):
            return tuple(a + load(c, sk) for a, c in zip(acc, (first, second), strict=True))

        zero = jnp.zeros((q_ref.shape[1], half), jnp.float32)
        x1, x2 = (_rounded(x, dtype) for x in jax.lax.fori_loop(0, q_ref.shape[0], add, (zero, zero)))
    else:
        x1, x2 = load(first), load(second)
    tables = [ref[:, c].astype(jnp.float32) for ref in (cos_ref, sin_ref) for c in (first, second)]
    return tuple(x.astype(dtype) for x in _norm_rope(x1, x2, norm_ref, tables, eps, dtype))


def _decode_kernel(lo_ref, hi_ref, qpos_ref, kpos_ref, q_ref, *refs, scale: float, window: int | None, causal: bool,
                   block_k: int, rows: int, eps: float | None, new_key: bool, splits: int):
    # lo_ref, hi_ref: []          key-block range of this split (global block indices)
    # qpos_ref: [Mp]              position of each query row (−1: padding row)
    # kpos_ref: [S]               slot positions of this sequence's cache (−1: empty)
    # q_ref: [Mp, H]              rows = (token, head) pairs of this KV head's G query heads; the first `rows` exist
    #                             (the rest are masked: read as 0, never written — no padded copy of q in the step);
    #                             [S, Mp, H] float32 with a prologue over the projection's K-split partials
    # with a QueryPrologue (eps not None): norm_ref [H], cos_ref, sin_ref [Mp, H] (each row's token's)
    # with a NewKey: knew_ref, vnew_ref [H] (or their K splits [S', H]), knorm_ref [H], slot_ref [] (the token's
    # cache slot); then after the outputs k_out, v_out [S, H]: the cache itself (aliased to k_ref, v_ref)
    # k_ref, v_ref: [S, H]
    # o_ref: [Mp, H]              this split's normalised output (input dtype: half the bytes of float32)
    # m_ref, l_ref: [Mp]          this split's max score (base 2) and softmax denominator (float32)
    prologue_refs, refs = (refs[:3], refs[3:]) if eps is not None else (None, refs)
    new_refs, refs = (refs[:4], refs[4:]) if new_key else (None, refs)
    k_ref, v_ref, o_ref, m_ref, l_ref, *cache_out = refs
    mp = q_ref.shape[-2]
    valid = jax.lax.broadcasted_iota(jnp.int32, (mp,), 0) < rows
    q = _queries(q_ref, valid, prologue_refs, eps)
    qp = qpos_ref[...][:, None]
    qk_scale = scale * LOG2E
    acc, m_i, l_i = sweep_keys(q, qp, kpos_ref, k_ref, v_ref, lo_ref[()], hi_ref[()], qk_scale=qk_scale,
                               window=window, causal=causal, block_k=block_k)
    if new_key:  # the token's own key, in the last split alone: visible to each real row (its own position)
        def fold(state):
            acc, m_i, l_i = state
            (k1, k2), v_new = _new_key(*new_refs[:2], new_refs[2], *prologue_refs[1:], eps)
            # the token into its cache slot, in place (other splits may read the slot: its position masks it)
            k_out, v_out = cache_out
            slot, half = pl.ds(new_refs[3][()], 1), k1.shape[-1]
            k_out[slot, pl.ds(0, half)] = k1.astype(k_out.dtype)
            k_out[slot, pl.ds(half, half)] = k2.astype(k_out.dtype)
            v_out[slot, pl.ds(0, 2 * half)] = v_new[None, :].astype(v_out.dtype)
            s_new = (jnp.sum(q[0].astype(jnp.float32) * k1, axis=1)
                     + jnp.sum(q[1].astype(jnp.float32) * k2, axis=1)) * qk_scale
            seen = qpos_ref[...] >= 0
            s_new = jnp.where(seen, s_new, MASK_VALUE)
            m_next = jnp.maximum(m_i, s_new)
            alpha = jnp.exp2(m_i - m_next)
            p = jnp.where(seen, jnp.exp2(s_new - m_next), 0.0)
            # P·V takes p in V's dtype
            return acc * alpha[:, None] + _rounded(p, v_ref.dtype)[:, None] * v_new[None, :], m_next, alpha * l_i + p

        state = (acc, m_i, l_i)
        # the other splits skip the key's split sum, norm and RoPE (one split: no branch)
        acc, m_i, l_i = fold(state) if splits == 1 else jax.lax.cond(pl.program_id(0) == splits - 1, fold,
                                                                       lambda st: st, state)
    plgpu.store(o_ref, (acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]).astype(o_ref.dtype), mask=valid[:, None])
    plgpu.store(m_ref, m_i, mask=valid)
    plgpu.store(l_ref, l_i, mask=valid)


def num_splits(batch: int, kv_heads: int, key_blocks: int, target_programs: int) -> int:
    """A power of two dividing key_blocks' padded count: enough splits to fill the chip, no more."""
    want = max(1, -(-target_programs // (batch * kv_heads)))
    splits = 1
    while splits < want and splits * 2 <= key_blocks:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("scale", "window", "causal", "config", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                     scale: float = 1.0, window: int | None = None, causal: bool = True,
                     config: DecodeConfig | None = None, interpret: bool = False,
                     prologue: QueryPrologue | None = None, new_key: NewKey | None = None) -> jax.Array:
    """q [B,T,N,H] (T small) against a cache k, v [B,S,K,H] with slot positions k_pos [B,S]; returns [B,T,N,H].
    With `prologue`, q is the raw projection and the kernel normalises and rotates it first (`QueryPrologue`); q
    may then also be that projection's float32 K-split partials [S', R, N·H] (`gemv.gemv_parts`, T = 1, R ≥ B rows
    of which the first B are the sequences'), which the kernel adds up itself. With `new_key` (and a prologue, T = 1)
    the step's own token is attended from its raw key and value, not from the cache, and written into the cache in
    place (`NewKey`): the call then returns (o, k, v), the cache's new k and v."""
    b, s, kh, h = k.shape
    partials = q.ndim == 3
    if partials:
        assert prologue is not None and q.dtype == jnp.float32 and q.shape[1] >= b, (q.shape, b)
        t, n = 1, q.shape[2] // h
    else:
        t, n = q.shape[1], q.shape[2]
        assert q.shape == (b, t, n, h) and q.dtype == k.dtype, (q.shape, k.shape)
    assert k.shape == v.shape, (k.shape, v.shape)
    assert n % kh == 0 and h & (h - 1) == 0 and 16 <= h <= 512, (n, kh, h)
    assert k.dtype == v.dtype and q_pos.shape == (b, t) and k_pos.shape == (b, s)
    assert prologue is None or (h >= 32 and prologue.norm.shape == (h,)
                                and prologue.cos.shape == prologue.sin.shape == (b, t, h)), (h, prologue)
    assert new_key is None or (prologue is not None and t == 1 and new_key.norm.shape == (h,)), (t, new_key)
    g = n // kh
    cfg = config or default_config(h, k.dtype)
    bk, ns, per = _splits(b, kh, s, h, k.dtype, config)
    assert new_key is None or per * ns * bk == s, "a NewKey needs a cache that takes no padding (writes_in_place)"

    # Query rows r = t·G + g per KV head, in blocks of a power of two ≥ 16 (the dot's smallest M), masked past M.
    m = t * g
    mp = max(16, 1 << (m - 1).bit_length())
    if partials:  # [S', R, K, G, H], a bitcast; program (b, kh) reads row b's G heads of every split
        q_rows = q.reshape(q.shape[0], q.shape[1], kh, g, h)
        q_spec = pl.BlockSpec((q.shape[0], None, None, mp, h), lambda si, bi, hi_: (0, bi, hi_, 0, 0))
    else:
        q_rows = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, m, h)  # at t = 1 a bitcast
        q_spec = pl.BlockSpec((None, None, mp, h), lambda si, bi, hi_: (bi, hi_, 0, 0))
    qpos_rows = pad_axis(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), 1, mp, -1)  # [B, Mp]

    k_pos = pad_axis(k_pos.astype(jnp.int32), 1, bk, -1)
    kp, vp = pad_axis(k, 1, bk, 0), pad_axis(v, 1, bk, 0)
    # Pad the key blocks to ns·per so every split covers the same number of blocks.
    k_pos = pad_axis(k_pos, 1, per * ns * bk, -1)
    kp, vp = pad_axis(kp, 1, per * ns * bk, 0), pad_axis(vp, 1, per * ns * bk, 0)
    sp = kp.shape[1]
    vis = block_visibility(qpos_rows, k_pos, mp, bk, window, causal)[:, 0]  # [B, nk]
    lo, hi = ranges(vis.reshape(b, ns, per))  # [B, ns], within each split
    base = (jnp.arange(ns, dtype=jnp.int32) * per)[None, :]
    lo, hi = lo + base, jnp.where(hi > 0, hi + base, lo + base)

    extra_specs, extra = [], []
    if prologue is not None:  # each row's token's cos and sin (rows t·G + g), padded to Mp: off the step's chain
        def rows_of(x):
            return pad_axis(jnp.repeat(x, g, axis=1), 1, mp, 0)
        extra = [prologue.norm, rows_of(prologue.cos), rows_of(prologue.sin)]
        extra_specs = [pl.BlockSpec((h,), lambda si, bi, hi_: (0,))] + [
            pl.BlockSpec((None, mp, h), lambda si, bi, hi_: (bi, 0, 0))] * 2
    if new_key is not None:  # one head's raw key and value a program (or their K splits), read in place
        for x in (new_key.k, new_key.v):
            if x.ndim == 3:  # [S', R, K·H] -> [S', R, K, H]
                assert x.dtype == jnp.float32 and x.shape[1] >= b and x.shape[2] == kh * h, (x.shape, b)
                extra.append(x.reshape(x.shape[0], x.shape[1], kh, h))
                extra_specs.append(pl.BlockSpec((x.shape[0], None, None, h), lambda si, bi, hi_: (0, bi, hi_, 0)))
            else:  # [B, 1, K, H]
                assert x.shape == (b, 1, kh, h) and x.dtype == k.dtype, (x.shape, k.shape)
                extra.append(x)
                extra_specs.append(pl.BlockSpec((None, None, None, h), lambda si, bi, hi_: (bi, 0, hi_, 0)))
        extra += [new_key.norm, new_key.slot.astype(jnp.int32)]
        extra_specs += [pl.BlockSpec((h,), lambda si, bi, hi_: (0,)), pl.BlockSpec((None,), lambda si, bi, hi_: (bi,))]
    cache_spec = pl.BlockSpec((None, sp, None, h), lambda si, bi, hi_: (bi, 0, hi_, 0))  # k, v: read, and written
    kernel = functools.partial(_decode_kernel, scale=float(scale), window=window, causal=causal, block_k=bk,
                               rows=m, eps=None if prologue is None else float(prologue.eps),
                               new_key=new_key is not None, splits=ns)
    n_in = 7 + len(extra)
    o_part, m_part, l_part, *cache = pl.pallas_call(
        kernel,
        grid=(ns, b, kh),
        in_specs=[
            pl.BlockSpec((None, None), lambda si, bi, hi_: (bi, si)),  # lo
            pl.BlockSpec((None, None), lambda si, bi, hi_: (bi, si)),  # hi
            pl.BlockSpec((None, mp), lambda si, bi, hi_: (bi, 0)),  # q positions per row
            pl.BlockSpec((None, sp), lambda si, bi, hi_: (bi, 0)),  # k_pos
            q_spec,  # q rows
            *extra_specs,  # the prologue's norm, cos, sin; the new token's key, value, key norm
            cache_spec,  # k
            cache_spec,  # v
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, mp, h), lambda si, bi, hi_: (bi, hi_, si, 0, 0)),
            pl.BlockSpec((None, None, None, mp), lambda si, bi, hi_: (bi, hi_, si, 0)),
            pl.BlockSpec((None, None, None, mp), lambda si, bi, hi_: (bi, hi_, si, 0)),
            *([cache_spec] * 2 if new_key is not None else []),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, ns, m, h), k.dtype),
            jax.ShapeDtypeStruct((b, kh, ns, m), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, ns, m), jnp.float32),
            *([jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2 if new_key is not None else []),
        ],
        input_output_aliases={n_in - 2: 3, n_in - 1: 4} if new_key is not None else {},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lo, hi, qpos_rows, k_pos, q_rows, *extra, kp, vp)

    if ns == 1:  # one split's output is already normalised (0 where no key is visible): no combine kernel
        o = o_part[:, :, 0]
    else:  # log-sum-exp combine over splits (base 2, like the kernel's statistics): split s weighs l_s·2^(m_s − max)
        w = jnp.exp2(m_part - jnp.max(m_part, axis=2, keepdims=True)) * l_part  # [B, K, ns, M]; 0 for empty splits
        w_tot = jnp.sum(w, axis=2)
        o = jnp.einsum("bksm,bksmh->bkmh", w, o_part.astype(jnp.float32))
        o = (o / jnp.where(w_tot == 0.0, 1.0, w_tot)[..., None]).astype(k.dtype)
    o = o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)  # at t = 1 a bitcast
    return o if new_key is None else (o, *cache)


# The decode kernel's semantics are the prefill kernel's (positions decide everything): one reference, two names.
decode_attention_reference = flash_attention_reference
