"""Routed experts on Hopper: a grouped GEMM in Pallas's Mosaic GPU backend (TMA tiles, wgmma).

The same function as `moe.moe_experts` (see its docstring for the math and the weight layout):

    out[m] = Σ_j w[m,j] · ( gelu_tanh(x[m] G_eᵀ) * (x[m] U_eᵀ) ) D_eᵀ,    e = idx[m,j]

Why a second implementation: the Triton-backend kernels load tiles with per-thread pointer loads and stall at
≈ 216 TFLOP/s on the 2K-token expert shapes of 26B-A4B and at ≈ 3.5 TB/s on the decode shapes (docs/kernels.md).
Here every tile is a TMA copy into a ring of shared-memory slots (`plgpu.emit_pipeline`, `stages` deep) and the
products are wgmma instructions reading shared memory.

Layout of the work
------------------
* Rows sorted by expert, unpadded: `x_sorted[i] = x[order[i] // k]` for the R = M·k routed rows (R rounded up
  to a multiple of block_m with zero rows). Expert e owns the contiguous run [start_e, end_e).
* Tiles. A *tile* is (expert, row block) for every row block of block_m sorted rows that the expert's run
  meets, so a block shared by two experts is computed twice, each time storing only its own rows. There are at
  most ceil(R / bm) + min(E, R) − 1 tiles (`TilePlan.table`, computed in XLA): [expert, block, lo, hi] with
  rows [lo, hi) of the block the tile's own; expert −1 marks an unused tile, which returns at once.
* Grid (tile, column tile). Per CTA: one warpgroup runs the K loop — TMA brings the [bm, bk] row tile and the
  [bn, bk] weight tile(s) of the tile's expert (the weights stay [out, in]; wgmma reads them transposed from
  shared memory), wgmma accumulates in float32 registers.
  - gate_up: two accumulators (gate and up, the same x tile), the GELU-tanh product in registers, h in x's dtype.
  - down: one accumulator, float32 out; the routing weight is applied in the combine.
* Stores. A tile stores its rows [lo, hi) only: the row count is known at run time, and a TMA store needs a
  static box, so the rows go out as a sum of powers of two (for 37 rows: 32, then 4, then 1), each a
  statically-shaped copy at a dynamic offset.
* `padded=True` instead gathers each expert's rows to start at a multiple of block_m (`moe.plan_sorted`'s blocks):
  one tile a block, stored whole; more rows to gather and compute, no tile shared by two experts.
* Combine (XLA): out[m] = Σ_j w[m,j] · y[pos of (m, j)] in float32, cast to x's dtype.

16-bit inputs only (wgmma's float32 is TF32, which float32 models must never get silently): `supports` says so.
Interpret mode (CPU tests) runs the same code in JAX's GPU interpreter; `mgpu_interpret.params` installs what the
interpreter lacks.

Measured on an H200 (docs/kernels.md, run 9): the two kernels alone at 2K tokens 311 TFLOP/s (Triton 252), at 16
tokens 4.05 TB/s over the touched experts (Triton 3.90); in the model, batch-16 decode 1462 tokens/s (Triton 1423),
and 1581–1587 with token tiles (run 10; the section at the end of this file).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from . import mgpu_interpret
from .moe import plan_sorted
from .tiling import HOPPER_SMEM_BYTES
from .tiling import fit_block as _fit

F32 = jnp.float32
SMEM_BYTES = HOPPER_SMEM_BYTES
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


@dataclasses.dataclass(frozen=True)
class MgpuMoeConfig:
    """Tuning knobs (hashable: a static argument of the jitted entry point).

    block_m: sorted rows per tile (64 or 128: one warpgroup's wgmma M, once or twice); block_k: depth per
    pipeline step (64 = one 128-byte swizzle of 16-bit values), block_k_up that of gate_up where set (0: block_k;
    gate_up's depth is D, often a multiple of wider steps than F is), and stages_up its ring depth likewise;
    block_n_up / block_n_down: output columns of a gate_up / down CTA (a stored row is a multiple of 128 bytes:
    TMA's shared-memory alignment, as row offsets are dynamic); stages: TMA ring depth; padded: each expert's rows
    start at a multiple of block_m (gathered so by XLA; a tile is one expert's whole block) instead of the unpadded
    run shared by neighbouring experts.
    """

    block_m: int = 64
    block_n_up: int = 64
    block_n_down: int = 128
    block_k: int = 64
    stages: int = 4
    padded: bool = False
    block_k_up: int = 0
    stages_up: int = 0

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m must be 64 or 128 (one warpgroup's wgmma M, once or twice), got {self.block_m}")
        for name, like in (("block_k_up", "block_k"), ("stages_up", "stages")):  # 0: the same as down's
            if not getattr(self, name):
                object.__setattr__(self, name, getattr(self, like))
        for name, least in (("block_n_up", 64), ("block_n_down", 32), ("block_k", 64), ("block_k_up", 64)):
            v = getattr(self, name)
            if v < least or v & (v - 1):
                raise ValueError(f"{name} must be a power of two ≥ {least}, got {v}")
        if min(self.stages, self.stages_up) < 2:
            raise ValueError(f"stages must be ≥ 2 (one slot in flight while wgmma reads another), got "
                             f"{self.stages} / {self.stages_up}")


def default_config(rows: int, d: int, f: int) -> MgpuMoeConfig:
    """The configuration for R routed rows and an expert D → F → D (docs/kernels.md, "MoE on Mosaic GPU": at
    16 and 128 tokens of 26B-A4B the unpadded 64-row tiles won; at 2048 tokens 128-row padded tiles)."""
    sizes = dict(block_n_up=_fit(f, 64), block_n_down=_fit(d, 128), block_k=_fit(min(d, f), 64))
    if rows > 8192:
        return MgpuMoeConfig(block_m=128, stages=3, padded=True, **sizes)
    return MgpuMoeConfig(**sizes)


def smem_bytes(config: MgpuMoeConfig, itemsize: int = 2) -> int:
    """Shared memory of the larger of the two kernels (ring + output tile)."""
    bm, bk, s = config.block_m, config.block_k, config.stages
    up = (config.stages_up * (bm + 2 * config.block_n_up) * config.block_k_up * itemsize
          + bm * config.block_n_up * itemsize)
    down = s * (bm + config.block_n_down) * bk * itemsize + bm * config.block_n_down * 4
    return max(up, down)


def supports(d: int, f: int, dtype) -> bool:
    """Shapes and dtypes the kernels take: 16-bit inputs, D and F multiples of 64."""
    return jnp.dtype(dtype).itemsize == 2 and d % 64 == 0 and f % 64 == 0


# ---------------------------------------------------------------------------------------------
# The tile plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TilePlan:
    """Which rows each tile computes.

    table [4, T] int32: per tile its expert (−1: unused), row block, and its own rows [lo, hi) of the block;
    order [R] int32: sorted position i holds flat routed row order[i] (= m·k + j); −1 for padding (padded plan);
    pos [R] int32: where flat routed row r sits among the sorted rows.
    """

    table: jax.Array
    order: jax.Array
    pos: jax.Array


def num_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """Static bound on the tiles: each row block once, plus one more per expert boundary inside a block."""
    return -(-rows // block_m) + min(num_experts, rows) - 1


def plan_tiles(idx_mk: jax.Array, num_experts: int, block_m: int) -> TilePlan:
    r = idx_mk.size
    flat = idx_mk.reshape(r).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    end = jnp.cumsum(sizes)
    start = end - sizes
    first = start // block_m
    tiles = jnp.where(sizes > 0, (jnp.maximum(end, 1) - 1) // block_m - first + 1, 0)
    tile_end = jnp.cumsum(tiles)
    t = jnp.arange(num_tiles(r, num_experts, block_m), dtype=jnp.int32)
    # the expert of tile t: the first whose tiles end after t (compare-and-count, no loop on the GPU)
    e = jnp.sum(tile_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
    used = t < tile_end[-1]
    ec = jnp.minimum(e, num_experts - 1)
    block = first[ec] + t - (tile_end - tiles)[ec]
    base = block * block_m
    lo = jnp.maximum(start[ec], base) - base
    hi = jnp.minimum(end[ec], base + block_m) - base
    table = jnp.stack([jnp.where(used, e, -1), jnp.where(used, block, 0), jnp.where(used, lo, 0),
                       jnp.where(used, hi, 0)])
    pos = jnp.zeros((r,), jnp.int32).at[order].set(jnp.arange(r, dtype=jnp.int32))
    return TilePlan(table, order, pos)


# At a decode step the plan is a chain of small XLA kernels (a sort, a scatter, cumulative sums, compares and
# gathers) between the router and the experts, each a launch on the step's critical path. `plan_tiles_kernel`
# computes the same plan in one Triton program, by compares and sums over [R, R], [E, E] and [T, E] (no sort),
# for R ≤ PLAN_KERNEL_MAX_ROWS routed rows (R and E powers of two: the program holds those tiles in registers).
PLAN_KERNEL_MAX_ROWS = 128


def plan_kernel_supports(rows: int, num_experts: int) -> bool:
    def pow2(v: int) -> bool:
        return v >= 8 and v & (v - 1) == 0

    return pow2(rows) and rows <= PLAN_KERNEL_MAX_ROWS and pow2(num_experts) and num_experts <= 256


def _plan_kernel(flat_ref, table_ref, order_ref, pos_ref, *, num_experts: int, block_m: int, tiles_p: int):
    i32 = jnp.int32
    r, ne = flat_ref.shape[0], num_experts
    flat = flat_ref[...]
    ri, rj = lax.broadcasted_iota(i32, (r, r), 0), lax.broadcasted_iota(i32, (r, r), 1)
    rank = jnp.sum(jnp.where((flat[:, None] == flat[None, :]) & (rj < ri), 1, 0), axis=1)  # earlier rows, same expert
    hit = flat[:, None] == lax.broadcasted_iota(i32, (r, ne), 1)  # [R, E]: row r goes to expert e
    sizes = jnp.sum(jnp.where(hit, 1, 0), axis=0)
    ei, ej = lax.broadcasted_iota(i32, (ne, ne), 0), lax.broadcasted_iota(i32, (ne, ne), 1)

    def cumsum(v):  # inclusive, over experts
        return jnp.sum(jnp.where(ej <= ei, v[None, :], 0), axis=1)

    end = cumsum(sizes)
    start = end - sizes
    dest = jnp.sum(jnp.where(hit, start[None, :], 0), axis=1) + rank  # [R]: sorted position of row r
    pos_ref[...] = dest
    order_ref[...] = jnp.sum(jnp.where(dest[None, :] == ri, rj, 0), axis=1)  # order[i]: the row whose dest is i
    first = start // block_m
    tiles = jnp.where(sizes > 0, (jnp.maximum(end, 1) - 1) // block_m - first + 1, 0)
    tile_end = cumsum(tiles)
    t2, e2 = lax.broadcasted_iota(i32, (tiles_p, ne), 0), lax.broadcasted_iota(i32, (tiles_p, ne), 1)
    t = lax.broadcasted_iota(i32, (tiles_p,), 0)
    e = jnp.sum(jnp.where(tile_end[None, :] <= t2, 1, 0), axis=1)  # the first expert whose tiles end after t
    used = t < jnp.sum(tiles)
    pick = jnp.minimum(e, ne - 1)[:, None] == e2

    def at(v):  # v[min(e, E-1)] per tile
        return jnp.sum(jnp.where(pick, v[None, :], 0), axis=1)

    block = at(first) + t - at(tile_end - tiles)
    base = block * block_m
    table_ref[0, :] = jnp.where(used, e, -1)
    table_ref[1, :] = jnp.where(used, block, 0)
    table_ref[2, :] = jnp.where(used, jnp.maximum(at(start), base) - base, 0)
    table_ref[3, :] = jnp.where(used, jnp.minimum(at(end), base + block_m) - base, 0)


@functools.partial(jax.jit, static_argnames=("num_experts", "block_m", "interpret"))
def plan_tiles_kernel(idx_mk: jax.Array, num_experts: int, block_m: int, *, interpret: bool = False) -> TilePlan:
    """`plan_tiles` as one kernel launch (see PLAN_KERNEL_MAX_ROWS). Its table has a power-of-two length ≥
    `num_tiles`: the tiles past that are unused (expert −1)."""
    r = idx_mk.size
    assert plan_kernel_supports(r, num_experts), (r, num_experts)
    tp = pl.next_power_of_2(num_tiles(r, num_experts, block_m))
    i32 = jnp.int32
    table, order, pos = pl.pallas_call(
        functools.partial(_plan_kernel, num_experts=num_experts, block_m=block_m, tiles_p=tp),
        out_shape=[jax.ShapeDtypeStruct((4, tp), i32), jax.ShapeDtypeStruct((r,), i32),
                   jax.ShapeDtypeStruct((r,), i32)],
        compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret,
        name="moe_plan",
    )(idx_mk.reshape(r).astype(i32))
    return TilePlan(table, order, pos)


def plan_padded(idx_mk: jax.Array, num_experts: int, block_m: int) -> tuple[TilePlan, jax.Array]:
    """Each expert's rows from a multiple of block_m (`moe.plan_sorted`'s blocks): one tile a block, its rows
    [0, bm) stored whole (padding rows compute on token 0 and are never read). Also returns the token of each
    padded row, for the gather."""
    plan = plan_sorted(idx_mk, num_experts, block_m)
    nb = plan.expert.shape[0]
    b = jnp.arange(nb, dtype=jnp.int32)
    table = jnp.stack([plan.expert, b, jnp.zeros_like(b), jnp.full_like(b, block_m)])
    rows = plan.rows.reshape(-1)
    return TilePlan(table, rows, plan.pos), jnp.where(rows >= 0, rows // idx_mk.shape[1], 0)


# ---------------------------------------------------------------------------------------------
# The kernel


def _gelu_product(g, u):
    """gelu_tanh(g) · u in float32 registers (tanh's form, as `moe._gelu_tanh`)."""
    return 0.5 * g * (1.0 + jnp.tanh(_GELU_C * (g + 0.044715 * (g * g * g)))) * u


def _store_rows(o_smem, o_gmem, row0, lo, hi, col0, bn, bm):
    """Copy rows [lo, hi) of the [bm, bn] tile in shared memory to o_gmem[row0 + lo : row0 + hi, col0 : +bn],
    as statically-sized TMA stores of 2^i rows for the set bits of hi − lo, largest first."""
    size = hi - lo
    at = lo
    p = bm
    while p >= 1:
        @pl.when((size & p) != 0)
        def _(at=at, p=p):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(at, p)], o_gmem.at[pl.ds(row0 + at, p), pl.ds(col0, bn)])

        at = at + (size & p)
        p //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _grouped_kernel(tab_ref, a_ref, *refs, n_b: int, bm: int, bn: int, bk: int, stages: int, gelu: bool,
                    shared_a: bool):
    # tab_ref [4, T] (GMEM): per tile expert, block, lo, hi;  a_ref [Rp, K]: sorted rows (shared_a: one [bm, K]
    # block that every tile reads); refs: n_b weights [E, N, K] (GMEM, read in place), then the output [·, N],
    # whose rows block·bm + [lo, hi) the tile stores.
    b_refs, o_ref = refs[:n_b], refs[n_b]
    t, j = lax.axis_index("t"), lax.axis_index("n")
    e = tab_ref[0, t]

    @pl.when(e >= 0)
    def _():
        block, lo, hi = tab_ref[1, t], tab_ref[2, t], tab_ref[3, t]

        def acc_scope(*accs):
            def step(_, a_smem, *b_smem):
                for acc, b in zip(accs, b_smem, strict=True):
                    plgpu.wgmma(acc, a_smem, b.transpose((1, 0)))
                plgpu.wgmma_wait(n_b)  # the previous step's products are done: its slots may be refilled

            plgpu.emit_pipeline(
                step,
                grid=(a_ref.shape[1] // bk,),
                in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (0 if shared_a else block, k), delay_release=1)]
                + [plgpu.BlockSpec((bn, bk), lambda k: (j, k), delay_release=1)] * n_b,
                max_concurrent_steps=stages,
            )(a_ref, *(b.at[e] for b in b_refs))
            return tuple(acc[...] for acc in accs)

        vals = pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn), F32)] * n_b)
        out = _gelu_product(*vals) if gelu else vals[0]

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), o_ref.dtype))
        def _(o_smem):
            o_smem[...] = out.astype(o_ref.dtype)
            plgpu.commit_smem()
            _store_rows(o_smem, o_ref, block * bm, lo, hi, j * bn, bn, bm)


