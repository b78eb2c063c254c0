"""Routed experts of a mixture-of-experts FFN (Pallas, Triton backend), with its jnp reference.

    out[m] = Σ_j w[m,j] · ( gelu_tanh(x[m] G_eᵀ) * (x[m] U_eᵀ) ) D_eᵀ,    e = idx[m,j]
    x [M,D], idx/w [M,k], G and U [E,F,D], D [E,D,F]        (R = M·k routed rows)

The expert weights are read in place, in the layout the model holds them, which is the checkpoint's (each
expert's matrix [out, in], the contracted axis minor): nothing is transposed, gathered or copied per call.
That layout also streams faster than [in, out] at decode (docs/kernels.md, "MoE experts": a program's tile is
block_n rows of contiguous block_k-element runs). The work is a grouped matmul over *blocks*: a block is up to
`block_m` routed rows that all go to one expert. A `BlockPlan` lists each block's expert and rows:

  'rows'   (few rows, decode): every routed row is its own block. No sort; each program reads one chosen
           expert's weight tile, so a step reads exactly the routed experts once per row.
  'sorted' (many rows): rows sorted by expert (a counting sort in XLA) and cut into blocks of block_m, each
           expert's last block padded. Blocks of one expert are adjacent, and the grid runs a block's
           column tiles side by side, so an expert's weights stream from memory about once per call.

Two kernels, both over the grid (column tile, block) with the column tile fastest:
  gate_up: h[block rows] = gelu_tanh(x[tokens] G_e) * (x[tokens] U_e), both products from one x tile, the
           GELU product fused; x rows are gathered by index inside the kernel; float32 accumulation,
           h stored in x's dtype (as the model rounds it before the down projection).
  down:    y[block rows] = w[row] · (h D_e) in float32, the routing weight applied in the epilogue.
Then the combine in XLA: out[m] = Σ_j y[position of (m, j)], summed in float32 and cast to x's dtype.

Unused blocks (the plan's static upper bound exceeds what the routing fills) are skipped: their outputs
are never written and never read. Padding rows of a used block compute on token 0 and are never read.
Block sizes must divide D and F (powers of two, at least 16: Triton's dot): `supports` says whether a
shape can run, `default_config` picks the sizes.
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


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Tuning knobs (hashable: a static argument of the jitted entry point).

    plan: 'rows' (one row a block) or 'sorted' (rows grouped by expert, block_m a block);
    block_m: rows per block (≥ 16: Triton's dot; 'rows' blocks hold one valid row and pad the rest);
    block_n_up / block_k_up: F columns and D depth per step of the gate_up kernel;
    block_n_down / block_k_down: D columns and F depth per step of the down kernel.
    """

    plan: str = "sorted"
    block_m: int = 64
    block_n_up: int = 64
    block_k_up: int = 64
    block_n_down: int = 128
    block_k_down: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Below this many routed rows (tokens × top-k) the 'rows' plan is used: no sort, one row a block.
ROWS_PLAN_MAX = 16


def default_config(rows: int, d: int, f: int) -> MoeConfig:
    """Block sizes for R routed rows and an expert of width D → F → D (see docs/kernels.md for the sweep)."""
    if rows <= ROWS_PLAN_MAX:
        plan, bm, n_up, k_up, n_dn, k_dn, warps, stages = "rows", 16, 32, 128, 64, 64, 4, 4
    elif rows <= 512:
        plan, bm, n_up, k_up, n_dn, k_dn, warps, stages = "sorted", 16, 32, 128, 64, 64, 4, 4
    elif rows <= 4096:
        plan, bm, n_up, k_up, n_dn, k_dn, warps, stages = "sorted", 32, 64, 64, 128, 64, 4, 3
    elif rows <= 16384:
        plan, bm, n_up, k_up, n_dn, k_dn, warps, stages = "sorted", 64, 64, 64, 128, 64, 4, 3
    else:
        plan, bm, n_up, k_up, n_dn, k_dn, warps, stages = "sorted", 128, 64, 64, 128, 64, 8, 3
    return MoeConfig(plan=plan, block_m=bm, block_n_up=_fit(f, n_up), block_k_up=_fit(d, k_up),
                     block_n_down=_fit(d, n_dn), block_k_down=_fit(f, k_dn), num_warps=warps, num_stages=stages)


