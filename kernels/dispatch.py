"""Chooses how attention, the MoE experts and the decode-time dense projections run: the Pallas kernels, cuDNN
or plain XLA, by platform and shape, overridable. (MoE: `resolve_moe`; projections: `resolve_dense`; at the end.)

`impl` is one of
  'auto'      XLA on CPU (and on anything that is not a CUDA GPU). On a GPU, for 16-bit inputs, whatever
              measured fastest on an H200 (docs/kernels.md, runs 4–9; the first tables were H100's):
                prefill (more than DECODE_MAX_TOKENS queries) whose queries and keys are the same tokens at
                  positions 0..T-1 (`aligned`): cuDNN's flash attention for head_dim ≤ 256, our Mosaic GPU
                  `flash_attention_mgpu` at head_dim 512 on Hopper (no library kernel takes 512); other
                  prefill (chunked, at an offset) the Pallas (Triton) `flash_attention`;
                decode: the Pallas `decode_attention` for batches of two or more and for one sequence over
                  at most DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS keys, XLA for one sequence over more
                  (`decode_prefers_kernel`);
              XLA for shapes the kernels do not take, and for float32 (the kernels' float32 path is a
              small-tile correctness configuration, not a fast one);
  'xla'       always XLA;
  'cudnn'     cuDNN wherever it can express the call (aligned prefill, head_dim ≤ 256, 16-bit), XLA elsewhere;
  'pallas'    always our Pallas kernels (raises if the shape is unsupported): the Mosaic GPU one where `auto`
              would take it, else the Triton ones;
  'interpret' the Pallas kernels in interpret mode (any platform; slow; for tests).
Within the Triton kernels, a call with at most DECODE_MAX_TOKENS query tokens uses `decode_attention`
(split-K over the sequence), longer ones `flash_attention`. The attention rules above are one ordered table,
ATTENTION_RULES (`attention_rule` says which rule decided a call).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import flash_attention_mgpu, gemv, l2_prefetch, moe_mgpu, numerics, router
from .decode_attention import NewKey, QueryPrologue, decode_attention, writes_in_place
from .decode_attention import default_config as decode_config
from .flash_attention import flash_attention, flash_attention_reference
from .gemv import GEMV_MAX_ROWS, GEMV_MAX_WEIGHT, GEMV_MAX_WEIGHT_BATCHED
from .gemv import supports as gemv_supports
from .moe import supports as moe_supports
from .moe_mgpu import supports as moe_mgpu_supports

IMPLS = ("auto", "xla", "cudnn", "pallas", "interpret")
# True: projections that read one normalised input (q/k/v, gate/up) run as one skinny-kernel launch with the norm
# inside (`gemv.gemv_many`) where each would take the kernel. Off by default: on an H200 (docs/performance.md,
# "Where a decode step's time goes") it cut E2B's kernels a step from 1175 to 968 but not its time, and with the
# norm's factor taken out of the programs and the decode graphs' CONCURRENT scheduling (which already runs q, k and
# v side by side) it was 3-6 % slower than separate launches for E2B and E4B.
FUSED_PROJECTIONS = False
# True: where a block's output projection takes the skinny kernel (a decode step), its K-split partials, the
# post-block norm, the residual add and the next block's input norm run as one kernel (`add_norm.add_norm`)
# instead of a chain of three to five small ones. Off until measured on a GPU (docs/performance.md).
FUSED_ADD_NORM = False
DECODE_MAX_TOKENS = 8
# `auto` decode uses the Pallas kernel for batches of at least this many sequences and XLA below. Measured
# on an H200 (docs/kernels.md): for one sequence XLA's fused reduction ran the models' decode calls at
# 0.8–1.2× the kernel's time at every context up to 32K and made 31B's whole decode step 1.15× faster; from
# batch 16 the kernel was 1.8–3.7× XLA on most shapes, and whole-model decode at batch 16 was 2 % faster with
# the kernel on every layer than with XLA on the small ones.
DECODE_KERNEL_MIN_BATCH = 2
# ... and for one sequence when its call reads at most this many keys (cache slots). Whole-model decode at batch 1
# over 256-slot caches (a 128-token prompt, 64 new tokens), one H200, 2026-12-03 (docs/performance.md): the kernel
# took E2B from 2.950 to 2.798 ms/token, E4B from 4.365 to 4.167, 31B from 16.71 to 16.28. Every measured shape of
# 512 slots or more went the other way (above), so longer calls keep XLA; between 256 and 512 is not measured.
DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS = 256
CUDNN_MAX_HEAD_DIM = 256
MOSAIC_HEAD_DIM = 512
# The backend `cudnn_attention` asks jax.nn.dot_product_attention for; tests set 'xla' to check the mapping
# of our semantics onto its arguments on a CPU.
CUDNN_BACKEND = "cudnn"
# Likewise for the Mosaic kernels: tests set True to run them in GPU interpret mode behind the dispatcher.
MOSAIC_INTERPRET = False
# `auto` sends the routed experts to the Mosaic GPU grouped GEMM (`moe_mgpu`) on Hopper from this many routed
# rows (tokens × top-k) up, and to the Triton kernels below it. Measured on an H200 at 26B-A4B's shapes
# (docs/kernels.md, "MoE on Mosaic GPU"): Triton 44 vs 58 µs at 8 rows, Mosaic ahead at 128 (284 vs 300 µs), 1024,
# 4096, 16384 (857 vs 889) and 32768 rows; at 64 rows (batch 8) the model's step 2–5 % faster with the Mosaic token
# tiles (run 11). None: never.
MOSAIC_MOE_MIN_ROWS: int | None = 64


def kernel_supports(head_dim: int, group: int) -> bool:
    """Shapes the kernels handle: power-of-two head_dim in [16, 512] and power-of-two query heads per KV head."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 512 and group >= 1 and group & (group - 1) == 0


