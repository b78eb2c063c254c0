"""Skinny dense matmul for decode (Pallas, Triton backend), with its jnp reference.

    y [M,N] = x [M,K] @ W [K,N],   M ≤ GEMV_MAX_ROWS (a decode step's tokens), float32 accumulation
    [y_1, …, y_n] = rms_norm(x, g) @ [W_1, …, W_n]   (`gemv_many`: projections that share their input, one launch)

At batch 1, XLA's GPU compiler rewrites a vector × matrix product whose size is under its GEMM threshold as a
multiply-and-reduce over K (a column reduction when W is [K,N] with N minor), which streams the weight at
well under the HBM bandwidth (docs/kernels.md, "Skinny matmuls"). This kernel streams W once, in place:

  grid (N tiles, K splits): program (j, s) multiplies x's rows (a 16-row block, Triton's smallest dot) by the
  [K/S, block_n] slab of W in block_k steps and writes its float32 partial sum; with `split_k` S > 1 the
  partials are added in XLA (a tiny reduction that fuses with the cast). Splitting K gives enough programs to
  keep every SM streaming when N / block_n alone is too few.

`gemv_many` runs several weights that read the same x in one launch: the column tiles of all of them side by side
in the grid, each program streaming the one weight its tile belongs to. With a norm weight g it computes
rms_norm(x, g) @ W without a norm kernel of its own: the norm's per-row factor s = (mean(x²) + eps)^-½ is a scalar
of the row, so rms_norm(x, g) @ W = s · ((x ∘ g) @ W). Each program multiplies the x blocks it already loads by g
and adds up their squares on the way (no pass over x before the weight streams); the column-0 programs write those
partial sums of squares beside their partial products, and the XLA epilogue that adds the K splits multiplies by s.
At a decode step every launch costs a few µs of ramp and tail whatever it reads (docs/performance.md, "Where a
decode step's time goes"); an earlier version normalised the whole row in each program before streaming, which
doubled the queries' kernel time on an H200.

With `sum_in_kernel` (`gemv` only) the K splits are added in the kernel instead: each program stores its float32
partial product, then takes a ticket from its column tile's counter (an atomic add, acquire-release at GPU scope,
after a block barrier so that all its threads' stores are out); the program that draws the last ticket loads the
tile's S partials (ordered after the other programs' stores by the ticket's acquire) and writes their sum, in
split order, in x's dtype. The reduction kernel after the launch, one more kernel on a decode step's chain, is
gone; the sum is deterministic (a fixed order, not atomic adds of floats). The counters are a zeroed int32 input
aliased to an output, so every call starts from 0.

Block sizes must divide every N and K / split_k (powers of two ≥ 16): `default_config` picks them, `supports` says
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

from . import numerics
from .tiling import fit_block as _fit

F32 = jnp.float32
ROWS = 16  # x is padded to this many rows (Triton's dot needs at least 16)
GEMV_MAX_ROWS = ROWS  # the dispatcher sends products with at most this many rows here
# ... and weights of at most this many elements. One row: 12 Mi. The kernel beat XLA's reduction 2.4× on the
# smaller weights and matched cuBLAS on 26B-A4B's 2816 × 8192 (docs/kernels.md run 7), and XLA was 3 % faster on
# E2B's decode step with its 1536 × 12288 and 12288 × 1536 MLP weights (18.9 M elements) on
# cuBLAS (docs/performance.md, twelfth session). Two to 16 rows: 6 Mi. There E2B's step was 4 % faster with its
# 1536 × 6144 ones on cuBLAS too. With both limits, E2B's steps at batch 1 and 16 were 4.3 and 5.1 % shorter, and
# 26B-A4B's 0.5 and 1.2 % (its 2816 × 4096 and larger on cuBLAS). Larger weights stay on XLA, whose cuBLAS GEMV
# streamed 31B's at 4.26 TB/s.
GEMV_MAX_WEIGHT = 12 * 2**20
GEMV_MAX_WEIGHT_BATCHED = 6 * 2**20
# Aim for at least this many programs, so that every SM of an H100/H200 (132) streams part of W: first by
# narrowing the column tiles down to MIN_BLOCK_N, then by splitting K (whose partial sums cost an XLA reduction
# after the kernel, one more kernel on a decode step's critical path). Benches move both
# (`bench.py generate --gemv-target-programs/--gemv-min-block-n`).
TARGET_PROGRAMS = 264
MIN_BLOCK_N = 64
MAX_SPLIT_K = 64  # the most K splits (1: none, every partial sum folds into the cast that follows)


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


def fits(k: int, n: int, cfg: GemvConfig) -> bool:
    """Whether `cfg`'s blocks tile W [K,N]: powers of two ≥ 16, block_n dividing N, block_k dividing K / split_k."""
    def ok(b, dim):
        return b >= 16 and b & (b - 1) == 0 and dim % b == 0
    return k % cfg.split_k == 0 and ok(cfg.block_n, n) and ok(cfg.block_k, k // cfg.split_k)


def default_config(k: int, n: int, block_n: int = 64, block_k: int = 128) -> GemvConfig:
    """Block sizes for W [K,N]: column tiles narrowed (down to MIN_BLOCK_N) and then the fewest K splits that give
    TARGET_PROGRAMS programs, at most MAX_SPLIT_K (K / split_k must stay a multiple of block_k)."""
    bn, bk = _fit(n, block_n), _fit(k, block_k)
    while n // bn < TARGET_PROGRAMS and bn // 2 >= max(MIN_BLOCK_N, 16):
        bn //= 2
    tiles, steps = n // bn, k // bk
    split = 1
    for s in range(1, min(steps, MAX_SPLIT_K) + 1):
        if steps % s == 0:
            split = s
            if tiles * s >= TARGET_PROGRAMS:
                break
    return GemvConfig(block_n=bn, block_k=bk, split_k=split)


def _slab_product(x_ref, w_ref, nw_ref, valid, s, *, kc: int, block_k: int, block_n: int, nk: bool):
    """Split s's float32 partial product of x's 16-row block with the weight slab w_ref, in block_k steps (x's
    missing rows read as 0); with a norm weight nw_ref, of (x ∘ g) rounded to x's dtype, and also the sums of
    squares of x's rows over the split [16, 1]."""
    norm = nw_ref is not None

    def body(i, carry):  # carry: the partial product, and with a norm the sums of squares of x's rows
        k0 = pl.multiple_of(s * kc + i * block_k, block_k)
        xb = plgpu.load(x_ref.at[:, pl.ds(k0, block_k)], mask=valid, other=0)
        if norm:  # (x ∘ g) in float32, rounded to x's dtype; the squares of x on the way
            xf = xb.astype(F32)
            carry = carry[0], carry[1] + jnp.sum(xf * xf, axis=1, keepdims=True)
            xb = (xf * nw_ref[pl.ds(k0, block_k)].astype(F32)[None, :]).astype(x_ref.dtype)
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        return (carry[0] + numerics.kernel_dot(xb, w_ref[:, ks].T if nk else w_ref[ks, :]),) + carry[1:]

    zeros = (jnp.zeros((ROWS, block_n), F32),) + ((jnp.zeros((ROWS, 1), F32),) if norm else ())
    return lax.fori_loop(0, kc // block_k, body, zeros)


def _kernel(x_ref, *refs, block_k: int, rows: int, kc: int, tiles: tuple[int, ...], norm: bool, nk: bool):
    # x_ref [16, K]: a 16-row block of x, of which the first `rows` exist (the missing rows are masked: read as 0,
    # not written — no padded copy of x in the step). refs: the norm weight [K] (with `norm`), one weight slab
    # [K/S, bn] per weight ([bn, K/S] with `nk`), one float32 output block [16, bn] per weight, then (with `norm`)
    # a float32 [16, 16] block for the split's sums of squares of x's rows. Program (j, s) computes column tile j
    # of the concatenated outputs over depth split s: the weight whose tiles hold j, the others untouched.
    n = len(tiles)
    nw_ref = refs[0] if norm else None
    w_refs, o_refs = refs[norm:norm + n], refs[norm + n:norm + 2 * n]
    ss_ref = refs[-1] if norm else None
    valid = (lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) < rows)
    j, s = pl.program_id(0), pl.program_id(1)

    def run(w_ref, o_ref, first: bool):
        acc, *ss = _slab_product(x_ref, w_ref, nw_ref, valid, s, kc=kc, block_k=block_k, block_n=o_ref.shape[-1],
                                 nk=nk)
        plgpu.store(o_ref, acc, mask=valid)
        if norm and first:  # one program per split writes the split's sums of squares
            pl.when(j == 0)(lambda: plgpu.store(ss_ref, jnp.broadcast_to(ss[0], ss_ref.shape), mask=valid))

    start = 0
    for i, (w_ref, o_ref, t) in enumerate(zip(w_refs, o_refs, tiles, strict=True)):
        pl.when((j >= start) & (j < start + t))(functools.partial(run, w_ref, o_ref, i == 0))
        start += t


def _check(x, ws, cfg: GemvConfig, nk: bool):
    m, k = x.shape
    assert m <= ROWS, f"gemv takes at most {ROWS} rows, got {m}"
    for w in ws:
        assert w.ndim == 2 and w.shape[nk] == k, (x.shape, w.shape, nk)
        assert x.dtype == w.dtype, (x.dtype, w.dtype)
        assert fits(k, w.shape[1 - nk], cfg), f"{cfg} does not tile a [{k}, {w.shape[1 - nk]}] weight (`fits`)"


def supports_many(k: int, ns) -> bool:
    """Shapes `gemv_many` takes: K and every N divisible by a power of two ≥ 16."""
    return _fit(k, 16) > 0 and all(_fit(n, 16) > 0 for n in ns)


def default_config_many(k: int, ns, block_n: int = 64, block_k: int = 128) -> GemvConfig:
    """`default_config` over the weights side by side, with a column block that divides every N."""
    bn = min(_fit(n, block_n) for n in ns)
    return default_config(k, bn * sum(n // bn for n in ns), block_n=bn, block_k=block_k)


@functools.partial(jax.jit, static_argnames=("config", "eps", "interpret", "nk"))
def gemv_many(x: jax.Array, ws, norm_weight: jax.Array | None = None, *, eps: float = 1e-6,
              config: GemvConfig | None = None, interpret: bool = False, nk: bool = False) -> list[jax.Array]:
    """[x @ w for w in ws] in one kernel launch (x [M ≤ 16, K], each w [K, N_i]; float32 accumulation; each result
    [M, N_i] in x's dtype). With `norm_weight` g [K], each result is rms_norm(x, g) @ w, computed as
    s · ((x ∘ g) @ w) with the row factor s = (mean(x²) + eps)^-½ in float32 (x ∘ g rounded to x's dtype for the
    product): the projections that follow a norm, with no norm kernels of their own. `nk`: each w is stored
    [N_i, K] (a checkpoint's [out, in]; K minor) and used as its transpose."""
    ws = list(ws)
    k = x.shape[1]
    cfg = config or default_config_many(k, [w.shape[0 if nk else 1] for w in ws])
    parts = _launch(x, ws, norm_weight, cfg, interpret, nk)
    if norm_weight is None:
        return [jnp.sum(p, axis=0).astype(x.dtype) for p in parts]
    *parts, ss = parts
    scale = jnp.power(jnp.sum(ss[:, :, :1], axis=0) / k + eps, -0.5)  # [M, 1], as `model.rms_norm` (float32)
    return [(jnp.sum(p, axis=0) * scale).astype(x.dtype) for p in parts]


def _launch(x, ws, norm_weight, cfg: GemvConfig, interpret: bool, nk: bool) -> list[jax.Array]:
    """The kernel's float32 outputs: each weight's partial products [S, M, N_i], then (with a norm weight) the
    splits' sums of squares of x's rows [S, M, 16]."""
    m, k = x.shape
    ns = [w.shape[0 if nk else 1] for w in ws]
    _check(x, ws, cfg, nk)
    s, kc, bn = cfg.split_k, k // cfg.split_k, cfg.block_n
    tiles = tuple(n // bn for n in ns)
    starts = [sum(tiles[:i]) for i in range(len(tiles))]

    def column(i):  # weight i's tile for program column j (clamped: programs of other weights never touch it)
        if nk:
            return lambda j, sp: (jnp.clip(j - starts[i], 0, tiles[i] - 1), sp)
        return lambda j, sp: (sp, jnp.clip(j - starts[i], 0, tiles[i] - 1))

    def out_column(i):
        return lambda j, sp: (sp, 0, jnp.clip(j - starts[i], 0, tiles[i] - 1))

    norm = norm_weight is not None
    in_specs = [pl.BlockSpec((ROWS, k), lambda j, sp: (0, 0))]
    args = [x]
    if norm:
        in_specs.append(pl.BlockSpec((k,), lambda j, sp: (0,)))
        args.append(norm_weight)
    in_specs += [pl.BlockSpec((bn, kc) if nk else (kc, bn), column(i)) for i in range(len(ws))]
    out_specs = [pl.BlockSpec((None, ROWS, bn), out_column(i)) for i in range(len(ws))]
    out_shape = [jax.ShapeDtypeStruct((s, m, n), F32) for n in ns]
    if norm:  # each split's sums of squares of x's rows (written by its column-0 program, read at column 0)
        out_specs.append(pl.BlockSpec((None, ROWS, ROWS), lambda j, sp: (sp, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((s, m, ROWS), F32))
    return pl.pallas_call(
        functools.partial(_kernel, block_k=cfg.block_k, rows=m, kc=kc, tiles=tiles, norm=norm, nk=nk),
        grid=(sum(tiles), s),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=("rmsnorm_" if norm else "") + "gemv_" + "_".join(f"{k}x{n}" for n in ns),  # profiles tell them apart
    )(*args, *ws)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "nk", "sum_in_kernel"))
def gemv(x: jax.Array, w: jax.Array, *, config: GemvConfig | None = None, interpret: bool = False,
         nk: bool = False, sum_in_kernel: bool = False) -> jax.Array:
    """x [M,K] @ w [K,N] for M ≤ 16 rows (`nk`: w stored [N,K]); float32 accumulation; returns [M,N] in x's
    dtype. `sum_in_kernel`: the K splits added by each column tile's last program (the module's docstring), not by
    an XLA reduction after the launch."""
    if sum_in_kernel:
        k, n = w.shape[::-1] if nk else w.shape
        return _launch_summed(x, w, config or default_config(k, n), interpret, nk)
    return add_parts(gemv_parts(x, w, config=config, interpret=interpret, nk=nk), x.dtype)


def add_parts(parts: jax.Array, dtype) -> jax.Array:
    """The product from `gemv_parts`' float32 partials [S, M, N]: their sum, in `dtype` (what `gemv` returns)."""
    return jnp.sum(parts, axis=0).astype(dtype)


def _summed_kernel(x_ref, w_ref, count_ref, o_ref, parts_ref, count_out_ref, *, block_k: int, rows: int, kc: int,
                   splits: int, block_n: int, nk: bool, barrier: bool):
    # x_ref [16, K] (rows beyond `rows` masked), w_ref one [K/S, bn] slab ([bn, K/S] with `nk`); count_ref /
    # count_out_ref the column tiles' ticket counters [tiles] (one buffer, aliased); o_ref the [16, bn] output
    # block in x's dtype; parts_ref the whole float32 [S, 16, N] scratch of partial products.
    del count_ref  # the same buffer as count_out_ref
    valid = (lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) < rows)
    j, s = pl.program_id(0), pl.program_id(1)

    (acc,) = _slab_product(x_ref, w_ref, None, valid, s, kc=kc, block_k=block_k, block_n=block_n, nk=nk)
    if splits == 1:  # nothing to add: the product is the result
        plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=valid)
        return
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    plgpu.store(parts_ref.at[s, :, cols], acc)
    if barrier:  # every thread's part of the store out before the ticket releases it (interpret mode: one thread)
        plgpu.debug_barrier()
    ticket = plgpu.atomic_add(count_out_ref, j, jnp.ones((), jnp.int32))

    @pl.when(ticket == splits - 1)
    def _():  # the last of the tile's programs: every other split's partial is out
        total = parts_ref[jnp.int32(0), :, cols]
        for t in range(1, splits):  # unrolled (S ≤ MAX_SPLIT_K), so the loads need not wait for the adds
            total = total + parts_ref[jnp.int32(t), :, cols]
        plgpu.store(o_ref, total.astype(o_ref.dtype), mask=valid)


def _launch_summed(x, w, cfg: GemvConfig, interpret: bool, nk: bool) -> jax.Array:
    """`gemv` with the K splits added in the kernel: [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0 if nk else 1]
    _check(x, [w], cfg, nk)
    s, kc, bn = cfg.split_k, k // cfg.split_k, cfg.block_n
    tiles = n // bn
    w_spec = (pl.BlockSpec((bn, kc), lambda j, sp: (j, sp)) if nk
              else pl.BlockSpec((kc, bn), lambda j, sp: (sp, j)))
    out, _, _ = pl.pallas_call(
        functools.partial(_summed_kernel, block_k=cfg.block_k, rows=m, kc=kc, splits=s, block_n=bn, nk=nk,
                          barrier=not interpret),
        grid=(tiles, s),
        in_specs=[pl.BlockSpec((ROWS, k), lambda j, sp: (0, 0)), w_spec, pl.BlockSpec()],
        out_specs=[pl.BlockSpec((ROWS, bn), lambda j, sp: (0, j)), pl.BlockSpec(), pl.BlockSpec()],
        out_shape=[jax.ShapeDtypeStruct((m, n), x.dtype), jax.ShapeDtypeStruct((s, ROWS, n), F32),
                   jax.ShapeDtypeStruct((tiles,), jnp.int32)],
        input_output_aliases={2: 2},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"summed_gemv_{k}x{n}",  # profiles tell it from the split launch
    )(x, w, jnp.zeros((tiles,), jnp.int32))
    return out


@functools.partial(jax.jit, static_argnames=("config", "interpret", "nk"))
def gemv_parts(x: jax.Array, w: jax.Array, *, config: GemvConfig | None = None, interpret: bool = False,
               nk: bool = False) -> jax.Array:
    """`gemv`'s float32 partial products [S, M, N] over its S K-splits, not yet added: for a consumer that adds
    them itself (`add_norm.add_norm`), sparing the reduction kernel between them."""
    k, n = w.shape[::-1] if nk else w.shape
    return _launch(x, [w], None, config or default_config(k, n), interpret, nk)[0]


def gemv_reference(x: jax.Array, w: jax.Array, *, precision=None) -> jax.Array:
    """Plain jnp: float32 accumulation, the result in x's dtype."""
    return jnp.dot(x, w, preferred_element_type=F32, precision=precision).astype(x.dtype)
