"""A mixture-of-experts router's top-k at a decode step (Pallas, Triton backend), with its jnp reference.

    logits [M,E] = Σ_s parts[s]  (a skinny matmul's K-split partial products, `gemv.gemv_parts`), rounded to the
                   model's dtype as the model rounds its projection
    idx [M,k]    = the k largest logits of each row (ties: the lower expert first, as `lax.top_k`)
    w [M,k]      = softmax over those k logits · scale[idx]          (float32)
    table [4,E]  = per expert e: [e if some row chose it else −1, e, 0, M]  (`moe_mgpu.token_table`)

At a decode step these are a chain of small XLA kernels between the router's projection and the experts: the
splits' sum, the top-k, the softmax and scale, and the token table that the Mosaic experts' token tiles read. Each
costs a launch on the step's critical path (docs/performance.md, "26B-A4B with the MoE kernels", ninth session).
This kernel is one program that does all of it for up to 16 rows: it adds the splits it reads from L2, picks the k
largest by k rounds of a row maximum, and marks the chosen experts for the table on the way. Rows beyond M are
masked: read as 0, never written, never counted in the table.

Measured on an H200 it was slower than the chain it replaces (26B-A4B batch 16 +1.8 %, batch 1 +3.8 %: one program
doing the serial work is longer than three small kernels), so `dispatch.ROUTER_KERNEL` leaves it off; benches turn
it on with `bench.py generate --router-kernel`.

The math is the model's router (`gemma4_jax.model.text.MoE.route`: the top k of the logits, the softmax over
them, the per-expert scale), which is this kernel's reference with `route_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
ROWS = 16  # rows per launch (the skinny matmul's row block)


def supports(rows: int, experts: int, k: int) -> bool:
    """Whether the kernel takes a router of `experts` outputs choosing `k`, for `rows` rows (Triton's tensors are
    powers of two)."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0

    return 1 <= rows <= ROWS and pow2(experts) and pow2(k) and k <= experts


def _kernel(parts_ref, scale_ref, w_ref, idx_ref, table_ref, *, splits: int, rows: int, top_k: int, dtype):
    # parts_ref [S, 16, E] (rows ≥ M masked), scale_ref [E]; w_ref, idx_ref [16, k] (rows ≥ M not written);
    # table_ref [4, E].
    e = parts_ref.shape[-1]
    valid = lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) < rows
    acc = lax.fori_loop(0, splits, lambda s, a: a + plgpu.load(parts_ref.at[s], mask=valid, other=0.0),
                        jnp.zeros((ROWS, e), F32))
    cur = acc.astype(dtype).astype(F32)  # the projection's rounding
    cols = lax.broadcasted_iota(jnp.int32, (ROWS, e), 1)
    kcols = lax.broadcasted_iota(jnp.int32, (ROWS, top_k), 1)
    scale = scale_ref[...].astype(F32)[None, :]
    top = jnp.zeros((ROWS, top_k), F32)
    ids = jnp.zeros((ROWS, top_k), jnp.int32)
    sc = jnp.zeros((ROWS, top_k), F32)
    taken = jnp.zeros((ROWS, e), jnp.int32)
    for j in range(top_k):
        mx = jnp.max(jnp.where(taken > 0, -jnp.inf, cur), axis=1, keepdims=True)
        # the lowest expert among the row's maxima not yet taken (clamped: a NaN row still names an expert)
        pos = jnp.min(jnp.where((cur == mx) & (taken == 0), cols, e), axis=1, keepdims=True)
        pos = jnp.minimum(pos, e - 1)
        hit = cols == pos
        top = jnp.where(kcols == j, mx, top)
        ids = jnp.where(kcols == j, pos, ids)
        sc = jnp.where(kcols == j, jnp.sum(jnp.where(hit, scale, 0.0), axis=1, keepdims=True), sc)
        taken = jnp.where(hit, 1, taken)
    ex = jnp.exp(top - jnp.max(top, axis=1, keepdims=True))
    w = ex / jnp.sum(ex, axis=1, keepdims=True) * sc
    plgpu.store(w_ref, w, mask=valid)
    plgpu.store(idx_ref, ids, mask=valid)
    used = jnp.max(jnp.where(valid, taken, 0), axis=0, keepdims=True)  # [1, E]: some real row chose it
    r = lax.broadcasted_iota(jnp.int32, (4, e), 0)
    c = lax.broadcasted_iota(jnp.int32, (4, e), 1)
    table_ref[...] = jnp.where(r == 0, jnp.where(used > 0, c, -1), jnp.where(r == 1, c, jnp.where(r == 2, 0, rows)))


@functools.partial(jax.jit, static_argnames=("top_k", "dtype", "interpret"))
def route(parts: jax.Array, scale: jax.Array, *, top_k: int, dtype=jnp.bfloat16,
          interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """parts [S, M, E] (float32 partial products of the router's projection), scale [E] → (w [M,k] float32,
    idx [M,k] int32, table [4,E] int32); the logits are rounded to `dtype` first."""
    s, m, e = parts.shape
    assert supports(m, e, top_k), (parts.shape, top_k)
    return pl.pallas_call(
        functools.partial(_kernel, splits=s, rows=m, top_k=top_k, dtype=jnp.dtype(dtype)),
        grid=(1,),
        in_specs=[pl.BlockSpec((s, ROWS, e), lambda i: (0, 0, 0)), pl.BlockSpec((e,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((ROWS, top_k), lambda i: (0, 0)), pl.BlockSpec((ROWS, top_k), lambda i: (0, 0)),
                   pl.BlockSpec((4, e), lambda i: (0, 0))],
        out_shape=[jax.ShapeDtypeStruct((m, top_k), F32), jax.ShapeDtypeStruct((m, top_k), jnp.int32),
                   jax.ShapeDtypeStruct((4, e), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),  # the splits' loads pipelined
        interpret=interpret,
        name=f"router_top{top_k}_of_{e}",
    )(parts.astype(F32), scale)


def route_reference(logits: jax.Array, scale: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Plain jnp from the (rounded) logits [M,E]: (w [M,k] float32, idx [M,k]) — the model's router math."""
    top, idx = lax.top_k(logits.astype(F32), top_k)
    return jax.nn.softmax(top, axis=-1) * scale[idx].astype(F32), idx