def cudnn_supports(head_dim: int, dtype) -> bool:
    """What cuDNN's flash attention takes: 16-bit inputs, head_dim a multiple of 8 up to 256."""
    return jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def mosaic_supports(head_dim: int, group: int, dtype) -> bool:
    """Where the Mosaic GPU prefill kernel is used: head_dim 512 (where it was measured against the rest),
    16-bit inputs, a power-of-two group of at most 64 query heads per KV head."""
    return head_dim == MOSAIC_HEAD_DIM and jnp.dtype(dtype).itemsize == 2 and group & (group - 1) == 0 and group <= 64


# The GPU the dispatcher decides for in a process that has none (None: the process's own device), a Hopper card
# by name. `bench.py chain --target h200` sets "H200" to compile a decode step for that card on a CPU-only machine
# (JAX's deviceless compilation): the GPU paths, Hopper's Mosaic kernels included, as on the card itself.
TARGET_GPU: str | None = None


def _builds(what: str, fallback: str, fn, *args) -> bool:
    """Whether `fn` lowers and compiles for these argument shapes here. Mosaic GPU's Pallas API still moves between
    jax releases; where this jax cannot build a Mosaic kernel, dispatch falls back with one warning instead of
    failing the model. For a TARGET_GPU there is no device to build on: yes (the step's own compile then tells)."""
    if TARGET_GPU:
        return True
    try:
        fn.lower(*args).compile()
        return True
    except Exception as e:  # any failure to build it means: do not use it in this process
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        warnings.warn(f"the Mosaic GPU {what} does not compile with this jax ({type(e).__name__}: {first}); "
                      f"using {fallback}", stacklevel=3)
        return False


@functools.cache
def mosaic_compiles(head_dim: int, group: int, dtype_name: str) -> bool:
    """Whether the Mosaic GPU attention kernel compiles here for this head_dim, group and dtype (tried once per
    process on a small shape); where it does not, `auto` and 'pallas' take the Triton kernel."""
    q = jax.ShapeDtypeStruct((1, 128, group, head_dim), jnp.dtype(dtype_name))
    kv = jax.ShapeDtypeStruct((1, 128, 1, head_dim), jnp.dtype(dtype_name))
    return _builds("attention kernel", f"the Triton kernel for head_dim-{head_dim} prefill",
                   flash_attention_mgpu.flash_attention_mgpu, q, kv, kv)


@functools.cache
def mosaic_moe_compiles(d: int, f: int, dtype_name: str) -> bool:
    """Whether the Mosaic GPU MoE kernels compile here for experts D → F (tried once per process, 16 tokens ×
    8 experts of 8); where they do not, `auto` takes the Triton kernels."""
    s, dt = jax.ShapeDtypeStruct, jnp.dtype(dtype_name)
    return _builds("MoE kernels", "the Triton MoE kernels", moe_mgpu.moe_experts_mgpu, s((16, d), dt),
                   s((16, 8), jnp.float32), s((16, 8), jnp.int32), s((8, f, d), dt), s((8, f, d), dt), s((8, d, f), dt))


