"""Causal flash attention forward for prefill on Hopper (Pallas, Mosaic GPU backend: wgmma, TMA, warp specialisation).

    o = softmax(scale · q kᵀ + causal/window mask) v      q [B,T,N,H], k/v [B,T,K,H], N = K·G

Why a second kernel: at head_dim 512 the Triton-backend kernel (`flash_attention.py`) stalls at 150–170
TFLOP/s on an H100, because one warpgroup's 64 × 512 float32 output accumulator is 256 registers a thread
(the whole register budget) and the K/V tiles leave room for 32-key steps only. Here the head dim is split
across two *consumer* warpgroups so that each holds a 64 × 256 float32 accumulator (128 registers a thread),
and a third *producer* warpgroup feeds both by TMA, as in FlashAttention-3.

Positions are implicit: queries and keys are the same T tokens 0..T−1 (prefill; padding tokens at the end are
harmless under the causal mask). Key t_k is visible to query t_q iff t_k ≤ t_q and, with `window`,
t_q − t_k < window. Every query sees at least itself, so no row is empty.

Layout of the work
------------------
* Rows. The wrapper reorders q to [B, K, T·G, H]: row r of KV head k is (token r // G, query head k·G + r % G),
  so a 64-row query block is 64/G tokens × the G heads sharing one KV head, and one K/V tile feeds all G heads
  (repeated K/V is never materialised). G is a power of two ≤ 64. T is padded up to a multiple of
  max(64/G, block_kv) (zero keys/values past T are only visible to padded query tokens, whose rows are dropped).
* Grid (query block, kv head, batch), query blocks in reverse order so that the long (late) causal blocks start
  first and the short ones fill the tail. Each CTA runs 3 warpgroups (`num_threads=3`).
* Head-dim split. Consumer c ∈ {0, 1} owns columns [c·H/2, (c+1)·H/2) of Q, K, V and O. Per key step j:
    1. S_c = Q_c K_cᵀ                   (wgmma, 64 × block_kv float32, K-dim H/2)
    2. S_c → shared memory, arrive + wait on the exchange barrier, read S_{1−c}; S = S_c + S_{1−c}
       (float addition commutes, so both consumers hold the bit-identical S and hence identical m, l, P)
    3. the same base-2 online softmax in both (float32 statistics; the mask only on key blocks that straddle
       the diagonal or the window edge — interior blocks skip it)
    4. O_c = α·O_c + P V_c               (wgmma with P from registers, 64 × H/2 float32 accumulator)
  The exchange buffer is double-buffered by step parity, which makes one barrier per step enough: a consumer
  rewrites buffer (parity p, c) at step j+2 only after passing the step-(j+1) barrier, which the other consumer
  reaches only after it has read (p, c) at step j.
* Producer. Streams the four tiles of each key step (K_0, K_1, V_0, V_1: block_kv × H/2 each) by TMA into a
  ring of `num_stages` slots per consumer, each with a "full" barrier (TMA completion) and a "free" barrier
  (the consumer's wgmma has read it). K and V have separate barriers, so the next K streams in during P·V.
* Visited key blocks: [lo, hi) with hi = last token of the query block // block_kv + 1 and lo = 0, or with a
  window, lo = max(first token − window + 1, 0) // block_kv. Consumers and producer agree on the same range.
* Output: O_c / l → bf16 → the consumer's own Q buffer (Q is no longer needed) → TMA store.
* Shared-memory tiles: Q and K are (8, 64)-tiled with the 128-byte swizzle (Q·Kᵀ contracts over their minor
  head-dim columns); V is (8, min(64, block_kv, H/2))-tiled with the matching swizzle, because P·V contracts
  over keys and wgmma wants the contraction to be a whole number of swizzle widths (32-key steps → 64 B).

Shared memory (H = 512, bf16, defaults block_kv = 32, num_stages = 2), of 227 KB on an H100:
    Q        2 consumers × 64 × 256 × 2 B                      =  64 KB
    K, V     2 (K, V) × 2 consumers × 2 stages × 32 × 256 × 2 B = 128 KB
    S swap   2 parities × 2 consumers × 64 × 32 × 4 B          =  32 KB
                                                                 ------
                                                                 224 KB  (+ a few barriers)
  block_kv = 64 would need 64 + 128·stages + 64 KB, i.e. it does not fit even with one stage; that is why
  the default step is 32 keys. Smaller heads get larger steps (see `default_config`). The wrapper checks the
  budget and raises ValueError for configs that do not fit.
Registers: consumers `setmaxnreg` up to `consumer_registers` (accumulator 128 + S, P, m, l), the producer down
to `producer_registers`; 2·128·232 + 128·40 = 64,512 ≤ 65,536.

Status: correct in GPU interpret mode (tests/test_kernels_mgpu.py) and on an H200, where it runs head_dim-512
prefill at 309–349 TFLOP/s (2.0–2.3× XLA; docs/kernels.md, run 5). Likely next steps for speed: software-pipeline
the next step's Q·Kᵀ under this step's softmax (FA3 intra-warpgroup overlap, +16 registers at 32-key steps), and
sweep block_kv / num_stages / register splits (the defaults are the first that fit).

Limits: head_dim ∈ {64, 128, 256, 512} (the split scheme is built for 512; for ≤ 256 JAX's stock
`attention_mgpu` kernel, which gives each warpgroup its own 64 rows, is probably faster), bf16 or f16 inputs,
G a power of two ≤ 64, causal only, forward only, no lse output.

Interpret mode (CPU tests): `interpret=True` or a GPU `InterpretGPUParams`. Three things differ from the GPU
path there, all confined to small helpers: (a) layout casts are skipped (the interpreter has no rule for
them), (b) P is staged through shared memory for the P·V wgmma (the interpreter wants both operands in
memory) and the P·V product is added to α·O outside the wgmma (it does not run `pl.run_state`), and (c) the
exchange buffer is untiled. Everything else — barriers, TMA copies, slicing, loop bounds, masks, softmax — is
the same code. Two shims into jax 0.10's interpreter are installed on the first interpreted call (never on the
GPU path; each is a no-op if the internals have moved): one teaches its wgmma the transposed-K operand, the
other replaces its per-thread runner so that the simulated warpgroups cannot starve each other on a small CPU
host and are compiled once rather than per grid point (`mgpu_interpret.py`). Run the tests
with ≥ 3 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, as tests/conftest.py sets).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import mgpu_interpret
from .tiling import HOPPER_SMEM_BYTES

LOG2E = math.log2(math.e)
# Masked scores are −inf, but the running max starts at this finite value: a row whose first visited key block
# is entirely masked (possible with a window) then gets p = exp2(−inf − MASK) = 0 and α = 1, never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SMEM_BYTES = HOPPER_SMEM_BYTES
BLOCK_Q = 64  # query rows per CTA: one wgmma M tile, shared by both consumers
_HEAD_DIMS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tuning knobs (hashable: a static argument of the jitted entry point).

    block_kv: keys per step (multiple of 32); num_stages: K/V ring depth per consumer.
    exchange_swizzle: keep the float32 score-exchange buffer (8, 32)-tiled with a 128-byte swizzle (the wgmma
      accumulator layout then stores and loads without bank conflicts); False uses a plain row-major buffer.
    consumer_registers / producer_registers: `setmaxnreg` targets (multiples of 8).
    """

    block_kv: int = 32
    num_stages: int = 2
    exchange_swizzle: bool = True
    consumer_registers: int = 232
    producer_registers: int = 40

    def __post_init__(self):
        if self.block_kv < 32 or self.block_kv % 32:
            raise ValueError(f"block_kv must be a positive multiple of 32, got {self.block_kv}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be ≥ 1, got {self.num_stages}")
        if self.consumer_registers % 8 or self.producer_registers % 8:
            raise ValueError("register counts must be multiples of 8")


