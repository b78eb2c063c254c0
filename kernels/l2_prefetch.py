"""Weights read into the GPU's L2 cache ahead of the projection that needs them (Pallas, Triton backend).

A decode step at a few rows is a chain of dependent kernels (docs/performance.md, "Where a decode step's time
goes"): between its projections run norms, RoPE, attention and residuals of 1–4 µs each, during which HBM is
almost idle, and every projection then starts cold, streaming its weight from HBM. This kernel reads the next
weights while that chain runs, so that the projection finds (part of) them in L2 (50 MB on an H100 or H200).

    out [P] = the largest value each program read (float32)

Program p reads its share of each weight's first `counts[i]` elements (a contiguous range per weight, in
`block`-element loads, by default marked evict-last: `EVICTION`), `loads` of them issued together before any is
used, so that a program has that many in flight (`LOADS`; with one, a program waits out each load's latency before
the next, and the whole kernel read E2B's 25 MB in about 35 µs on an H100, 0.7 TB/s). Its output matters only as a
dependency: the caller ties it to a later result of the step (`model.after`), so XLA keeps the kernel, and takes
nothing from its value. A weight is read flat, in the order it lies in memory: a prefix of it is the first rows of
the matrix the projection streams.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
BLOCK = 8192  # elements a program loads at once (16 KB of bf16: 32 per thread at 8 warps)
PROGRAMS = 132  # one per SM of an H100/H200; each shares its SM with the step's own kernels
LOADS = 1  # blocks a program loads together per loop step (its loads in flight); 2 and 4 were within noise (H100)
NUM_WARPS = 8
# Triton's hint on every load. On sm_80 and later 'evict_last' becomes an L2 cache policy as well
# (`createpolicy.fractional.L2::evict_last`): the lines stay while lines loaded without it are evicted first.
EVICTION = "evict_last"
EVICTIONS = ("evict_last", "evict_normal", "evict_first")


def shares(counts: tuple[int, ...], programs: int, block: int) -> tuple[int, ...]:
    """Elements each program reads of each weight: a whole number of blocks, enough that `programs` of them
    cover the weight's count."""
    return tuple(math.ceil(math.ceil(c / programs) / block) * block for c in counts)


def budget_counts(sizes: list[int], itemsize: int, budget_bytes: int) -> tuple[int, ...]:
    """How many leading elements of each weight fit a budget of bytes, taken in order: the whole of each until
    the budget runs out, then a prefix of one, then none."""
    counts, left = [], budget_bytes // itemsize
    for n in sizes:
        counts.append(min(n, left))
        left -= counts[-1]
    return tuple(counts)


def _kernel(start_ref, *refs, counts: tuple[int, ...], share: tuple[int, ...], block: int, loads: int, eviction: str):
    del start_ref  # an input only so that the launch waits for it
    ws, o_ref = refs[:-1], refs[-1]
    p = pl.program_id(0)
    acc = jnp.full((block,), -jnp.inf, F32)
    for w_ref, count, per in zip(ws, counts, share, strict=True):
        if not count:
            continue
        def step(j, acc, w_ref=w_ref, count=count, per=per):
            tiles = []
            for i in range(loads):  # all issued before the first is used: `loads` in flight
                first = p * per + (j * loads + i) * block
                tiles.append(plgpu.load(w_ref.at[pl.ds(first, block)], mask=first + jnp.arange(block) < count,
                                        other=-jnp.inf, eviction_policy=eviction))
            for tile in tiles:
                acc = jnp.maximum(acc, tile.astype(F32))
            return acc

        acc = lax.fori_loop(0, per // (block * loads), step, acc)
    o_ref[p] = jnp.max(acc)


@functools.partial(jax.jit, static_argnames=("counts", "programs", "block", "loads", "eviction", "interpret"))
def prefetch(ws: list[jax.Array], start: jax.Array, *, counts: tuple[int, ...] | None = None,
             programs: int = PROGRAMS, block: int = BLOCK, loads: int = LOADS, eviction: str = EVICTION,
             interpret: bool = False) -> jax.Array:
    """Read the first `counts[i]` elements of each weight in `ws` (all of them by default) into L2, once `start`
    is computed, with Triton's `eviction` hint ('evict_last', 'evict_normal' or 'evict_first'), `loads` blocks of
    a program in flight at once. Returns [programs] float32, each program's largest value read (−inf where it read
    nothing)."""
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
    if loads < 1:
        raise ValueError(f"loads must be at least 1, got {loads}")
    if counts is None:
        counts = tuple(w.size for w in ws)
    if len(counts) != len(ws) or any(not 0 <= c <= w.size for c, w in zip(counts, ws, strict=True)):
        raise ValueError(f"counts {counts} do not fit weights of {[w.size for w in ws]} elements")
    share = shares(counts, programs, block * loads)  # whole loop steps of `loads` blocks
    # Flat views of the weights in place (a reshape, no copy); loads past a weight's count are masked out.
    flat = [w.reshape(-1) for w in ws]
    return pl.pallas_call(
        functools.partial(_kernel, counts=counts, share=share, block=block, loads=loads, eviction=eviction),
        grid=(programs,),
        in_specs=[pl.BlockSpec() for _ in range(1 + len(flat))],  # whole arrays (pointers)
        out_specs=pl.BlockSpec(),
        out_shape=jax.ShapeDtypeStruct((programs,), F32),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="l2_prefetch_" + "_".join(str(c) for c in counts),
    )(start, *flat)