def is_hopper() -> bool:
    """The default device is a Hopper GPU (compute capability 9.x): the Mosaic kernel uses wgmma and TMA."""
    if TARGET_GPU:  # a Hopper card by name (bench.py chain's one target)
        return True
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def decode_prefers_kernel(batch: int, keys: int | None = None) -> bool:
    """`auto` decode: the Pallas kernel for batches of at least DECODE_KERNEL_MIN_BATCH, and for smaller ones
    whose call reads at most DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS keys (`keys`: the cache slots; None, unknown:
    as if more); else XLA."""
    return batch >= DECODE_KERNEL_MIN_BATCH or (keys is not None and keys <= DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")


def _on_gpu(platform: str | None) -> bool:
    return (platform or ("cuda" if TARGET_GPU else jax.default_backend())) in ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What the attention rules look at: the `impl` asked for and the call (built by `resolve`)."""

    impl: str
    gpu: bool
    prefill: bool
    aligned: bool
    head_dim: int
    group: int
    dtype: jnp.dtype
    batch: int
    keys: int | None  # the keys a call reads (its cache slots); None: not known
    hopper: bool | None  # None: ask the device (and whether the Mosaic kernel compiles there)

    def mosaic(self) -> bool:
        if not mosaic_supports(self.head_dim, self.group, self.dtype):
            return False
        if self.hopper is not None:
            return self.hopper
        return is_hopper() and mosaic_compiles(self.head_dim, self.group, self.dtype.name)


ASKED = "as asked"
# The attention rules in order: the first whose condition holds decides (`resolve`). tests/test_kernels.py
# mirrors this table case by case, and checks that every rule is reached.
ATTENTION_RULES: tuple[tuple[str, Callable[[AttentionCall], bool], str], ...] = (
    ("xla and interpret run as asked", lambda c: c.impl in ("xla", "interpret"), ASKED),
    ("aligned head_dim-512 prefill on Hopper: the Mosaic kernel",
     lambda c: c.impl in ("auto", "pallas") and c.gpu and c.prefill and c.aligned and c.mosaic(), "mosaic"),
    ("pallas forced: the Triton kernels", lambda c: c.impl == "pallas", "pallas"),
    ("aligned prefill cuDNN takes (16-bit, head_dim ≤ 256)",
     lambda c: c.gpu and c.prefill and c.aligned and cudnn_supports(c.head_dim, c.dtype), "cudnn"),
    ("cuDNN asked where it does not apply, the CPU, float32, shapes the kernels do not take: XLA",
     lambda c: c.impl == "cudnn" or not c.gpu or c.dtype.itemsize != 2 or not kernel_supports(c.head_dim, c.group),
     "xla"),
    ("decode of one sequence over more than DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS keys: XLA",
     lambda c: not c.prefill and not decode_prefers_kernel(c.batch, c.keys), "xla"),
    ("the rest (other prefill, batched or short decode): the Triton kernels", lambda c: True, "pallas"),
)


def attention_rule(impl: str, *, head_dim: int, group: int, dtype=jnp.bfloat16, platform: str | None = None,
                   q_len: int | None = None, batch: int = 1, aligned: bool = False,
                   hopper: bool | None = None, keys: int | None = None) -> tuple[str, str]:
    """(the rule of ATTENTION_RULES that decides this call, the concrete choice); see `resolve`."""
    _check_impl(impl)
    if impl in ("pallas", "interpret") and not kernel_supports(head_dim, group):
        raise ValueError(f"the Pallas kernels do not support head_dim={head_dim} with {group} heads per KV head")
    gpu = _on_gpu(platform)
    if impl == "cudnn" and not gpu:
        raise ValueError("attention impl 'cudnn' needs a CUDA GPU")
    call = AttentionCall(impl, gpu, q_len is None or q_len > DECODE_MAX_TOKENS, aligned, head_dim, group,
                         jnp.dtype(dtype), batch, keys, hopper)
    name, _, choice = next(rule for rule in ATTENTION_RULES if rule[1](call))
    return name, impl if choice == ASKED else choice


def resolve(impl: str, *, head_dim: int, group: int, dtype=jnp.bfloat16, platform: str | None = None,
            q_len: int | None = None, batch: int = 1, aligned: bool = False, hopper: bool | None = None,
            keys: int | None = None) -> str:
    """The concrete choice ('xla' | 'cudnn' | 'mosaic' | 'pallas' | 'interpret') for `impl` on this platform
    and call ('pallas' = the Triton kernels, 'mosaic' = the Mosaic GPU prefill kernel), by ATTENTION_RULES.

    q_len None means a prefill-length call. `aligned`: the call's queries and keys are the same T tokens at
    positions 0..T-1 in every row (keys past a row's length may be padding). `hopper` None asks the device
    (and whether the Mosaic kernel compiles there: `mosaic_compiles`); True / False assert it (tests). `keys`: the
    keys (cache slots) the call reads, which decides decode of one sequence (None: taken as many).
    """
    return attention_rule(impl, head_dim=head_dim, group=group, dtype=dtype, platform=platform, q_len=q_len,
                          batch=batch, aligned=aligned, hopper=hopper, keys=keys)[1]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0, window: int | None = None,
                    causal: bool = True) -> jax.Array:
    """Aligned attention (queries = keys = positions 0..T-1) through jax.nn.dot_product_attention's cuDNN path.

    Our window W (the current token plus W−1 earlier) is its left window W−1. Keys past a row's length are
    padding at the end; under the causal mask no valid query sees them, so no length argument is needed
    (rows that are themselves padding get values nobody reads).
    """
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=CUDNN_BACKEND)


def mosaic_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0,
                     window: int | None = None) -> jax.Array:
    """Aligned causal attention through the Mosaic GPU kernel (positions implicit, as for cuDNN)."""
    return flash_attention_mgpu.flash_attention_mgpu(q, k, v, scale=scale, window=window, interpret=MOSAIC_INTERPRET)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
              scale: float = 1.0, window: int | None = None, causal: bool = True, impl: str = "auto",
              aligned: bool = False) -> jax.Array:
    """q [B,T,N,H] over k, v [B,S,K,H], masked by positions (see masking.py); returns [B,T,N,H].

    `aligned` (see `resolve`) lets cuDNN or the Mosaic kernel take the call; the caller vouches for it.
    """
    choice = resolve(impl, head_dim=q.shape[-1], group=q.shape[2] // k.shape[2], dtype=q.dtype, q_len=q.shape[1],
                     batch=q.shape[0], aligned=aligned and causal, keys=k.shape[1])
    return run_attention(choice, q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal)


def run_attention(choice: str, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                  scale: float = 1.0, window: int | None = None, causal: bool = True,
                  prologue: QueryPrologue | None = None, new_key: NewKey | None = None) -> jax.Array:
    """`attention` by a choice `resolve` already made (callers that resolve once and branch on it): 'cudnn' and
    'mosaic' take the positions as aligned (the caller resolved with `aligned`). `prologue` (raw queries: the
    decode kernel normalises and rotates them; q may then be a projection's K-split partials [S, R, N·H] of one
    query token a sequence, `decode_attention`) only where `query_prologue` allowed it, and with it `new_key` (the
    token's raw key and value, attended to by the kernel itself)."""
    q_len, head_dim = q_pos.shape[1], k.shape[-1]
    if prologue is not None and not query_prologue(choice, q_len=q_len, head_dim=head_dim):
        raise ValueError(f"raw queries need the decode kernel with head_dim >= 32, not {choice!r} at {q.shape}")
    if choice == "xla":
        return flash_attention_reference(q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal)
    if choice == "cudnn":
        return cudnn_attention(q, k, v, scale=scale, window=window, causal=causal)
    if choice == "mosaic":
        return mosaic_attention(q, k, v, scale=scale, window=window)
    if q_len <= DECODE_MAX_TOKENS:
        config = _decode_call_config(head_dim, k.dtype)
        return decode_attention(q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal, config=config,
                                interpret=choice == "interpret", prologue=prologue, new_key=new_key)
    return flash_attention(q, k, v, q_pos, k_pos, scale=scale, window=window, causal=causal,
                           interpret=choice == "interpret")


# The decode kernel takes a layer's raw queries (their projection's K splits unadded where the skinny kernel ran it)
# and adds them, normalises and rotates them itself (`QueryPrologue`), and in a layer that computes K/V it also
# makes the step's own key and value, attends to them and writes them into the cache in place (`NewKey`): the small
# kernels that did it in XLA leave a decode step's chain (deviceless for an H200, E2B's chain 605 -> 535 kernels;
# docs/kernels.md). Off: on an H100 (2026-12-05, docs/performance.md) it made E2B's and E4B's batch-16 steps 3.2 % and
# 3.5 % slower and their batch-1 steps 1.9 % and 0.4 %, 31B's batch 1 unchanged. Off, the model applies them first.
DECODE_QUERY_PROLOGUE = False
# With the prologue on, whether the kernel also makes the step's own key and value and writes them in place
# (`NewKey`); off, the queries alone go raw and the key and value are written first.
DECODE_NEW_KEY = True
# With the prologue on, whether the kernel takes the projections' float32 K-split partials and adds them itself (every
# program of every key split reads all of its rows' partials: for E2B's queries 12 float32 splits, 24x the bytes of
# the summed bf16 row) or XLA adds them first (a kernel a projection back on the chain; the kernel reads the sums).
DECODE_PROLOGUE_PARTIALS = True


def _decode_call_config(head_dim: int, dtype):
    """The decode kernel's config under DECODE_TARGET_PROGRAMS (None: the kernel's own)."""
    if not DECODE_TARGET_PROGRAMS:
        return None
    return dataclasses.replace(decode_config(head_dim, dtype), target_programs=DECODE_TARGET_PROGRAMS)


def new_key_in_place(choice: str, *, q_len: int, batch: int, kv_heads: int, slots: int, head_dim: int,
                     dtype) -> bool:
    """Whether a decode call resolved to `choice` can attend to its token from the raw key and value and write them
    into the cache itself (`NewKey`): the queries go raw (`query_prologue`), one token a sequence, and the kernel
    reads the cache of `slots` slots unpadded (`decode_attention.writes_in_place`), while DECODE_NEW_KEY is on."""
    return (DECODE_NEW_KEY and q_len == 1 and query_prologue(choice, q_len=q_len, head_dim=head_dim)
            and writes_in_place(batch, kv_heads, slots, head_dim, dtype, _decode_call_config(head_dim, dtype)))


def query_prologue(choice: str, *, q_len: int, head_dim: int) -> bool:
    """Whether a call resolved to `choice` takes raw queries with a `QueryPrologue`: the decode kernel (at most
    DECODE_MAX_TOKENS queries), head_dim of at least 32 (each half of a head feeds its own dot), while
    DECODE_QUERY_PROLOGUE is on."""
    return DECODE_QUERY_PROLOGUE and choice in ("pallas", "interpret") and q_len <= DECODE_MAX_TOKENS and head_dim >= 32


# The programs the decode kernel aims for when it splits the keys (None: its own default, 128; `bench.py generate
# --decode-target-programs N`). Each split beyond one costs a combining kernel after the kernel, on the step's
# critical path; 1 means one program per sequence and KV head and no combine (a short cache's whole read in one
# program). On an H100 (docs/performance.md) 1 made E2B's and E4B's steps 1.2-3.3 % slower (2026-12-05), and 64 (one
# split at E2B's batch 64) 0.8-1.5 % faster at batch 64, at the edge of the call's spread (2026-12-06): the default
# stays.
DECODE_TARGET_PROGRAMS: int | None = None


# Benches set this to 'xla' to time the XLA experts beside the kernels in one process, attention unchanged.
MOE_FORCE: str | None = None
# The Mosaic path's tile plan at a decode step's few routed rows as one kernel (`moe_mgpu.plan_tiles_kernel`)
# instead of XLA's chain of small kernels. Off: 14 % slower at 26B-A4B's batch 16 on an H200 (docs/performance.md).
MOE_PLAN_KERNEL = False
# The Mosaic path without a plan for a call of at most this many tokens (`moe_mgpu.token_tile_experts`: a tile per
# chosen expert over every token; 0: never). On an H200 26B-A4B's batch-16 decode step was 1.5–2.5 % faster with
# it, batch 64 4 % slower (docs/performance.md).
MOE_TOKEN_TILES_MAX_TOKENS = 16


def resolve_moe(impl: str, *, d: int, f: int, rows: int | None = None, dtype=jnp.bfloat16,
                platform: str | None = None) -> str:
    """How the routed experts run ('xla' | 'pallas' | 'mosaic' | 'interpret'), under the same `impl` as attention.

    'auto' and 'cudnn' (cuDNN has no MoE): on a GPU for 16-bit inputs, the Mosaic GPU grouped GEMM
    (`moe_mgpu.moe_experts_mgpu`) on Hopper from MOSAIC_MOE_MIN_ROWS routed rows up, else the grouped Triton
    kernels (`moe.moe_experts`); XLA on the CPU and for float32 (at full precision: `Precision.HIGHEST`, never
    TF32). 'pallas': the Triton kernels for any dtype (float32 operands at IEEE precision). 'xla': the XLA paths
    (a gather of the routed experts at few rows, `ragged_dot` at many). 'interpret': the Triton kernels in
    interpret mode. `MOE_FORCE = 'mosaic'` (benches, tests) forces the Mosaic kernels, interpreted where
    MOSAIC_INTERPRET is set.
    """
    _check_impl(impl)
    impl = MOE_FORCE or impl
    if impl == "xla":
        return "xla"
    if impl == "mosaic":
        if not moe_mgpu_supports(d, f, dtype):
            raise ValueError(f"the Mosaic MoE kernels need 16-bit inputs and D={d}, F={f} multiples of 64")
        return "mosaic"
    if not moe_supports(d, f):
        if impl in ("pallas", "interpret"):
            raise ValueError(f"the MoE kernels need D={d} and F={f} divisible by a power of two of at least 16")
        return "xla"
    if impl in ("pallas", "interpret"):
        return impl
    if not _on_gpu(platform) or jnp.dtype(dtype).itemsize != 2:
        return "xla"
    if (MOSAIC_MOE_MIN_ROWS is not None and rows is not None and rows >= MOSAIC_MOE_MIN_ROWS
            and moe_mgpu_supports(d, f, dtype) and is_hopper() and mosaic_moe_compiles(d, f, jnp.dtype(dtype).name)):
        return "mosaic"
    return "pallas"


# A decode step's router top-k as one kernel after its projection (`router.route`: the splits' sum, top-k, softmax,
# scale and the experts' token table) instead of XLA's chain of small kernels. Off: on an H200 26B-A4B's batch-16
# step was 1.8 % slower with it and batch 1 4.6 % (docs/performance.md); benches turn it on
# (`bench.py generate --router-kernel`).
ROUTER_KERNEL = False
# In a MoE layer the dense MLP beside the experts waits for the router's weights (`model.after`), so that at a decode
# step its projections stream beside the experts instead of beside the router's chain of small kernels, which the
# experts wait for. On: on an H200 26B-A4B's decode step was 1.0-1.4 % faster with it at batch 1, 8 and 16
# (docs/performance.md, eleventh session); the same values (a test compares float32 logits bit for bit). Benches turn
# it off with `bench.py generate --no-dense-after-router`.
DENSE_AFTER_ROUTER = True
# The router normalises its own copy of the stream (`model.after`: x + 0·scale, which XLA can neither fold nor merge
# with x; an optimisation barrier does not stop the merge, checked on the CPU). Without it XLA merges
# the three identical mean-of-squares reductions of a MoE layer's stream (the router's, the dense MLP's and the
# experts' norms) into one, shared by three consumers, so the router's norm is a reduce kernel and then an
# elementwise one on the chain the experts wait for (on an H200: two kernels, docs/performance.md); its own
# reduction can fuse with its own tail. The same values either way. Off: on an H200 26B-A4B's decode step was 0.9 %
# slower with it at batch 16 and 1.1 % at batch 1, and 1.3 % slower than DENSE_AFTER_ROUTER alone at batch 16
# (docs/performance.md, eleventh session); benches turn it on (`bench.py generate --router-own-norm`).
ROUTER_OWN_NORM = False


def resolve_router(impl: str, *, rows: int, d: int, experts: int, k: int, dtype=jnp.bfloat16,
                   platform: str | None = None) -> str:
    """How a MoE router turns x [rows, D] into its top-k ('pallas' | 'interpret' | 'xla'): where its projection
    [D, experts] takes the skinny kernel (`resolve_dense`), ROUTER_KERNEL is set and `router.supports` the shape,
    the projection's K-split partial products go straight into `router.route` ('pallas', or 'interpret' under that
    impl); else the projection, then XLA's top-k."""
    if not ROUTER_KERNEL or not router.supports(rows, experts, k):
        return "xla"
    dense = resolve_dense(impl, rows=rows, k=d, n=experts, dtype=dtype, platform=platform)
    return dense if dense in ("pallas", "interpret") else "xla"


# Benches set this to 'xla' to time XLA's dense projections beside the skinny kernel in one process.
DENSE_FORCE: str | None = None
# The skinny kernel adds its K splits itself (`gemv.gemv(sum_in_kernel=True)`: each column tile's last program
# sums the float32 partials in a fixed order and writes the result), sparing the XLA reduction kernel that follows
# each split launch on a decode step's chain of dependent kernels. True: every projection; "norm": only those whose
# result is normalised or added up next (not gate and up before GELU or the per-layer-input gate, whose elementwise
# work XLA fuses into its sum, and which would then be a kernel of their own: `model.linear`'s into_elementwise).
# Off: on an H200 E2B's decode step was 28-29 % slower with it everywhere and 18-19 % with "norm", though alone
# each launch was at most 2.3 µs slower than the split launch and its sum (docs/performance.md, twelfth session;
# `bench.py generate --gemv-sum-in-kernel [all|norm]`; `bench.py dense` times it beside the default).
GEMV_SUM_IN_KERNEL: bool | str = False
# The skinny kernel's config for a block's output projection at a decode step, where the kernel takes it
# (`model.residual_after`): None, the kernel's default (64-column tiles, K split until 264 programs), whose float32
# partials an XLA reduction adds up on the step's chain before the norm; or a `gemv.GemvConfig`, such as narrow tiles
# and no K split, whose one partial folds into the norm that reads it (deviceless for an H200, E2B's chain 605 -> 570
# kernels at batch 1 and 16). Where its blocks do not tile a weight, the default (`output_projection_config`).
# `bench.py generate --output-projection-config BN,BK,SPLIT[,WARPS,STAGES]`. On an H100 (2026-12-06, twenty-third
# session) every unsplit config tried made E2B's and E4B's steps 0.8-3.9 % slower: the unsplit projection loses more
# than the reduction kernel it removes. None by default.
OUTPUT_PROJECTION_CONFIG: gemv.GemvConfig | None = None


def output_projection_config(k: int, n: int) -> gemv.GemvConfig | None:
    """OUTPUT_PROJECTION_CONFIG where it tiles an output projection W [K,N], else None (the kernel's default)."""
    cfg = OUTPUT_PROJECTION_CONFIG
    return cfg if cfg is not None and gemv.fits(k, n, cfg) else None


# Weights of fewer elements than this go to XLA's product even at a decode step (0: none; `bench.py generate
# --gemv-min-weight`): where XLA fuses the norm before a small projection into its product, the chain is shorter.
GEMV_MIN_WEIGHT = 0


# A one-row product that XLA takes, of a weight of at most this many elements, runs on x padded to GEMV_MAX_ROWS
# rows (0: never; `bench.py generate --one-row-padded-max-weight`). At 16 rows XLA runs a GEMM, which on an H200 took
# E2B's 1536 × 6144 and 6144 × 1536 MLP weights in 7.7 and 6.8 µs. At one row the skinny kernel took 8.8 µs and
# XLA's reduction 12.4 and 10.3 (`bench.py dense`, docs/performance.md, twelfth session). So with those weights
# on XLA (`--gemv-max-weight 6291456`) and padded, E2B's batch-1 step could run its MLP as its batch-16 step does.
# Not yet measured in the model, so off.
ONE_ROW_PADDED_MAX_WEIGHT = 0


def xla_rows(impl: str, *, rows: int, k: int, n: int, platform: str | None = None) -> int:
    """The rows XLA's product of x [rows, K] @ W [K, N] runs on, where `resolve_dense` gave it to XLA: under 'auto'
    or 'cudnn' on a GPU, GEMV_MAX_ROWS for one row when W has at most ONE_ROW_PADDED_MAX_WEIGHT elements (x padded
    with zero rows); else `rows`."""
    impl = DENSE_FORCE or impl
    if rows == 1 and k * n <= ONE_ROW_PADDED_MAX_WEIGHT and impl in ("auto", "cudnn") and _on_gpu(platform):
        return GEMV_MAX_ROWS
    return rows


# The rows a one-sequence decode step's stream runs on (1: as it is; R: the sequence R times; `bench.py generate
# --one-row-stream-rows R` sets both values). XLA drops a unit row dimension: at one row each norm is a reduction to a
# scalar and a separate normalising kernel; from two rows it emits one Triton kernel for a norm, with the residual
# and the next norm inside it (`bench.py chain --target h200`: docs/performance.md, thirteenth and fourteenth
# sessions). The copies cost nothing in the projections (the skinny kernel runs a 16-row block at one row too);
# attention and the cache see the one real row. On an H200 (2026-12-05, fourteenth session) four rows took E2B's
# batch-1 token from 2.703 to 2.494 ms and from 2.784 to 2.501 in another call, E4B's from 4.193 to 4.004, 31B's
# from 16.483 to 16.401 (two rows: 16.524 to 16.292); so models without experts take four. A MoE model's copies
# are routed too: 26B-A4B's token went from 3.609 to 3.862 ms on two rows, so MoE models keep one.
ONE_ROW_STREAM_ROWS = 4
ONE_ROW_STREAM_ROWS_MOE = 1


def stream_rows(batch: int, moe: bool = False) -> int:
    """The rows a decode step of `batch` sequences runs its stream on: for one sequence ONE_ROW_STREAM_ROWS, or
    ONE_ROW_STREAM_ROWS_MOE in a model with routed experts (`moe`), on any platform (only a GPU's fusion gains from
    it); else `batch`."""
    if batch != 1:
        return batch
    return ONE_ROW_STREAM_ROWS_MOE if moe else ONE_ROW_STREAM_ROWS


def gemv_max_weight(rows: int) -> int:
    """The largest weight (K·N elements) a projection of `rows` rows sends to the skinny kernel: GEMV_MAX_WEIGHT
    for one row, GEMV_MAX_WEIGHT_BATCHED for more (this module's copies, which benches change with `bench.py
    generate --gemv-max-weight` (both) and `--gemv-max-weight-batched`)."""
    return GEMV_MAX_WEIGHT if rows <= 1 else GEMV_MAX_WEIGHT_BATCHED


def resolve_dense(impl: str, *, rows: int, k: int, n: int, dtype=jnp.bfloat16, platform: str | None = None) -> str:
    """How a dense projection x [rows,K] @ W [K,N] runs ('xla' | 'pallas' | 'interpret'), under the same `impl`.

    A decode step's projections (at most GEMV_MAX_ROWS rows, weights of at most `gemv_max_weight(rows)` elements
    and of at least GEMV_MIN_WEIGHT) go to the skinny Pallas kernel (`gemv.gemv`, which streams W in place)
    where XLA would lower the smaller ones as a slow column reduction: 'auto' and 'cudnn' on a GPU for 16-bit
    inputs, 'pallas' and 'interpret' for any dtype.
    Everything else, and every shape the kernel does not take, is XLA's.
    """
    _check_impl(impl)
    impl = DENSE_FORCE or impl
    if (impl == "xla" or rows > GEMV_MAX_ROWS or not GEMV_MIN_WEIGHT <= k * n <= gemv_max_weight(rows)
            or not gemv_supports(k, n)):
        return "xla"
    if impl in ("pallas", "interpret"):
        return impl
    return "pallas" if _on_gpu(platform) and jnp.dtype(dtype).itemsize == 2 else "xla"


# Weights read into L2 ahead of their projections (`l2_prefetch.prefetch`): at a decode step on the GPU, once a
# layer's queries are projected, one kernel reads the weights the layer streams next (the output projection, the
# MLP's, the per-layer input's; not a MoE layer's experts), up to L2_PREFETCH_BYTES, while the chain of small kernels
# between the projections leaves HBM idle; the layer's output waits for it (`model.prefetch_weights`). 0: off.
# Measured on an H100 (docs/performance.md, seventeenth session): 24 MiB took 2.7 % off E2B's batch-1 step, 1.7 % off
# its batch-16 one and 3.2 % off E4B's batch-1 one (none at batch 64); 40 MiB took nothing. Only layers whose own
# weights come to at most L2_PREFETCH_MAX_LAYER_BYTES prefetch: small layers are the ones whose step is a chain of
# short kernels; 31B's layers (about 1 GB) already stream near the bandwidth, and a MoE layer's experts (26B-A4B:
# about 1.5 GB a layer) put it past the limit too; neither was measured with it.
L2_PREFETCH_BYTES = 24 << 20
L2_PREFETCH_MAX_LAYER_BYTES = 256 << 20
# A second point, off: once a layer's MLP is done, one more kernel reads what the step streams next, up to this many
# bytes: the layer's per-layer-input weights, then the next layer's q/k/v projections, which otherwise start cold
# after the chain of small kernels between the two layers. Same rule (rows, layer limit). On an H100 (eighteenth
# session) 16 MiB there changed E2B's and E4B's steps by −0.1 % to −0.7 %, within a call's spread.
L2_PREFETCH_NEXT_BYTES = 0
# The kernel's programs (each shares its SM with the step's kernels). On an H200 (2026-12-06) 264 were within the
# call's spread of 132 and 66 were 2-3 % slower; 33 made E2B's steps 42-49 % slower: the chain waits for its layer's
# prefetch (`model.after`), which must end within the layer.
L2_PREFETCH_PROGRAMS = l2_prefetch.PROGRAMS
L2_PREFETCH_LOADS = l2_prefetch.LOADS  # blocks a program of the kernel has in flight at once
L2_PREFETCH_EVICTION = l2_prefetch.EVICTION  # the loads' eviction hint (`l2_prefetch.EVICTIONS`)
# The order a prefetch takes its weights in, and so which of them a budget covers: 'stream', the order the layer reads
# them; 'smallest_first', the small ones first (the output projection and the per-layer input's, whose projections are
# too short to reach the bandwidth from HBM, before the MLP's, which stream near it anyway). On an H100 (2026-12-06)
# 'smallest_first' made E2B's steps 2.3-5.2 % slower (docs/performance.md, "Twenty-third session").
L2_PREFETCH_ORDERS = ("stream", "smallest_first")
L2_PREFETCH_ORDER = "stream"
L2_PREFETCH_MAX_ROWS = 64  # calls of up to this many rows prefetch (longer ones stream each weight at full speed)


def resolve_prefetch(impl: str, *, rows: int, layer_bytes: int, budget: int | None = None, dtype=jnp.bfloat16,
                     platform: str | None = None) -> str | None:
    """How a decode step of `rows` rows reads `budget` bytes (default L2_PREFETCH_BYTES; the second point passes
    L2_PREFETCH_NEXT_BYTES) of a layer's next weights into L2, the layer's own weights being `layer_bytes`:
    'pallas' (the kernel), 'interpret', or None (no prefetch: no budget, a prefill's rows, a layer past
    L2_PREFETCH_MAX_LAYER_BYTES, XLA asked for, or not a 16-bit GPU run under 'auto')."""
    _check_impl(impl)
    impl = DENSE_FORCE or impl
    budget = L2_PREFETCH_BYTES if budget is None else budget
    if (not budget or impl == "xla" or rows > L2_PREFETCH_MAX_ROWS
            or layer_bytes > L2_PREFETCH_MAX_LAYER_BYTES):
        return None
    if impl in ("pallas", "interpret"):
        return impl
    return "pallas" if _on_gpu(platform) and jnp.dtype(dtype).itemsize == 2 else None


def settings() -> str:
    """This module's settings that tests and benches change (read when a program is traced): the text keys
    programs kept across processes (`generation.programs`), so a program traced under other settings misses."""
    names = ("FUSED_PROJECTIONS", "FUSED_ADD_NORM", "DECODE_MAX_TOKENS", "DECODE_KERNEL_MIN_BATCH",
             "DECODE_QUERY_PROLOGUE", "DECODE_NEW_KEY", "DECODE_PROLOGUE_PARTIALS",
             "DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS",
             "CUDNN_MAX_HEAD_DIM", "MOSAIC_HEAD_DIM", "CUDNN_BACKEND", "MOSAIC_INTERPRET", "MOSAIC_MOE_MIN_ROWS",
             "MOE_FORCE", "MOE_PLAN_KERNEL", "MOE_TOKEN_TILES_MAX_TOKENS", "ROUTER_KERNEL", "DENSE_FORCE",
             "GEMV_MAX_WEIGHT", "GEMV_MAX_WEIGHT_BATCHED", "GEMV_MIN_WEIGHT", "GEMV_SUM_IN_KERNEL",
             "DENSE_AFTER_ROUTER", "ROUTER_OWN_NORM", "ONE_ROW_PADDED_MAX_WEIGHT", "ONE_ROW_STREAM_ROWS",
             "ONE_ROW_STREAM_ROWS_MOE", "TARGET_GPU", "OUTPUT_PROJECTION_CONFIG",
             "DECODE_TARGET_PROGRAMS", "L2_PREFETCH_BYTES", "L2_PREFETCH_PROGRAMS", "L2_PREFETCH_LOADS",
             "L2_PREFETCH_EVICTION", "L2_PREFETCH_ORDER", "L2_PREFETCH_MAX_ROWS", "L2_PREFETCH_MAX_LAYER_BYTES",
             "L2_PREFETCH_NEXT_BYTES")
    return ",".join([f"{n}={globals()[n]!r}" for n in names]
                    + [f"gemv.{n}={getattr(gemv, n)!r}" for n in ("TARGET_PROGRAMS", "MIN_BLOCK_N", "MAX_SPLIT_K")]
                    + [f"numerics.{n}={getattr(numerics, n)!r}"
                       for n in ("FLOAT32_APART", "BLOCKED_BACKENDS", "KEY_SUM_BACKENDS")])