def default_config(head_dim: int) -> MgpuConfig:
    """Largest key step that fits 227 KB with ≥ 2 stages (untuned on hardware: sweep block_kv/num_stages)."""
    if head_dim >= 512:
        return MgpuConfig(block_kv=32, num_stages=2)  # 224 KB
    if head_dim >= 256:
        return MgpuConfig(block_kv=64, num_stages=2)  # 32 + 128 + 64 = 224 KB
    if head_dim >= 128:
        return MgpuConfig(block_kv=64, num_stages=3)  # 16 + 96 + 64 = 176 KB
    return MgpuConfig(block_kv=64, num_stages=4)  # 8 + 64 + 64 = 136 KB


def smem_bytes(head_dim: int, config: MgpuConfig, itemsize: int = 2) -> int:
    """Shared memory of the GPU path (barriers not counted)."""
    half = head_dim // 2
    q = 2 * BLOCK_Q * half * itemsize
    kv = 2 * 2 * config.num_stages * config.block_kv * half * itemsize
    exchange = 2 * 2 * BLOCK_Q * config.block_kv * 4
    return q + kv + exchange


# --------------------------------------------------------------------------------------------------------------
# Small version-tolerant helpers (the Mosaic GPU Pallas API is young and moves).


def _layout(name: str):
    lay = plgpu.Layout
    if name == "row":  # layout of a row statistic (one value per accumulator row)
        reduce = getattr(lay.WGMMA, "reduce", None)
        return reduce(1) if reduce is not None else lay.WGMMA_ROW  # older spelling
    return lay.WGMMA