def supports(d: int, f: int) -> bool:
    """Shapes the kernels take: D and F each divisible by a power of two ≥ 16."""
    return _fit(d, 16) > 0 and _fit(f, 16) > 0


# ---------------------------------------------------------------------------------------------
# The block plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockPlan:
    """Which rows each block computes.

    expert [NB] int32: the block's expert, −1 for an unused block;
    rows [NB, block_m] int32: flat routed-row ids (m·k + j) of the block, −1 for padding;
    pos [R] int32: where routed row r sits in the blocked layout (block · block_m + slot).
    """

    expert: jax.Array
    rows: jax.Array
    pos: jax.Array


def plan_rows(idx_mk: jax.Array, block_m: int) -> BlockPlan:
    """One routed row a block, in row order (no sort)."""
    r = idx_mk.size
    rows = jnp.full((r, block_m), -1, jnp.int32).at[:, 0].set(jnp.arange(r, dtype=jnp.int32))
    return BlockPlan(idx_mk.reshape(r).astype(jnp.int32), rows, jnp.arange(r, dtype=jnp.int32) * block_m)


def plan_sorted(idx_mk: jax.Array, num_experts: int, block_m: int) -> BlockPlan:
    """Rows grouped by expert into blocks of block_m (each expert's last block padded).

    The number of blocks is static: Σ_e ceil(n_e / bm) ≤ floor(R / bm) + min(E, R).
    """
    r = idx_mk.size
    nb = r // block_m + min(num_experts, r)
    flat = idx_mk.reshape(r).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # rows sorted by expert
    expert_sorted = flat[order]
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    blocks = (sizes + block_m - 1) // block_m
    block_end = jnp.cumsum(blocks)  # [E] one past each expert's last block
    row_start = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(r, dtype=jnp.int32) - row_start[expert_sorted]  # place within its expert
    dest = (block_end - blocks)[expert_sorted] * block_m + rank  # [R] blocked position of sorted row i
    rows = jnp.full((nb * block_m,), -1, jnp.int32).at[dest].set(order).reshape(nb, block_m)
    b = jnp.arange(nb, dtype=jnp.int32)
    # The expert of block b: how many experts end at or before it. A compare-and-count, not
    # jnp.searchsorted, whose default method is a loop (a while loop on the GPU: a host round trip a step).
    expert = jnp.sum(block_end[None, :] <= b[:, None], axis=1, dtype=jnp.int32)
    expert = jnp.where(b < block_end[-1], expert, -1)
    pos = jnp.zeros((r,), jnp.int32).at[order].set(dest)
    return BlockPlan(expert, rows, pos)


# ---------------------------------------------------------------------------------------------
# Kernels


def _gelu_tanh(x):
    """Inside the kernel: tanh's form. (`numerics.gelu_tanh`'s exact-division form made the 2K-token gate_up
    kernel 2.1× slower on an H200.)"""
    return jax.nn.gelu(x, approximate=True)


def _weight_tile(ref, e, ks, cols):
    """The [bk, bn] tile (depth ks, output columns cols) of expert e's weight, stored [E, out, in]."""
    return ref[e, cols, ks].T


