"""Skinny dense matmul for decode (Pallas, Triton backend), with its jnp reference.

    y [M,N] = x [M,K] @ W [K,N],   M ≤ GEMV_MAX_ROWS (a decode step's tokens), float32 accumulation

At batch 1, XLA's GPU compiler rewrites a vector × matrix product whose size is under its GEMM threshold as a
multiply-and-reduce over K (a column reduction when W is [K,N] with N minor), which streams the weight at
well under the HBM bandwidth (docs/kernels.md, "Skinny matmuls"). This kernel streams W once, in place:

  grid (N tiles, K splits): program (j, s) multiplies x's rows (a 16-row block, Triton's smallest dot) by the
  [K/S, block_n] slab of W in block_k steps and writes its float32 partial sum; with `split_k` S > 1 the
  partials are added in XLA (a tiny reduction that fuses with the cast). Splitting K gives enough programs to
  keep every SM streaming when N / block_n alone is too few.

Block sizes must divide N and K / split_k (powers of two ≥ 16): `default_config` picks them, `supports` says
whether a shape can run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tiling import fit_block as _fit

F32 = jnp.float32
ROWS = 16  # x is padded to this many rows (Triton's dot needs at least 16)
GEMV_MAX_ROWS = ROWS  # the dispatcher sends products with at most this many rows here
# ... and weights of at most this many elements: the largest measured (26B-A4B's 2816 × 8192, where the kernel
# matched cuBLAS and the smaller ones beat XLA's reduction 2.4×, docs/kernels.md run 7). Larger weights stay on
# XLA, whose cuBLAS GEMV streamed 31B's at 4.26 TB/s.
GEMV_MAX_WEIGHT = 24 * 2**20
# Aim for at least this many programs, so that every SM of an H100/H200 (132) streams part of W.
TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """block_n: W columns per program; block_k: depth per step; split_k: K chunks run by separate programs."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def supports(k: int, n: int) -> bool:
    """Shapes the kernel takes: K and N each divisible by a power of two ≥ 16."""
    return _fit(k, 16) > 0 and _fit(n, 16) > 0


def default_config(k: int, n: int, block_n: int = 64, block_k: int = 128) -> GemvConfig:
    """Block sizes for W [K,N]: the fewest K splits that give TARGET_PROGRAMS programs (K / split_k must stay a
    multiple of block_k)."""
    bn, bk = _fit(n, block_n), _fit(k, block_k)
    tiles, steps = n // bn, k // bk
    split = 1
    for s in range(1, steps + 1):
        if steps % s == 0:
            split = s
            if tiles * s >= TARGET_PROGRAMS:
                break
    return GemvConfig(block_n=bn, block_k=bk, split_k=split)


def _dot(a, b):
    """float32 accumulation; float32 operands at full precision (IEEE, never TF32)."""
    return plgpu.dot(a, b, precision=lax.Precision.HIGHEST if a.dtype == F32 else None)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, rows: int):
    # x_ref [16, K/S]: a 16-row block of x, of which the first `rows` exist; w_ref [K/S, bn];
    # o_ref [16, bn] float32, likewise only `rows` rows stored. The missing rows are masked (read as 0, not
    # written): no padded copy of x in the step.
    valid = (lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) < rows)

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        xb = plgpu.load(x_ref.at[:, ks], mask=valid, other=0)
        return acc + _dot(xb, w_ref[ks, :])

    acc = lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros(o_ref.shape, F32))
    plgpu.store(o_ref, acc, mask=valid)


def _check(x, w, cfg: GemvConfig):
    m, k = x.shape
    assert w.ndim == 2 and w.shape[0] == k, (x.shape, w.shape)
    assert m <= ROWS, f"gemv takes at most {ROWS} rows, got {m}"
    assert x.dtype == w.dtype, (x.dtype, w.dtype)
    n = w.shape[1]
    assert k % cfg.split_k == 0, (k, cfg.split_k)
    for dim, b in ((n, cfg.block_n), (k // cfg.split_k, cfg.block_k)):
        assert b >= 16 and b & (b - 1) == 0 and dim % b == 0, f"block {b} must be a power of two ≥ 16 dividing {dim}"


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gemv(x: jax.Array, w: jax.Array, *, config: GemvConfig | None = None, interpret: bool = False) -> jax.Array:
    """x [M,K] @ w [K,N] for M ≤ 16 rows; float32 accumulation; returns [M,N] in x's dtype."""
    m, k = x.shape
    n = w.shape[1]
    cfg = config or default_config(k, n)
    _check(x, w, cfg)
    s, kc = cfg.split_k, k // cfg.split_k
    part = pl.pallas_call(
        functools.partial(_kernel, block_k=cfg.block_k, rows=m),
        grid=(n // cfg.block_n, s),
        in_specs=[pl.BlockSpec((ROWS, kc), lambda j, i: (0, i)), pl.BlockSpec((kc, cfg.block_n), lambda j, i: (i, j))],
        out_specs=pl.BlockSpec((None, ROWS, cfg.block_n), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, m, n), F32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"gemv_{k}x{n}",  # one name per shape: profiles tell the projections apart
    )(x, w)
    return jnp.sum(part, axis=0).astype(x.dtype)


def gemv_reference(x: jax.Array, w: jax.Array, *, precision=None) -> jax.Array:
    """Plain jnp: float32 accumulation, the result in x's dtype."""
    return jnp.dot(x, w, preferred_element_type=F32, precision=precision).astype(x.dtype)