def _acc_type():
    """The wgmma accumulator reference type (`plgpu.ACC`, spelled `WGMMAAccumulatorRef` too)."""
    return getattr(plgpu, "ACC", None) or plgpu.WGMMAAccumulatorRef


def _kernel_call(body, out_type, **kwargs):
    """`plgpu.kernel` with the output argument under whichever name this jax uses (out_type / out_shape)."""
    params = inspect.signature(plgpu.kernel).parameters
    key = "out_type" if "out_type" in params else "out_shape"
    return plgpu.kernel(body, **{key: out_type}, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# The kernel.


def _attention_kernel(q_ref, k_ref, v_ref, o_ref, *, head_dim: int, groups: int, num_q_blocks: int,
                      scale: float, window: int | None, cfg: MgpuConfig, interpret: bool):
    # q_ref, o_ref: [B, K, R, H] (R = padded T·G rows); k_ref, v_ref: [B, Tp, K, H]  (all in GMEM)
    half = head_dim // 2
    bkv, stages = cfg.block_kv, cfg.num_stages
    acc_type = _acc_type()
    tokens_per_block = BLOCK_Q // groups
    dtype = q_ref.dtype

    def lc(x, kind):  # layout cast: the GPU path pins wgmma layouts; the interpreter has no rule for it
        return x if interpret else plgpu.layout_cast(x, _layout(kind))

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_layout("acc"))

    def read_scores(ref):
        if interpret or cfg.exchange_swizzle:
            return ref[...]  # a tiled + swizzled ref loads in the wgmma layout
        try:  # jax >= 0.11: the ref alone (an index beside it is deprecated there)
            return plgpu.load(ref, layout=_layout("acc"), optimized=False)
        except TypeError:  # jax 0.10: the index is a required argument
            return plgpu.load(ref, (), layout=_layout("acc"), optimized=False)

    def body(q_smem, k_smem, v_smem, x_smem, p_smem, k_full, v_full, k_free, v_free, q_full, x_bar):
        # q_smem [2, 64, H/2]; k_smem, v_smem [2, stages, bkv, H/2]; x_smem [2 parity, 2, 64, bkv] float32;
        # p_smem [2, 64, bkv] (interpret only). Barriers per (consumer, slot): index c·stages + slot.
        q_blk = num_q_blocks - 1 - lax.axis_index("q")
        kv_head = lax.axis_index("kvh")
        batch = lax.axis_index("b")
        wg = lax.axis_index("wg")

        first_tok = q_blk * tokens_per_block
        last_tok = first_tok + (tokens_per_block - 1)
        bkv_i = jnp.int32(bkv)
        hi = lax.div(last_tok, bkv_i) + 1
        if window is None:
            lo = jnp.int32(0)
            full_lo = lo
        else:
            lo = lax.div(jnp.maximum(first_tok - (window - 1), 0), bkv_i)
            full_lo = lax.div(jnp.maximum(last_tok - (window - 1), 0) + (bkv - 1), bkv_i)
        # Key blocks [a, b) are visible to every row of the block: no mask needed there.
        a = jnp.clip(full_lo, lo, hi)
        b = jnp.clip(lax.div(first_tok + 1, bkv_i), a, hi)
        num_steps = hi - lo

        def consumer(c: int):
            plgpu.set_max_registers(cfg.consumer_registers, action="increase")
            cols = pl.ds(c * half, half)
            q_rows = pl.ds(q_blk * BLOCK_Q, BLOCK_Q)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head, q_rows, cols], q_smem.at[c], q_full.at[c])
            plgpu.barrier_wait(q_full.at[c])

            m_i = lc(jnp.full((BLOCK_Q,), MASK_VALUE, jnp.float32), "row")
            l_i = lc(jnp.full((BLOCK_Q,), 0.0, jnp.float32), "row")
            acc = lc(jnp.full((BLOCK_Q, half), 0.0, jnp.float32), "acc")
            qk_scale = float(scale) * LOG2E

            def step(j, carry, masked: bool):
                acc, m_i, l_i = carry
                s_idx = j - lo
                slot = lax.rem(s_idx, jnp.int32(stages))
                parity = lax.rem(s_idx, jnp.int32(2))
                bar = c * stages + slot

                # 1. Partial scores over this consumer's half of the head dim.
                plgpu.barrier_wait(k_full.at[bar])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[c], k_smem.at[c, slot].transpose((1, 0)))
                    return acc_ref[...]

                s_part = pl.run_scoped(qk, acc_type((BLOCK_Q, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[bar])

                # 2. Swap partials with the other consumer.
                x_smem.at[parity, c][...] = s_part
                plgpu.barrier_arrive(x_bar.at[parity])
                plgpu.barrier_wait(x_bar.at[parity])
                s = s_part + read_scores(x_smem.at[parity, 1 - c])

                # 3. Online softmax in base 2 (m is kept in scaled units, so p = exp2(s·c − m) is one FMA).
                if masked:
                    rows = iota((BLOCK_Q, bkv), 0)
                    # Row r is token first_tok + r // G; with D = (key − first_tok)·G, key ≤ token ⟺ D ≤ r
                    # and token − key < window ⟺ r − D < window·G (G divides D; no division needed).
                    d = iota((BLOCK_Q, bkv), 1) * groups + (j * bkv - first_tok) * groups
                    vis = d <= rows
                    if window is not None:
                        vis = vis & (rows - d < window * groups)
                    s = jnp.where(vis, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)

                # 4. O_c += P V_c.
                plgpu.barrier_wait(v_full.at[bar])
                # The consumer index as a traced value (wg == c here): a Python constant captured by the
                # run_state below fails Mosaic's lowering (jax 0.11: 'Shaped arrays must be represented by
                # ir.Values, got: TypedInt(0)').
                v_tile = v_smem.at[wg, slot]
                if interpret:
                    p_smem.at[c][...] = p16
                    plgpu.commit_smem()

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_smem.at[c], v_tile)
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, acc_type((BLOCK_Q, half), jnp.float32))
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_tile)

                    acc = pl.run_state(pv)(acc_type.init(acc))
                plgpu.barrier_arrive(v_free.at[bar])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)

            acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            q_smem.at[c][...] = acc.astype(dtype)  # Q is dead: reuse its buffer to stage the output
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[c], o_ref.at[batch, kv_head, q_rows, cols])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 0)
        def _():
            consumer(0)

        @pl.when(wg == 1)
        def _():
            consumer(1)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(cfg.producer_registers, action="decrease")

            def issue(s_idx, wait_free: bool):
                slot = lax.rem(s_idx, jnp.int32(stages))
                keys = pl.ds((lo + s_idx) * bkv, bkv)
                for c in range(2):
                    src = (batch, keys, kv_head, pl.ds(c * half, half))
                    bar = c * stages + slot
                    if wait_free:
                        plgpu.barrier_wait(k_free.at[bar])
                    plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[c, slot], k_full.at[bar])
                for c in range(2):
                    src = (batch, keys, kv_head, pl.ds(c * half, half))
                    bar = c * stages + slot
                    if wait_free:
                        plgpu.barrier_wait(v_free.at[bar])
                    plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[c, slot], v_full.at[bar])

            for s_idx in range(stages):  # fill the ring
                pl.when(s_idx < num_steps)(functools.partial(issue, jnp.int32(s_idx), False))

            def refill(s_idx, _):
                issue(s_idx, True)
                return _

            lax.fori_loop(jnp.int32(stages), num_steps, refill, None)

            # Drain: observe the consumers' last release of every slot, so that each "free" barrier is
            # waited on for every phase it completes (idle time for the producer; GPU interpret mode
            # insists on it).
            def drain(s_idx, _):
                slot = lax.rem(s_idx, jnp.int32(stages))
                for c in range(2):
                    plgpu.barrier_wait(k_free.at[c * stages + slot])
                    plgpu.barrier_wait(v_free.at[c * stages + slot])
                return _

            lax.fori_loop(jnp.maximum(num_steps - stages, 0), num_steps, drain, None)

    if cfg.exchange_swizzle and not interpret:
        x_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    else:
        x_transforms = ()
    def tiling(cols):  # (8, cols) tiles with a cols·2-byte swizzle: what wgmma wants of a 16-bit operand
        return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * 2))

    # Q and K are contracted over their (minor) head-dim columns: 128-byte swizzle when H/2 ≥ 64. V and P are
    # contracted over the key axis, and wgmma wants the contraction to be a whole number of swizzle widths,
    # so at 32-key steps V (and P, when staged in memory) take the 64-byte swizzle.
    tiles = tiling(min(64, half))
    v_tiles = tiling(min(64, bkv, half))

    def smem(shape, dt, transforms=()):
        return plgpu.SMEM(shape, dt, transforms=transforms)

    scratch = [
        smem((2, BLOCK_Q, half), dtype, tiles),  # Q (then O)
        smem((2, stages, bkv, half), dtype, tiles),  # K ring
        smem((2, stages, bkv, half), dtype, v_tiles),  # V ring
        smem((2, 2, BLOCK_Q, bkv), jnp.float32, x_transforms),  # score exchange
        smem((2, BLOCK_Q, bkv), dtype, v_tiles) if interpret else None,  # P staging (interpret only)
    ]
    barriers = [
        plgpu.Barrier(num_barriers=2 * stages),  # K full
        plgpu.Barrier(num_barriers=2 * stages),  # V full
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * stages),  # K free
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * stages),  # V free
        plgpu.Barrier(num_barriers=2),  # Q full
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # exchange, per parity
    ]
    pl.run_scoped(lambda *refs: body(*refs), *scratch, *barriers, collective_axes="wg")