def _grouped(table, a, bs, out_dtype, *, bn: int, bk: int, stages: int, cfg: MgpuMoeConfig, gelu: bool,
             interpret: bool, name: str, tiles: int, shared_a: bool = False, out_rows: int | None = None):
    """One grouped GEMM: for each of the first `tiles` tiles of `table`, rows of `a` (its tile's block, or with
    `shared_a` its one block) times its expert's [N, K] weight(s), rows [lo, hi) stored."""
    rp = out_rows or a.shape[0]
    n = bs[0].shape[1]
    kernel = plgpu.kernel(
        functools.partial(_grouped_kernel, n_b=len(bs), bm=cfg.block_m, bn=bn, bk=bk, stages=stages,
                          gelu=gelu, shared_a=shared_a),
        out_type=jax.ShapeDtypeStruct((rp, n), out_dtype),
        grid=(tiles, n // bn),
        grid_names=("t", "n"),
        kernel_name=name,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=mgpu_interpret.params(interpret),
    )
    return kernel(table, a, *bs)


def _check(x, w, idx, gate, up, down, cfg: MgpuMoeConfig):
    m, d = x.shape
    e, f, d2 = gate.shape
    if idx.shape != w.shape or idx.ndim != 2 or idx.shape[0] != m:
        raise ValueError(f"routing shapes {idx.shape}, {w.shape} do not match {m} tokens")
    if d2 != d or up.shape != gate.shape or down.shape != (e, d, f):
        raise ValueError(f"expert shapes {gate.shape}, {up.shape}, {down.shape} do not match hidden size {d}")
    if not (x.dtype == gate.dtype == up.dtype == down.dtype) or not supports(d, f, x.dtype):
        raise ValueError(f"the Mosaic MoE kernel takes 16-bit inputs with D, F multiples of 64; got {x.dtype}, "
                         f"D={d}, F={f}")
    for name, dim, b in (("block_n_up", f, cfg.block_n_up), ("block_n_down", d, cfg.block_n_down),
                         ("block_k_up", d, cfg.block_k_up), ("block_k", f, cfg.block_k)):
        if dim % b:
            raise ValueError(f"{name}={b} does not divide {dim}")
    if smem_bytes(cfg, x.dtype.itemsize) > SMEM_BYTES - 1024:
        raise ValueError(f"config {cfg} needs {smem_bytes(cfg)} bytes of shared memory, more than {SMEM_BYTES}")


@functools.partial(jax.jit, static_argnames=("config", "interpret", "plan_kernel", "token_tiles"))
def moe_experts_mgpu(x: jax.Array, w: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array,
                     down: jax.Array, *, config: MgpuMoeConfig | None = None, interpret: bool = False,
                     plan_kernel: bool = False, token_tiles: bool = False, table: jax.Array | None = None) -> jax.Array:
    """Routed experts (as `moe.moe_experts`): x [M,D], w/idx [M,k], gate/up [E,F,D], down [E,D,F] → [M,D].
    `plan_kernel`: the unpadded tile plan from `plan_tiles_kernel` where it applies (few rows). `token_tiles`:
    where M ≤ block_m (a decode step), no plan at all (`token_tile_experts`), with `table` as its token table
    where the caller has it (`router.route`)."""
    m, d = x.shape
    e, f = gate.shape[:2]
    k = idx.shape[1]
    cfg = config or default_config(m * k, d, f)
    _check(x, w, idx, gate, up, down, cfg)
    if token_tiles and token_tiles_apply(m, cfg):
        return token_tile_experts(x, w, idx, gate, up, down, cfg, interpret=interpret, table=table)
    plan, xs = make_plan(x, idx, e, cfg, plan_kernel=plan_kernel, interpret=interpret)
    y = grouped_gemms(plan, xs, gate, up, down, cfg, interpret=interpret)
    return _combine(y[plan.pos].reshape(m, k, d), w, x.dtype)


def _combine(ys_mkd: jax.Array, w_mk: jax.Array, dtype) -> jax.Array:
    """Σ_k w·y over each token's k expert outputs [M, k, D]: one fusion with the gather that feeds it, float32."""
    return jnp.sum(ys_mkd * w_mk.astype(F32)[:, :, None], axis=1).astype(dtype)


def make_plan(x: jax.Array, idx: jax.Array, num_experts: int, cfg: MgpuMoeConfig, *, plan_kernel: bool = False,
              interpret: bool = False) -> tuple[TilePlan, jax.Array]:
    """The tile plan and the routed rows of x in its order (unpadded and rounded up to block_m, or padded)."""
    m, k = idx.shape
    if cfg.padded:
        plan, token = plan_padded(idx, num_experts, cfg.block_m)
        return plan, x[token]
    if plan_kernel and plan_kernel_supports(m * k, num_experts):
        plan = plan_tiles_kernel(idx, num_experts, cfg.block_m, interpret=interpret)
    else:
        plan = plan_tiles(idx, num_experts, cfg.block_m)
    rp = -(-(m * k) // cfg.block_m) * cfg.block_m
    return plan, jnp.pad(x[plan.order // k], ((0, rp - m * k), (0, 0)))


def grouped_gemms(plan: TilePlan, xs: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                  cfg: MgpuMoeConfig, *, interpret: bool = False) -> jax.Array:
    """The two kernels over a plan: unweighted expert outputs y (float32) by sorted row."""
    # the plan's tiles (the kernel's table may run longer, with unused tiles: those are not launched)
    r, e = plan.pos.shape[0], gate.shape[0]
    tiles = plan.table.shape[1] if cfg.padded else num_tiles(r, e, cfg.block_m)
    h = _gate_up(plan.table, xs, gate, up, cfg, interpret=interpret, tiles=tiles)
    return _down(plan.table, h, down, cfg, interpret=interpret, tiles=tiles)


def _gate_up(table, a, gate, up, cfg: MgpuMoeConfig, *, interpret: bool, tiles: int, shared_a: bool = False,
             out_rows: int | None = None):
    """h = gelu_tanh(a G_eᵀ) * (a U_eᵀ) per tile, in a's dtype (`_grouped` with gate_up's tiles and ring)."""
    return _grouped(table, a, (gate, up), a.dtype, bn=cfg.block_n_up, bk=cfg.block_k_up, stages=cfg.stages_up,
                    cfg=cfg, gelu=True, interpret=interpret, name="moe_mgpu_gate_up", tiles=tiles, shared_a=shared_a,
                    out_rows=out_rows)


def _down(table, h, down, cfg: MgpuMoeConfig, *, interpret: bool, tiles: int):
    """y = h D_eᵀ per tile, in float32 (`_grouped` with down's tiles and ring)."""
    return _grouped(table, h, (down,), F32, bn=cfg.block_n_down, bk=cfg.block_k, stages=cfg.stages, cfg=cfg,
                    gelu=False, interpret=interpret, name="moe_mgpu_down", tiles=tiles)


# ---------------------------------------------------------------------------------------------
# Token tiles: a decode step's experts without a plan
#
# At a decode step (M ≤ block_m tokens) the plan above is a chain of small XLA kernels (a sort, a scatter, sums,
# gathers, then the gather of x into sorted order) on the step's critical path between the router and the
# experts. Token tiles skip all of it: a tile is one expert, and it computes every token of the step (the block
# is x itself, zero-padded to block_m rows), as the weights are read once per tile either way and wgmma's 64 rows
# cost the same whether 2 or 16 of them are wanted. The only plan is which experts some token chose. Expert e's
# tile stores rows e·bm + [0, M) of h and of y; the combine reads y[e·bm + m] for each (m, e) routed.


def token_tiles_apply(tokens: int, cfg: MgpuMoeConfig) -> bool:
    """Whether token tiles can run: unpadded tiles of at least `tokens` rows."""
    return not cfg.padded and tokens <= cfg.block_m


def token_table(idx: jax.Array, num_experts: int) -> jax.Array:
    """[4, E] int32: per expert e (the tile), [e if some token chose it else −1, e, 0, M]."""
    m = idx.shape[0]
    e = jnp.arange(num_experts, dtype=jnp.int32)
    used = jnp.any(idx.reshape(-1)[:, None] == e[None, :], axis=0)
    return jnp.stack([jnp.where(used, e, -1), e, jnp.zeros_like(e), jnp.full_like(e, m)])


def token_tile_experts(x: jax.Array, w: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                       cfg: MgpuMoeConfig, *, interpret: bool = False, table: jax.Array | None = None) -> jax.Array:
    """The routed experts by token tiles (M ≤ cfg.block_m): one tile per chosen expert over all M tokens.
    `table`: `token_table(idx, E)` where the caller has it already."""
    m, _ = x.shape
    e = gate.shape[0]
    bm = cfg.block_m
    table = token_table(idx, e) if table is None else table
    xp = jnp.pad(x, ((0, bm - m), (0, 0)))
    h = _gate_up(table, xp, gate, up, cfg, interpret=interpret, tiles=e, shared_a=True, out_rows=e * bm)
    y = _down(table, h, down, cfg, interpret=interpret, tiles=e)
    return _combine(y[idx * bm + jnp.arange(m, dtype=idx.dtype)[:, None]], w, x.dtype)  # token m's row of each
