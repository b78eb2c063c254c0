"""A projection's K-split partials added, normalised, added to the residual stream, and the result normalised
again, in one kernel (Pallas, Triton backend). Its reference is the model's own arithmetic (`model.rms_norm`
around a residual add: tests/test_add_norm.py).

    y = Σ_s parts[s]                      (the skinny matmul's float32 partials, `gemv.gemv_parts`), in x's dtype
    x' = x + rms_norm(y, post)            the residual stream after a block (x's dtype, as the model rounds it)
    a  = rms_norm(x', nxt)                the next block's input

At a decode step these are three to five small kernels in a chain that nothing else runs beside (XLA does not fuse
a reduction into the reduction that consumes it: the split-K sum, the first norm, the residual add, the second
norm): each costs its launch's ramp and tail whatever it reads (docs/performance.md, "Where a decode step's time
goes"). Here one program per row reads its partials once and keeps the row in registers, in pieces of a power of
two (Triton's loads) that divide the width.

The arithmetic is `model.rms_norm`'s, rounded where the model rounds: the sum to x's dtype, the normalised
block output to x's dtype, the residual sum to x's dtype, the second norm's output to x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tiling import fit_block

F32 = jnp.float32
PIECE = 512  # the widest piece of a row one load takes


def supports(d: int) -> bool:
    """Widths the kernel takes: divisible by a power of two ≥ 16."""
    return fit_block(d, PIECE) > 0


def _kernel(p_ref, x_ref, post_ref, nxt_ref, xo_ref, ao_ref, *, splits: int, width: int, piece: int, eps: float):
    # p_ref [S, D] (this row's partials), x_ref / xo_ref / ao_ref [D], post_ref / nxt_ref [D].
    dtype = x_ref.dtype
    cuts = [pl.ds(c * piece, piece) for c in range(width // piece)]

    def rms_scale(sum_sq):
        return lax.rsqrt(sum_sq / width + eps)

    ys, ss = [], jnp.zeros((), F32)
    for cut in cuts:
        acc = lax.fori_loop(0, splits, lambda i, a, cut=cut: a + p_ref[i, cut], jnp.zeros((piece,), F32))
        y = acc.astype(dtype).astype(F32)
        ys.append(y)
        ss = ss + jnp.sum(y * y)
    r = rms_scale(ss)
    xs, ss = [], jnp.zeros((), F32)
    for cut, y in zip(cuts, ys, strict=True):
        h = (y * r * post_ref[cut].astype(F32)).astype(dtype)
        xn = (x_ref[cut].astype(F32) + h.astype(F32)).astype(dtype)
        xo_ref[cut] = xn
        xf = xn.astype(F32)
        xs.append(xf)
        ss = ss + jnp.sum(xf * xf)
    r = rms_scale(ss)
    for cut, xf in zip(cuts, xs, strict=True):
        ao_ref[cut] = (xf * r * nxt_ref[cut].astype(F32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_norm(parts: jax.Array, x: jax.Array, post: jax.Array, nxt: jax.Array, *, eps: float,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x + rms_norm(Σ_s parts[s], post), rms_norm(that, nxt)) for parts [S, M, D] float32, x [M, D], post and
    nxt [D]; both results [M, D] in x's dtype."""
    s, m, d = parts.shape
    assert x.shape == (m, d) and post.shape == nxt.shape == (d,), (parts.shape, x.shape, post.shape, nxt.shape)
    piece = fit_block(d, PIECE)
    assert piece, f"width {d} is not divisible by a power of two ≥ 16"
    row = pl.BlockSpec((None, d), lambda r: (r, 0))
    vec = pl.BlockSpec((d,), lambda r: (0,))
    return pl.pallas_call(
        functools.partial(_kernel, splits=s, width=d, piece=piece, eps=eps),
        grid=(m,),
        in_specs=[pl.BlockSpec((s, None, d), lambda r: (0, r, 0)), row, vec, vec],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((m, d), x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"add_rms_norm_{d}",
    )(parts, x, post, nxt)