def _check(q, k, v, scale, window, cfg: MgpuConfig):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D [B,T,heads,H]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != h:
        raise ValueError(f"k and v must be [B,T,K,H] matching q {q.shape}; got {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"only bfloat16 / float16 inputs are supported, got {q.dtype}")
    if h not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_HEAD_DIMS}, got {h}")
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} not a multiple of kv heads {kh}")
    g = n // kh
    if g & (g - 1) or g > BLOCK_Q:
        raise ValueError(f"query heads per kv head must be a power of two ≤ {BLOCK_Q}, got {g}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window}")
    need = smem_bytes(h, cfg, jnp.dtype(q.dtype).itemsize)
    if need > SMEM_BYTES - 1024:
        raise ValueError(f"config {cfg} needs {need} B of shared memory at head_dim {h}; the limit is "
                         f"{SMEM_BYTES} B (minus barriers): lower block_kv or num_stages")
    if t < 1:
        raise ValueError("empty sequence")
    return g


@functools.partial(jax.jit, static_argnames=("scale", "window", "config", "interpret"))
def flash_attention_mgpu(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0,
                         window: int | None = None, config: MgpuConfig | None = None,
                         interpret=False) -> jax.Array:
    """Causal (optionally sliding-window) attention of q [B,T,N,H] over k, v [B,T,K,H]; returns [B,T,N,H].

    Positions are 0..T−1 for queries and keys alike. `interpret`: False (compile for the GPU), True (GPU
    interpret mode with default parameters, for CPU testing) or an InterpretGPUParams instance.
    """
    cfg = config or default_config(q.shape[-1])
    g = _check(q, k, v, scale, window, cfg)
    b, t, n, h = q.shape
    kh = k.shape[2]
    params = mgpu_interpret.params(interpret)

    tokens_per_block = BLOCK_Q // g
    tp = -(-t // max(tokens_per_block, cfg.block_kv)) * max(tokens_per_block, cfg.block_kv)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    qp, kp, vp = (jnp.pad(x, pad) for x in (q, k, v))
    rows = tp * g
    num_q_blocks = rows // BLOCK_Q
    # [B,Tp,K·G,H] → [B,K,Tp·G,H]: row = token·G + head-in-group.
    qr = qp.reshape(b, tp, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)

    kernel = functools.partial(_attention_kernel, head_dim=h, groups=g, num_q_blocks=num_q_blocks,
                               scale=float(scale), window=None if window is None else int(window), cfg=cfg,
                               interpret=params is not None)
    kwargs = dict(grid=(num_q_blocks, kh, b), grid_names=("q", "kvh", "b"), num_threads=3, thread_name="wg")
    if params is not None:
        kwargs["interpret"] = params
    else:
        kwargs["compiler_params"] = plgpu.CompilerParams(approx_math=True)
    out = _kernel_call(kernel, jax.ShapeDtypeStruct((b, kh, rows, h), q.dtype), **kwargs)(qr, kp, vp)
    out = out.reshape(b, kh, tp, g, h).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)
    return out[:, :t]