def _gate_up_kernel(e_ref, rows_ref, x_ref, g_ref, u_ref, h_ref, *, top_k: int, block_k: int):
    # e_ref: []            the block's expert (−1: unused block)
    # rows_ref: [bm]       routed-row ids of the block (−1: padding)
    # x_ref: [M, D]        all tokens (rows gathered by index)
    # g_ref, u_ref: [E, F, D]  every expert's gate / up weights (read in place)
    # h_ref: [bm, bn]      this block's rows × this program's F columns
    e = e_ref[()]
    cols = pl.ds(pl.program_id(0) * h_ref.shape[1], h_ref.shape[1])  # (outside the when: interpret mode)

    @pl.when(e >= 0)
    def _():
        rows = rows_ref[...]
        tok = jnp.where(rows >= 0, rows // top_k, 0)

        def body(i, acc):
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            xb = x_ref[tok, ks]  # [bm, bk]
            g, u = _weight_tile(g_ref, e, ks, cols), _weight_tile(u_ref, e, ks, cols)
            return acc[0] + numerics.kernel_dot(xb, g), acc[1] + numerics.kernel_dot(xb, u)

        zero = jnp.zeros(h_ref.shape, F32)
        ag, au = lax.fori_loop(0, x_ref.shape[1] // block_k, body, (zero, zero))
        h_ref[...] = (_gelu_tanh(ag) * au).astype(h_ref.dtype)


def _down_kernel(e_ref, rows_ref, w_ref, h_ref, d_ref, y_ref, *, block_k: int):
    # e_ref: []            the block's expert (−1: unused block)
    # rows_ref: [bm]       routed-row ids of the block (−1: padding)
    # w_ref: [R]           routing weights (float32), by routed row
    # h_ref: [bm, F]       the block's gate_up output
    # d_ref: [E, D, F]     every expert's down weights (read in place)
    # y_ref: [bm, bn]      float32, weighted, this program's D columns
    e = e_ref[()]
    cols = pl.ds(pl.program_id(0) * y_ref.shape[1], y_ref.shape[1])

    @pl.when(e >= 0)
    def _():
        rows = rows_ref[...]
        wt = jnp.where(rows >= 0, w_ref[jnp.maximum(rows, 0)], 0.0)  # [bm]

        def body(i, acc):
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            return acc + numerics.kernel_dot(h_ref[:, ks], _weight_tile(d_ref, e, ks, cols))

        acc = lax.fori_loop(0, h_ref.shape[1] // block_k, body, jnp.zeros(y_ref.shape, F32))
        y_ref[...] = acc * wt[:, None]


# ---------------------------------------------------------------------------------------------
# Wrapper


def _check(x, w, idx, gate, up, down, cfg: MoeConfig):
    m, d = x.shape
    e, f, d2 = gate.shape
    assert idx.shape == w.shape and idx.ndim == 2 and idx.shape[0] == m, (x.shape, idx.shape, w.shape)
    assert d2 == d and up.shape == gate.shape and down.shape == (e, d, f), (gate.shape, up.shape, down.shape)
    assert x.dtype == gate.dtype == up.dtype == down.dtype, (x.dtype, gate.dtype, up.dtype, down.dtype)
    assert cfg.plan in ("rows", "sorted"), cfg.plan
    for dim, b in ((f, cfg.block_n_up), (d, cfg.block_k_up), (d, cfg.block_n_down), (f, cfg.block_k_down)):
        assert b >= 16 and b & (b - 1) == 0 and dim % b == 0, f"block {b} must be a power of two ≥ 16 dividing {dim}"
    assert cfg.block_m >= 16 and cfg.block_m & (cfg.block_m - 1) == 0, cfg.block_m


def grouped_gemms(plan: BlockPlan, x: jax.Array, w: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                  cfg: MoeConfig, *, top_k: int, interpret: bool = False) -> jax.Array:
    """The two kernels over a plan: the weighted expert outputs y [NB·bm, D] (float32) by blocked row."""
    d = x.shape[1]
    f = gate.shape[1]
    bm = cfg.block_m
    nb = plan.expert.shape[0]
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block = pl.BlockSpec((None,), lambda j, b: (b,))
    block_rows = pl.BlockSpec((None, bm), lambda j, b: (b, 0))
    whole = pl.BlockSpec()  # the whole array: indexed inside the kernel (gathered rows, the block's expert)

    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, top_k=top_k, block_k=cfg.block_k_up),
        grid=(f // cfg.block_n_up, nb),
        in_specs=[block, block_rows, whole, whole, whole],
        out_specs=pl.BlockSpec((bm, cfg.block_n_up), lambda j, b: (b, j)),
        out_shape=jax.ShapeDtypeStruct((nb * bm, f), x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="moe_gate_up",
    )(plan.expert, plan.rows, x, gate, up)

    return pl.pallas_call(
        functools.partial(_down_kernel, block_k=cfg.block_k_down),
        grid=(d // cfg.block_n_down, nb),
        in_specs=[block, block_rows, whole, pl.BlockSpec((bm, f), lambda j, b: (b, 0)), whole],
        out_specs=pl.BlockSpec((bm, cfg.block_n_down), lambda j, b: (b, j)),
        out_shape=jax.ShapeDtypeStruct((nb * bm, d), F32),
        compiler_params=params,
        interpret=interpret,
        name="moe_down",
    )(plan.expert, plan.rows, w.reshape(-1).astype(F32), h, down)


def make_plan(idx: jax.Array, num_experts: int, cfg: MoeConfig) -> BlockPlan:
    return plan_rows(idx, cfg.block_m) if cfg.plan == "rows" else plan_sorted(idx, num_experts, cfg.block_m)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def moe_experts(x: jax.Array, w: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, *,
                config: MoeConfig | None = None, interpret: bool = False) -> jax.Array:
    """Routed experts: x [M,D], routing weights w [M,k] and expert ids idx [M,k], weights gate/up [E,F,D] and
    down [E,D,F]; returns [M,D] in x's dtype."""
    m, d = x.shape
    f = gate.shape[1]
    k = idx.shape[1]
    cfg = config or default_config(m * k, d, f)
    _check(x, w, idx, gate, up, down, cfg)
    plan = make_plan(idx, gate.shape[0], cfg)
    y = grouped_gemms(plan, x, w, gate, up, down, cfg, top_k=k, interpret=interpret)
    return jnp.sum(y[plan.pos].reshape(m, k, d), axis=1).astype(x.dtype)


def moe_experts_reference(x: jax.Array, w: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array,
                          down: jax.Array, *, precision=None) -> jax.Array:
    """Plain jnp, row by row: each (token, slot) gathers its expert's weights; float32 accumulation, h rounded
    to x's dtype before the down projection, weighted sum over slots in float32."""
    kw = dict(preferred_element_type=F32, precision=precision)
    g = numerics.einsum("MD,MKFD->MKF", x, gate[idx], **kw)
    u = numerics.einsum("MD,MKFD->MKF", x, up[idx], **kw)
    h = (numerics.gelu_tanh(g) * u).astype(x.dtype)
    y = numerics.einsum("MKF,MKDF->MKD", h, down[idx], **kw)
    return jnp.einsum("MKD,MK->MD", y, w.astype(F32), precision=precision).astype(x.dtype)


# The XLA path gathers the routed experts' weights up to this many routed rows, and above it runs
# `lax.ragged_dot` over rows sorted by expert (which XLA's GPU lowering computes densely over every expert).
XLA_GATHER_MAX_ROWS = 64


# rows [R, in] (ragged over the groups) times each group's [out, in] weight (contracted on its last axis)
_RAGGED_NK = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
                                           rhs_group_dimensions=[0])


def moe_experts_xla(x: jax.Array, w: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                    *, precision=None) -> jax.Array:
    """The same function through XLA alone (CPU, float32, and the baseline the kernels are measured against)."""
    m, k = idx.shape
    if m * k <= XLA_GATHER_MAX_ROWS:
        return moe_experts_reference(x, w, idx, gate, up, down, precision=precision)
    kw = dict(preferred_element_type=F32, precision=precision)
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e)
    token = order // k
    x_sorted = x[token]
    sizes = jnp.bincount(flat_e, length=gate.shape[0]).astype(jnp.int32)

    def grouped(a, b):  # rows [R, in] × each group's [out, in], blocked over `in` for float32 on the CPU
        return numerics.contract(lambda a, b: lax.ragged_dot_general(a, b, sizes, _RAGGED_NK, **kw), a, b, 1, 2)

    g, u = grouped(x_sorted, gate), grouped(x_sorted, up)
    h = (numerics.gelu_tanh(g) * u).astype(x.dtype)
    y = grouped(h, down) * w.reshape(-1)[order][:, None].astype(F32)
    return jnp.zeros((m, x.shape[1]), F32).at[token].add(y).astype(x.dtype)
