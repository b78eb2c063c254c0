"""The Gemma 4 text decoder in Flax NNX (docs/architecture.md §2).

Owns the modules (RMSNorm-style weights, attention, dense MLP, MoE, per-layer embeddings, decoder
layer, whole decoder) and the pure math helpers they share. The decoder holds one `DecoderLayer` per
layer (`Gemma4Text.layers`, parameter paths `("layers", "<i>", ...)`) and walks them in a Python loop:
each layer's weights are arrays of their own, read in place by a compiled step. (Stacking layers of one
kind on a leading axis is the pipeline's stage layout only: `DecoderLayer(..., stack=n)`.)

Dimension legend (einsums and names use it):
  B batch, T query tokens, S key tokens, D model width, N query heads, K kv heads, G = N/K,
  H head dim, F MLP width, E experts, V vocab, L layers, P per-layer-input width, M = B*T rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Gemma4Config, LayerSpec
from ..kernels import add_norm, dispatch, gemv, l2_prefetch, moe, moe_mgpu, numerics, router
from ..kernels.flash_attention import xla_attention

F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Pure math helpers. Kept as module-level functions so the tests can break them one at a time.


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """x · (mean(x²)+eps)^-½ · w, in float32 (float64 for float64 x), cast back. Gemma 4 weights multiply directly
    (no +1)."""
    xf = x.astype(jnp.promote_types(x.dtype, F32))
    y = xf * jnp.power(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.astype(xf.dtype)
    return y.astype(x.dtype)


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """x, with the same values, as a result that depends on `dep` (x + 0·dep[0]): whatever reads it waits for `dep`
    in the step's graph (XLA keeps a floating-point product with zero, which is NaN for a NaN, so the edge stays).
    `dep` must be finite; a zero of x may change sign, nothing else."""
    return x + (dep.reshape(-1)[0] * 0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """The tanh approximation (`gelu_pytorch_tanh`)."""
    return numerics.gelu_tanh(x)


def inverse_frequencies(theta: float, pairs: int, denominator: int) -> np.ndarray:
    """1 / θ^(2i / denominator) for i < pairs, in float32 as transformers computes them: exponents divided in
    float32, θ^e rounded once to float32 (the power taken in float64), then the float32 reciprocal. NumPy's own
    float32 `**` is a SIMD approximation whose last bit depends on the CPU: on one machine it missed transformers'
    values in 1 entry a layer type, on another in 19 of 128, enough to put float32 logits 3–5× further from
    exact (an angle error grows with the position; docs/architecture.md §8)."""
    exponents = np.arange(0, 2 * pairs, 2, dtype=np.float32) / np.float32(denominator)
    power = np.power(np.float64(np.float32(theta)), exponents.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def rope_inv_freq(spec: LayerSpec) -> np.ndarray:
    """Inverse frequencies [H/2] (float32).

    Sliding layers rotate the whole head (θ=1e4). Full layers use *proportional* RoPE: the first
    `fraction·H/2` pairs rotate with exponent denominator H (the full 512, not the rotated width)
    and the remaining pairs get frequency 0, i.e. pass through unchanged.
    """
    h = spec.head_dim
    rotated = int(spec.rope_fraction * h // 2)
    inv = np.concatenate([inverse_frequencies(spec.rope_theta, rotated, h), np.zeros(h // 2 - rotated, np.float32)])
    return (inv / np.float32(spec.rope_factor)).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B,T,H] computed in float32 and cast to the activation dtype (as transformers does)."""
    freqs = positions_bt[..., None].astype(F32) * jnp.asarray(inv_freq)  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half layout: channel j pairs with j+H/2 (not interleaved)."""
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


def attention_mask(q_pos_bt: jax.Array, k_pos_bs: jax.Array, window: int | None,
                   k_valid_bs: jax.Array | None = None, blocks_bt: jax.Array | None = None) -> jax.Array:
    """[B,T,S] bool: causal, and on sliding layers only keys with k > q − W (W includes the current token).

    `blocks_bt` (queries and keys the same tokens): on sliding layers, tokens of one block (an image)
    also see the block's later tokens — AND(window, OR(causal, same block)), as transformers masks it.
    """
    mask = k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
    if window is not None:
        if blocks_bt is not None:
            mask |= (blocks_bt[:, :, None] >= 0) & (blocks_bt[:, :, None] == blocks_bt[:, None, :])
        mask &= k_pos_bs[:, None, :] > q_pos_bt[:, :, None] - window
    if k_valid_bs is not None:
        mask &= k_valid_bs[:, None, :]
    return mask


def attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """XLA grouped-query attention with scale 1.0 (q_norm/k_norm replace 1/√H): the kernels' one XLA attention."""
    return xla_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale=1.0)


def _matrix_view(eq: str, x: jax.Array, w: jax.Array, impl: str) -> tuple[int, int, int, str]:
    """For `einsum(eq, x, w)` whose contracted dims are x's last c and w's first c: (c, K, rows of x viewed as a
    [rows, K] matrix, how the product runs: `dispatch.resolve_dense`'s choice)."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    c = len(set(xs) & set(ws) - set(out))
    assert xs[len(xs) - c:] == ws[:c] and out == xs[:len(xs) - c] + ws[c:], eq
    k = math.prod(w.shape[:c])
    rows = x.size // k
    return c, k, rows, dispatch.resolve_dense(impl, rows=rows, k=k, n=w.size // k, dtype=x.dtype)


@dataclasses.dataclass(frozen=True)
class SplitK:
    """A projection's float32 K-split partial products [S, R, N] from the skinny kernel, not yet added, with the
    result's shape (its rows may be fewer than R: the first ones) and dtype. Its reader may add them itself (the
    decode kernel's prologue); `value()` adds them as `linear` does."""

    parts: jax.Array
    shape: tuple[int, ...]
    dtype: object

    def value(self) -> jax.Array:
        rows = math.prod(self.shape) // self.parts.shape[-1]
        return gemv.add_parts(self.parts[:, :rows], self.dtype).reshape(self.shape)


def added(x: jax.Array | SplitK) -> jax.Array:
    """A projection's result: x, or its K splits added (`SplitK.value`)."""
    return x.value() if isinstance(x, SplitK) else x


def unadded(x: jax.Array | SplitK) -> jax.Array:
    """What a kernel that adds the splits itself reads: the K-split partials of a `SplitK`, else x."""
    return x.parts if isinstance(x, SplitK) else x


def linear(eq: str, x: jax.Array, w: jax.Array, impl: str = "auto", into_elementwise: bool = False,
           split_k: bool = False, config: gemv.GemvConfig | None = None) -> jax.Array | SplitK:
    """The projection `einsum(eq, x, w)` where the contracted dims are x's last and w's first (every weight
    product of a layer). At a decode step's few rows it can run as the skinny Pallas kernel
    (`kernels.dispatch.resolve_dense`), on x and w viewed as matrices; else it is the einsum itself.
    `into_elementwise`: the result feeds only elementwise work before the next projection (gate and up before
    GELU, the per-layer-input gate), which XLA fuses into the split kernel's sum; `dispatch.GEMV_SUM_IN_KERNEL`
    "norm" leaves those sums to XLA. `split_k`: where the skinny kernel runs and XLA would add its splits, they
    come back unadded (`SplitK`). `config`: the skinny kernel's blocks, where it runs (None: its default)."""
    c, k, rows, choice = _matrix_view(eq, x, w, impl)
    xm, wm = x.reshape(rows, k), w.reshape(k, -1)
    shape = (*x.shape[:x.ndim - c], *w.shape[c:])
    if choice == "xla":
        padded = dispatch.xla_rows(impl, rows=rows, k=k, n=wm.shape[1])
        if padded == rows:
            return numerics.einsum(eq, x, w)
        y = numerics.matmul(jnp.pad(xm, ((0, padded - rows), (0, 0))), wm)[:rows]
    else:
        summed = dispatch.GEMV_SUM_IN_KERNEL
        summed = summed is True or (summed == "norm" and not into_elementwise)
        if split_k and not summed:
            return SplitK(gemv.gemv_parts(xm, wm, config=config, interpret=choice == "interpret"), shape, x.dtype)
        y = gemv.gemv(xm, wm, config=config, interpret=choice == "interpret", sum_in_kernel=summed)
    return y.reshape(shape)


def norm_linears(x_btd: jax.Array, norm_d: jax.Array, eps: float, ws: list[jax.Array], impl: str = "auto",
                 into_elementwise: bool = False, split: bool = False) -> list:
    """[rms_norm(x, norm) @ w for w in ws]: the projections that read one normalised input (queries, keys and
    values; gate and up), each w [D, …] contracted over D, each result [B, T, …]. Where every one of them takes
    the skinny kernel (a decode step's rows, `dispatch.resolve_dense`), one `gemv.gemv_many` launch with the norm
    inside it (a launch costs its ramp and tail whatever it reads: docs/performance.md); else the norm, then
    `linear` for each (XLA merges sibling products itself where it runs them). `split`: the results may come as
    their unadded K splits (`linear`'s `split_k`)."""
    d = x_btd.shape[-1]
    rows = x_btd.size // d
    choices = {dispatch.resolve_dense(impl, rows=rows, k=d, n=w.size // d, dtype=x_btd.dtype) for w in ws}
    if not dispatch.FUSED_PROJECTIONS or len(choices) != 1 or choices == {"xla"}:
        inputs = numerics.unmerged(rms_norm(x_btd, norm_d, eps), len(ws))  # float32 on a GPU: the products apart
        return [linear(f"BTD,D{'FGH'[:w.ndim - 1]}->BT{'FGH'[:w.ndim - 1]}", a, w, impl, into_elementwise,
                       split_k=split) for a, w in zip(inputs, ws, strict=True)]
    ys = gemv.gemv_many(x_btd.reshape(rows, d), [w.reshape(d, -1) for w in ws], norm_d, eps=eps,
                        interpret=choices == {"interpret"})
    return [y.reshape(*x_btd.shape[:-1], *w.shape[1:]) for y, w in zip(ys, ws, strict=True)]


def residual_after(eq: str, x_btd: jax.Array, h: jax.Array, w: jax.Array, post_d: jax.Array, next_d: jax.Array,
                   eps: float, impl: str = "auto") -> tuple[jax.Array, jax.Array | None]:
    """The stream after a block: x + rms_norm(einsum(eq, h, w), post), where w is the block's output projection
    (contracted as in `linear`, its result [B, T, D]). Where that projection takes the skinny kernel and
    `dispatch.FUSED_ADD_NORM` is on, also rms_norm(that, next), the next block's input, from one kernel that adds
    the projection's K-split partials, both norms and the residual (`add_norm.add_norm`); else None (the caller
    normalises).

    `h` may hold fewer rows than the stream: a one-sequence decode step runs its stream on copies of its row and
    attends for the real one (`generation.loop.decode_step`). Where the skinny kernel takes the projection, it
    projects the real row and the stream's rows get copies of the result (the copy fuses into the norm that reads
    it; a copy of h before the kernel would be a kernel of its own on the step's chain). Else h is copied first, so
    the product runs as on the stream's rows."""
    stream_rows = x_btd.shape[0]
    copied = jnp.broadcast_to(h, (stream_rows, *h.shape[1:]))  # h itself where it holds the stream's rows
    _, k, rows, choice = _matrix_view(eq, copied, w, impl)
    d = x_btd.shape[-1]
    if dispatch.FUSED_ADD_NORM and choice != "xla" and add_norm.supports(d):
        interpret = choice == "interpret"
        parts = gemv.gemv_parts(copied.reshape(rows, k), w.reshape(k, d), interpret=interpret)
        xn, a = add_norm.add_norm(parts, x_btd.reshape(rows, d), post_d, next_d, eps=eps, interpret=interpret)
        return xn.reshape(x_btd.shape), a.reshape(x_btd.shape)
    y = linear(eq, copied if choice == "xla" else h, w, impl, config=dispatch.output_projection_config(k, d))
    return x_btd + rms_norm(jnp.broadcast_to(y, (stream_rows, *y.shape[1:])), post_d, eps), None


def prefetch_weights(ws: list[jax.Array], start: jax.Array, rows: int, layer_bytes: int, impl: str = "auto",
                     budget: int | None = None) -> jax.Array | None:
    """At a decode step of `rows` rows in a layer of `layer_bytes` (`dispatch.resolve_prefetch`), one kernel reads
    the first `budget` bytes (default `dispatch.L2_PREFETCH_BYTES`) of the weights `ws`, in order (or the smallest
    first: `dispatch.L2_PREFETCH_ORDER`), into L2 once `start` is computed (`l2_prefetch.prefetch`). Returns what a
    later result must wait for (`after`), or None where nothing runs."""
    budget = dispatch.L2_PREFETCH_BYTES if budget is None else budget
    if not ws:
        return None
    choice = dispatch.resolve_prefetch(impl, rows=rows, layer_bytes=layer_bytes, budget=budget, dtype=ws[0].dtype)
    if choice is None:
        return None
    if dispatch.L2_PREFETCH_ORDER == "smallest_first":  # which weights the budget covers (dispatch's comment)
        ws = sorted(ws, key=lambda w: w.size)
    counts = l2_prefetch.budget_counts([w.size for w in ws], ws[0].dtype.itemsize, budget)
    if not counts[0]:
        return None
    return l2_prefetch.prefetch(ws, start, counts=counts, programs=dispatch.L2_PREFETCH_PROGRAMS,
                                loads=dispatch.L2_PREFETCH_LOADS, eviction=dispatch.L2_PREFETCH_EVICTION,
                                interpret=choice == "interpret")


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Multimodal:
    """Soft tokens merged into a prompt (images, audio), as transformers' Gemma4Model does it.

    features [N, D]: the projected tower outputs (images' and audio clips' soft tokens);
    slots [B, T] int32: the row of `features` each placeholder position takes, −1 on text tokens;
    blocks [B, T] int32: ≥ 0 numbers the tokens of one image, which attend to each other in both directions
    on the sliding layers of models with `use_bidirectional_attention="vision"` (26B-A4B, 31B); −1 elsewhere.
    """

    features: jax.Array
    slots: jax.Array
    blocks: jax.Array

    @property
    def mask(self) -> jax.Array:
        return self.slots >= 0


def vision_blocks(image_mask_bt: np.ndarray) -> np.ndarray:
    """Block ids [B, T]: each run of consecutive image placeholders gets its own id (per row), −1 elsewhere."""
    m = np.asarray(image_mask_bt, bool)
    starts = m & ~np.concatenate([np.zeros_like(m[:, :1]), m[:, :-1]], axis=1)
    return np.where(m, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)


def embed_scale(dim: int, dtype) -> jax.Array:
    """√dim rounded to the parameter dtype first (39.25, not 39.19, for E2B in bf16), as transformers does."""
    return jnp.asarray(math.sqrt(dim), dtype=F32).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Parameter helpers: every parameter declares its logical axes next to its shape.


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, stack: int | None,
           init: str = "normal") -> nnx.Param:
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:  # small normal, like transformers' initializer_range
        value = (0.02 * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, axes=axes)


@dataclasses.dataclass(frozen=True)
class Queries:
    """A layer's queries as their projection gives them (raw [B,T,N,H]) with what makes them attention's queries:
    `value()` is the model's math, rms_norm with the layer's q_norm and then RoPE. An attender with `raw_queries`
    receives them so; the decode kernel then does the same math in its prologue (`kernel_attention`), which
    takes two small kernels off a decode step's chain. Every other attender receives `value()`."""

    raw: jax.Array | SplitK  # [B,T,N,H], or the projection's unadded K splits (the kernel adds them too)
    norm: jax.Array
    eps: float
    cos: jax.Array
    sin: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def dtype(self):
        return self.raw.dtype

    def projected(self) -> jax.Array:
        """The raw queries [B,T,N,H] (their K splits added)."""
        return added(self.raw)

    def value(self) -> jax.Array:
        return apply_rope(rms_norm(self.projected(), self.norm, self.eps), self.cos, self.sin)

    def head(self, n: int) -> Queries:
        """The first n rows (sequences). Unadded splits keep every row (the kernel reads the first n in place)."""
        return Queries(_head(self.raw, n), self.norm, self.eps, self.cos[:n], self.sin[:n])


@dataclasses.dataclass(frozen=True)
class Keys:
    """A K/V-computing layer's keys and values as their projections give them (raw [B,T,K,H] or `SplitK`; for
    k_eq_v the value is the raw key), with what makes them the cache's: `value()` is the model's math (keys:
    rms_norm with k_norm, then RoPE; values: rms_norm without a weight, no RoPE). An attender with `raw_queries`
    receives them so: at a decode step the decode kernel can attend to the token from them itself
    (`kernel_attention`'s `new_key`) while the cache write runs beside it."""

    k: jax.Array | SplitK
    v: jax.Array | SplitK
    norm: jax.Array
    eps: float
    cos: jax.Array
    sin: jax.Array

    def value(self) -> tuple[jax.Array, jax.Array]:
        k, v = added(self.k), added(self.v)
        return apply_rope(rms_norm(k, self.norm, self.eps), self.cos, self.sin), rms_norm(v, None, self.eps)

    def head(self, n: int) -> Keys:
        """The first n rows (sequences); unadded splits keep every row (the kernel reads the first n in place)."""
        k, v = (_head(x, n) for x in (self.k, self.v))
        return Keys(k, v, self.norm, self.eps, self.cos[:n], self.sin[:n])


def _head(x: jax.Array | SplitK, n: int) -> jax.Array | SplitK:
    return SplitK(x.parts, (n, *x.shape[1:]), x.dtype) if isinstance(x, SplitK) else x[:n]


def takes_new_key(choice: str, q, k_bskh) -> bool:
    """Whether a decode call resolved to `choice` over a cache k [B,S,K,H] attends to the step's own token from its
    raw key and value (`Keys`) and writes them into the cache itself (`dispatch.new_key_in_place`)."""
    b, s, kh, h = k_bskh.shape
    return dispatch.new_key_in_place(choice, q_len=q.shape[1], batch=b, kv_heads=kh, slots=s, head_dim=h,
                                     dtype=k_bskh.dtype)


class Attention(nnx.Module):
    """q/k/v/o projections and q/k norms of one layer. K/V-shared layers own no k/v weights."""

    def __init__(self, cfg: Gemma4Config, spec: LayerSpec, dtype, rngs: nnx.Rngs, stack: int | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps = cfg.rms_norm_eps
        self.owns_kv = spec.owns_kv
        self.k_eq_v = spec.k_eq_v
        self.q_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype, stack)
        self.q_norm = _param(rngs, (h,), ("head_dim",), dtype, stack, "ones")
        self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype, stack)
        if self.owns_kv:
            self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, stack)
            self.k_norm = _param(rngs, (h,), ("head_dim",), dtype, stack, "ones")
            if not self.k_eq_v:
                self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, stack)

    def projections(self, owns_kv: bool) -> list[jax.Array]:
        """The weights that read the normalised stream: queries, then (where this layer computes K/V) keys and,
        unless values are the keys, values."""
        ws = [self.q_proj[...]]
        if owns_kv:
            ws.append(self.k_proj[...])
            if not self.k_eq_v:
                ws.append(self.v_proj[...])
        return ws

    def queries(self, q_btnh, cos, sin) -> Queries:
        """The queries from their projection [B,T,N,H], normalised and rotated by `Queries.value` (or by the decode
        kernel, where the attender lets it)."""
        return Queries(q_btnh, self.q_norm[...], self.eps, cos, sin)

    def keys_values(self, k_raw, v_raw, cos, sin) -> Keys:
        """The keys and values from this step's projections (k_eq_v: the value is the raw key projection, taken
        before k_norm and RoPE), normalised and rotated by `Keys.value` (or by the decode kernel)."""
        return Keys(k_raw, v_raw, self.k_norm[...], self.eps, cos, sin)


class MLP(nnx.Module):
    """gelu(x Wg) * (x Wu) Wd."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs, stack: int | None = None):
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), dtype, stack)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), dtype, stack)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), dtype, stack)

    def __call__(self, x_btd, norm_d, eps: float, impl: str = "auto", normed=None):
        """The MLP of rms_norm(x, norm) (the norm is its input's: `norm_linears`), or of `normed` where the caller
        has it already (`residual_after`)."""
        ws = [self.gate[...], self.up[...]]
        if normed is None:
            g, u = norm_linears(x_btd, norm_d, eps, ws, impl, into_elementwise=True)
        else:
            g, u = (linear("BTD,DF->BTF", normed, w, impl, into_elementwise=True) for w in ws)
        return linear("BTF,FD->BTD", gelu(g) * u, self.down[...], impl)


class MoE(nnx.Module):
    """Router and experts (26B-A4B). Only the routed experts are ever computed."""

    def __init__(self, cfg: Gemma4Config, dtype, rngs: nnx.Rngs, stack: int | None = None):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps
        self.router_proj = _param(rngs, (d, e), ("embed", "experts"), dtype, stack)
        self.router_scale = _param(rngs, (d,), ("embed",), dtype, stack, "ones")
        self.per_expert_scale = _param(rngs, (e,), ("experts",), dtype, stack, "ones")
        # Each expert's matrices as the checkpoint stores them, [out, in]: the layout the kernels stream fastest.
        self.gate = _param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, stack)
        self.up = _param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, stack)
        self.down = _param(rngs, (e, d, f), ("experts", "embed", "mlp"), dtype, stack)

    def route(self, x_md, impl: str = "auto"):
        """Top-k weights [M,k] (float32), expert ids [M,k] from the un-normalised stream, and where the router
        kernel ran (a decode step's few rows: `dispatch.resolve_router`) the experts' token table, else None."""
        d = x_md.shape[-1]
        if dispatch.ROUTER_OWN_NORM:  # a reduction of its own, not the one XLA would share (dispatch's comment)
            x_md = after(x_md, self.router_scale[...])
        r = rms_norm(x_md, None, self.eps) * self.router_scale[...] * (d**-0.5)
        proj, scale = self.router_proj[...], self.per_expert_scale[...]
        choice = dispatch.resolve_router(impl, rows=r.shape[0], d=d, experts=proj.shape[-1], k=self.top_k,
                                         dtype=r.dtype)
        if choice != "xla":  # the projection's split sums go straight into one kernel: top-k, softmax, scale, table
            parts = gemv.gemv_parts(r, proj, interpret=choice == "interpret")
            return router.route(parts, scale, top_k=self.top_k, dtype=r.dtype, interpret=choice == "interpret")
        # Transformers takes the softmax over all experts, the top k of it, and renormalises them to sum to 1. The
        # same numbers, one kernel fewer on a decode step's critical path: softmax keeps the order (the top k of the
        # logits are the top k of the probabilities), and the renormalised probabilities are e^l_i / Σ_chosen e^l_j,
        # the softmax over the chosen logits alone; then the per-expert scale (`router.route_reference`).
        w, idx = router.route_reference(linear("MD,DE->ME", r, proj, impl), scale, self.top_k)
        return w, idx, None

    def experts(self, y_md, w_mk, idx_mk, impl: str = "auto", table=None):
        """Σ_k w·expert_k(y) over the routed experts [M,D]. Where `impl` resolves to the kernels
        (`gemma4_jax.kernels.dispatch.resolve_moe`: 16-bit on a GPU by default), the grouped Pallas kernels
        (Triton, or Mosaic GPU on Hopper at many rows) read the routed experts' weights in place; else XLA
        (`moe.moe_experts_xla`: a gather of the chosen experts at few rows, `ragged_dot` at many), at full
        precision for float32. `table`: the router kernel's token table, which the Mosaic token tiles take as is."""
        f, d = self.gate.shape[-2:]
        choice = dispatch.resolve_moe(impl, d=d, f=f, rows=idx_mk.size, dtype=y_md.dtype)
        weights = (self.gate[...], self.up[...], self.down[...])
        if choice == "mosaic":
            return moe_mgpu.moe_experts_mgpu(y_md, w_mk, idx_mk, *weights, interpret=dispatch.MOSAIC_INTERPRET,
                                             plan_kernel=dispatch.MOE_PLAN_KERNEL,
                                             token_tiles=y_md.shape[0] <= dispatch.MOE_TOKEN_TILES_MAX_TOKENS,
                                             table=table)
        if choice != "xla":
            return moe.moe_experts(y_md, w_mk, idx_mk, *weights, interpret=choice == "interpret")
        return moe.moe_experts_xla(y_md, w_mk, idx_mk, *weights,
                                   precision=jax.lax.Precision.HIGHEST if y_md.dtype == F32 else None)


# attend(q [B,T,N,H], kv (k, v) [B,T,K,H] or None for KV-shared layers) -> (o [B,T,N,H], aux)
AttendFn = Callable[[jax.Array, tuple[jax.Array, jax.Array] | None], tuple[jax.Array, object]]


class DecoderLayer(nnx.Module):
    """One decoder layer (or, with `stack=n`, n layers of one kind stacked on a leading axis)."""

    def __init__(self, cfg: Gemma4Config, spec: LayerSpec, dtype, rngs: nnx.Rngs, stack: int | None = None):
        d = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.moe_enabled, self.ple_enabled = spec.moe, spec.ple
        norm = lambda: _param(rngs, (d,), ("embed",), dtype, stack, "ones")  # noqa: E731
        self.input_norm, self.post_attn_norm = norm(), norm()
        self.pre_ffw_norm, self.post_ffw_norm = norm(), norm()
        self.attn = Attention(cfg, spec, dtype, rngs, stack)
        self.mlp = MLP(d, spec.mlp_width, dtype, rngs, stack)
        if spec.moe:
            self.moe = MoE(cfg, dtype, rngs, stack)
            self.pre_ffw_norm_2, self.post_ffw_norm_1, self.post_ffw_norm_2 = norm(), norm(), norm()
        if spec.ple:
            self.ple_gate = _param(rngs, (d, cfg.ple_dim), ("embed", "ple"), dtype, stack)
            self.ple_proj = _param(rngs, (cfg.ple_dim, d), ("ple", "embed"), dtype, stack)
            self.ple_post_norm = norm()
        # Learned scalar that multiplies the whole residual stream at the end of the layer.
        self.layer_scalar = _param(rngs, (), (), dtype, stack, "ones")

    def __call__(self, x_btd, ple_btp, cos, sin, attend: AttendFn, owns_kv: bool | None = None,
                 impl: str = "auto", next_weights: list[jax.Array] = (), taps: dict | None = None):
        """`owns_kv=False` runs a KV-shared layer from a stack that also holds K/V weights (the pipeline
        stores shared layers beside their owning kind); by default the stack's own kind decides. `impl` is
        the run's kernel setting, for the MoE experts and the decode-step projections (attention gets it through
        `attend`). `next_weights`: what the next layer reads first (its q/k/v projections), for the L2 prefetch
        after this layer's MLP (`dispatch.L2_PREFETCH_NEXT_BYTES`). `taps`, when given, receives the values inside
        the layer where transformers' layer has them too (diagnostics: `bench.py numerics --per-layer`): the stream
        after the attention block, the dense MLP's output, the routed experts' output, and inside the attention block
        the normalised input, the queries' and keys' projections, the attention's output, its projection and that
        projection normalised. The last two and the normalised input are made again from the inputs the forward's
        helpers took, with the same ops."""
        eps = self.eps
        keep = taps.__setitem__ if taps is not None else lambda name, value: None
        with jax.named_scope("attention"):  # named scopes: device traces name the layer's parts
            owns = self.attn.owns_kv if owns_kv is None else owns_kv
            # the projections' K splits may stay unadded: the decode kernel adds them in its prologue
            q, *kv = norm_linears(x_btd, self.input_norm[...], eps, self.attn.projections(owns), impl,
                                  split=dispatch.DECODE_QUERY_PROLOGUE and dispatch.DECODE_PROLOGUE_PARTIALS)
            # the projections' input is ready: the next weights stream into L2 beside the attention block's chain
            # (started from the queries' norm and RoPE instead, the step's chain grew a kernel a layer)
            rows, layer_bytes = x_btd.shape[0] * x_btd.shape[1], self.weight_bytes()
            token = prefetch_weights(self.weights_after_queries(), unadded(q), rows, layer_bytes, impl)
            keep("queries", q)
            if owns:
                keep("keys", kv[0])
            q = self.attn.queries(q, cos, sin)
            kv = self.attn.keys_values(kv[0], kv[-1], cos, sin) if owns else None  # kv[-1] is kv[0] if k_eq_v
            o, aux = attend(q, kv)
            keep("attention", o)
            if taps is not None:
                taps["normed"] = rms_norm(x_btd, self.input_norm[...], eps)
                taps["projected"] = linear("BTNH,NHD->BTD", o, self.attn.o_proj[...], impl)
                taps["projected_normed"] = rms_norm(taps["projected"], self.post_attn_norm[...], eps)
            x, a = residual_after("BTNH,NHD->BTD", x_btd, o, self.attn.o_proj[...], self.post_attn_norm[...],
                                  self.pre_ffw_norm[...], eps, impl)
        keep("attention_residual", x)

        b, t, d = x.shape
        x_mlp = x
        if self.moe_enabled:
            with jax.named_scope("moe"):
                x_md = x.reshape(b * t, d)
                w, idx, table = self.moe.route(x_md, impl)  # the router sees the un-normalised stream
            if dispatch.DENSE_AFTER_ROUTER:  # the dense MLP starts once the router is done (dispatch's comment)
                if a is None:  # the input the MLP reads: the stream it normalises, or the norm given to it
                    x_mlp = after(x, w)
                else:
                    a = after(a, w)
        with jax.named_scope("mlp"):
            f = self.mlp(x_mlp, self.pre_ffw_norm[...], eps, impl, normed=a)
            keep("mlp", f)
            # the MLP is done: what the step reads next (the per-layer input's weights, the next layer's
            # projections) streams into L2 beside the chain of small kernels between the two layers
            ple_ws = [self.ple_gate[...], self.ple_proj[...]] if self.ple_enabled else []
            token_next = prefetch_weights(ple_ws + list(next_weights), f, rows, layer_bytes, impl,
                                          budget=dispatch.L2_PREFETCH_NEXT_BYTES)
        if self.moe_enabled:
            with jax.named_scope("moe"):
                dense = rms_norm(f, self.post_ffw_norm_1[...], eps)
                m = self.moe.experts(rms_norm(x_md, self.pre_ffw_norm_2[...], eps), w, idx, impl, table)
                keep("experts", m)
                f = dense + rms_norm(m.reshape(b, t, d), self.post_ffw_norm_2[...], eps)
        x = x + rms_norm(f, self.post_ffw_norm[...], eps)

        if self.ple_enabled:
            with jax.named_scope("per_layer_input"):
                g = gelu(linear("BTD,DP->BTP", x, self.ple_gate[...], impl, into_elementwise=True)) * ple_btp
                x = x + rms_norm(linear("BTP,PD->BTD", g, self.ple_proj[...], impl), self.ple_post_norm[...], eps)
        x = x * self.layer_scalar[...]
        for dep in (token, token_next):
            x = x if dep is None else after(x, dep)
        return x, aux

    def weight_bytes(self) -> int:
        """Bytes of this layer's own weights (its experts' included)."""
        return sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def weights_after_queries(self) -> list[jax.Array]:
        """The weights this layer streams after its q/k/v projections, in the order it reads them: the output
        projection, the MLP's, the per-layer input's (a MoE layer's experts are not among them)."""
        ws = [self.attn.o_proj[...], self.mlp.gate[...], self.mlp.up[...], self.mlp.down[...]]
        if self.ple_enabled:
            ws += [self.ple_gate[...], self.ple_proj[...]]
        return ws


# -- the model's pieces as functions of arrays: the one source for both runtimes (this module's Gemma4Text and
#    the pipeline's stage programs) --------------------------------------------------------------------------


def embed(table_vd, ids_bt, dtype) -> jax.Array:
    """Token embeddings scaled by √D (in `dtype`, as the model rounds the scale)."""
    return table_vd[ids_bt] * embed_scale(table_vd.shape[-1], dtype)


def merge_soft_tokens(x_btd, features_nd, slots_bt) -> jax.Array:
    """Soft tokens (image / audio features) overwrite the placeholders where `slots` ≥ 0 (feature row index)."""
    return jnp.where(slots_bt[..., None] >= 0, features_nd[jnp.maximum(slots_bt, 0)].astype(x_btd.dtype), x_btd)


def per_layer_inputs(cfg: Gemma4Config, table, proj_dlp, norm_p, ids_bt, h_btd, dtype) -> jax.Array:
    """[B,T,L,P]: (RMS((h Wp)·D^-½) + E_ple[ids]·√P) · 2^-½, for the L layers whose columns `table` [V, L·P]
    and `proj` [D, L, P] hold (all of them, or a pipeline stage's)."""
    ids = jnp.where((ids_bt >= 0) & (ids_bt < cfg.ple_vocab_size), ids_bt, 0)
    b, t = ids_bt.shape
    n, p = proj_dlp.shape[1:]
    tok = (table[ids] * embed_scale(p, dtype)).reshape(b, t, n, p)  # rows are L·P wide; the scale is √P
    ctx = numerics.einsum("BTD,DLP->BTLP", h_btd, proj_dlp) * (cfg.hidden_size**-0.5)
    ctx = rms_norm(ctx, norm_p, cfg.rms_norm_eps)
    return (ctx + tok) * (2.0**-0.5)


def head(cfg: Gemma4Config, final_norm_d, table_vd, x_btd) -> jax.Array:
    """Final norm, head (tied: the raw, unscaled embedding), soft cap; float32 logits [B,T,V]."""
    x = rms_norm(x_btd, final_norm_d, cfg.rms_norm_eps)
    logits = numerics.einsum("BTD,VD->BTV", x, table_vd, preferred_element_type=F32)
    return softcap(logits, cfg.final_logit_softcap)


def run_layers(layers, x_btd, ple_btlp, pos_bt, attender: Attender, dtype, taps: list | None = None) -> jax.Array:
    """The decoder layers in order: `layers` yields (spec, DecoderLayer, column of `ple` for it); RoPE tables
    once per attention type; attention delegated to `attender`. `taps` receives a dict a layer: the stream entering
    it ("input") and the values `DecoderLayer` taps inside it."""
    rope = {}
    layers = list(layers)
    for i, (spec, layer, j) in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) and dispatch.L2_PREFETCH_NEXT_BYTES else None
        if spec.attn_type not in rope:
            rope[spec.attn_type] = rope_cos_sin(pos_bt, rope_inv_freq(spec), dtype)

        def attend(q, kv, spec=spec):
            if attender.raw_queries:
                return attender(spec, q, kv), None
            return attender(spec, q.value(), kv and kv.value()), None

        if taps is not None:
            taps.append({"input": x_btd})
        with jax.named_scope(f"layer_{spec.index}"):
            x_btd, _ = layer(x_btd, ple_btlp[:, :, j] if ple_btlp is not None else None, *rope[spec.attn_type],
                             attend, owns_kv=spec.owns_kv, impl=attender.impl,
                             next_weights=nxt[1].attn.projections(nxt[0].owns_kv) if nxt else (),
                             taps=taps[-1] if taps is not None else None)
    return x_btd


class Gemma4Text(nnx.Module):
    """Embedding, per-layer embeddings, the decoder layers, final norm and head (the embedding itself when
    `tie_word_embeddings`, as every released Gemma 4 checkpoint; else its own `lm_head` [V,D])."""

    def __init__(self, cfg: Gemma4Config, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        d = cfg.hidden_size
        self.embed = _param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), dtype, None)
        if cfg.ple_dim:
            self.ple_embed = _param(rngs, (cfg.ple_vocab_size, cfg.num_layers * cfg.ple_dim),
                                    ("vocab", "layers_ple"), dtype, None)
            self.ple_proj = _param(rngs, (d, cfg.num_layers, cfg.ple_dim), ("embed", "layers", "ple"), dtype, None)
            self.ple_norm = _param(rngs, (cfg.ple_dim,), ("ple",), dtype, None, "ones")
        self.final_norm = _param(rngs, (d,), ("embed",), dtype, None, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), dtype, None)
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype, rngs) for spec in cfg.layers])

    # -- pieces ---------------------------------------------------------------------------------
    def embed_tokens(self, ids_bt):
        return embed(self.embed[...], ids_bt, self.dtype)

    def per_layer_inputs(self, ids_bt, h_btd):
        """[B,T,L,P] (`per_layer_inputs`)."""
        return per_layer_inputs(self.cfg, self.ple_embed[...], self.ple_proj[...], self.ple_norm[...], ids_bt, h_btd,
                                self.dtype)

    def head(self, x_btd):
        """Float32 logits [B,T,V] (`head`, with the embedding when tied, else `lm_head`)."""
        table = self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...]
        return head(self.cfg, self.final_norm[...], table, x_btd)

    # -- whole forward ----------------------------------------------------------------------------
    def embed_inputs(self, ids_bt, mm: Multimodal | None = None):
        """The input stream [B,T,D] and per-layer inputs [B,T,L,P] (None without PLE).

        With soft tokens (`mm`), as transformers' Gemma4Model: placeholders are embedded as the pad id and
        then overwritten by the features; the per-layer inputs take the pad id there (token part) and the
        merged stream (context part).
        """
        cfg = self.cfg
        ids = ids_bt if mm is None else jnp.where(mm.mask, cfg.pad_token_id, ids_bt)
        x = self.embed_tokens(ids)  # embedded once: placeholders as the pad id
        if mm is not None and mm.features.shape[0]:
            x = merge_soft_tokens(x, mm.features, mm.slots)
        return x, (self.per_layer_inputs(ids, x) if cfg.ple_dim else None)

    def decode_layers(self, ids_bt: jax.Array, pos_bt: jax.Array, attender: Attender,
                      mm: Multimodal | None = None, taps: list | None = None) -> jax.Array:
        """Embed (merging soft tokens `mm`), run every layer (attention delegated to `attender`), return
        the final stream [B,T,D]. `taps`, when given, receives what each layer taps (`run_layers`; diagnostics)."""
        x, ple = self.embed_inputs(ids_bt, mm)
        layers = ((spec, layer, spec.index) for spec, layer in zip(self.cfg.layers, self.layers, strict=True))
        return run_layers(layers, x, ple, pos_bt, attender, self.dtype, taps)

    def __call__(self, ids_bt: jax.Array, impl: str = "auto", mm: Multimodal | None = None) -> jax.Array:
        """Full causal forward over [B,T] token ids (positions 0..T-1), soft tokens `mm` merged; float32
        logits [B,T,V]."""
        b, t = ids_bt.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        attender = FullAttender(pos, impl=impl, blocks_bt=self.blocks(mm))
        return self.head(self.decode_layers(ids_bt, pos, attender, mm))

    def blocks(self, mm: Multimodal | None) -> jax.Array | None:
        """The image blocks that attend bidirectionally, when this model does that."""
        return mm.blocks if mm is not None and self.cfg.bidirectional_vision else None


class Attender:
    """Supplies attention to the layers: `attender(spec, q, kv) -> o` with kv None on KV-shared layers; o has q's
    rows, or only the real ones on a stream of copied rows (`generation.cache.DecodeAttender`). `impl` is the run's
    kernel setting (the layers' MoE experts follow it too)."""

    impl: str = "auto"
    raw_queries: bool = False  # True: q comes as `Queries` (norm and RoPE not yet applied), else as its value

    def __call__(self, spec: LayerSpec, q_btnh: jax.Array, kv) -> jax.Array:
        raise NotImplementedError


def attention_impl(impl: str, q_btnh: jax.Array, k_bskh: jax.Array, aligned: bool = False) -> str:
    """'xla' or the library choice for this call (`gemma4_jax.kernels.dispatch`: 'auto' is XLA on CPU).

    `aligned`: queries and keys are the same tokens at positions 0..T-1 (prefill), which cuDNN can take. q may be
    `Queries` (their raw shape is theirs).
    """
    if isinstance(q_btnh, Queries):
        q_btnh = jax.ShapeDtypeStruct(q_btnh.shape, q_btnh.dtype)
    return dispatch.resolve(impl, head_dim=q_btnh.shape[-1], group=q_btnh.shape[2] // k_bskh.shape[2],
                            dtype=q_btnh.dtype, q_len=q_btnh.shape[1], batch=q_btnh.shape[0], aligned=aligned,
                            keys=k_bskh.shape[1])


def kernel_attention(choice: str, q_btnh, k_bskh, v_bskh, q_pos_bt, k_pos_bs, window: int | None,
                     new_key: Keys | None = None, new_slot: jax.Array | None = None):
    """The dispatcher's non-XLA paths with the model's semantics: scale 1.0, mask from positions (k_pos −1 =
    invalid). `choice` is what `attention_impl` resolved (once per call site). q may be `Queries`: the decode
    kernel applies their norm and RoPE itself where `dispatch.query_prologue` allows, else they are applied here.
    `new_key` (only where `takes_new_key`): the step's token's raw key and value, which the kernel attends to and
    writes into slot `new_slot` [B] of the cache (which does not hold the token yet); then the call returns
    (o, the cache's new k, v)."""
    prologue = new = None
    if new_key is not None:
        assert takes_new_key(choice, q_btnh, k_bskh), "new_key needs the decode kernel's prologue at one token"
        new = dispatch.NewKey(unadded(new_key.k), unadded(new_key.v), new_key.norm, new_slot)
    if isinstance(q_btnh, Queries):
        q = q_btnh
        if dispatch.query_prologue(choice, q_len=q.shape[1], head_dim=q.shape[-1]):
            prologue = dispatch.QueryPrologue(q.norm, q.cos, q.sin, q.eps)
            split = isinstance(q.raw, SplitK) and q.shape[1] == 1
            q_btnh = q.raw.parts if split else q.projected()  # the kernel adds one token's splits itself
        else:
            q_btnh = q.value()
    return dispatch.run_attention(choice, q_btnh, k_bskh, v_bskh, q_pos_bt, k_pos_bs, scale=1.0, window=window,
                                  prologue=prologue, new_key=new)


class FullAttender(Attender):
    """Attention over the step's own tokens (no cache): the full forward pass and prefill.

    `pos_bt` must be 0..T-1 in every row (tokens past `valid_bt` are padding at the end): the dispatcher may
    hand such calls to cuDNN, which knows only that layout. `impl` ('auto' | 'xla' | 'cudnn' | 'pallas' |
    'interpret', see `gemma4_jax.kernels.dispatch`) picks XLA, cuDNN or the kernels.
    """

    def __init__(self, pos_bt: jax.Array, valid_bt: jax.Array | None = None, impl: str = "auto",
                 blocks_bt: jax.Array | None = None):
        self.pos, self.valid, self.impl, self.blocks = pos_bt, valid_bt, impl, blocks_bt
        self.kv_of: dict[int, tuple[jax.Array, jax.Array]] = {}  # source layer -> its (k, v)

    def __call__(self, spec, q, kv):
        if kv is None:
            kv = self.kv_of[spec.kv_source]
        else:
            self.kv_of[spec.index] = kv
        bidirectional = self.blocks is not None and spec.window is not None
        impl = "xla" if bidirectional else attention_impl(self.impl, q, kv[0], aligned=True)  # kernels: causal only
        if impl == "xla":
            mask = attention_mask(self.pos, self.pos, spec.window, self.valid, self.blocks if bidirectional else None)
            return attention(q, *kv, mask)
        k_pos = self.pos if self.valid is None else jnp.where(self.valid, self.pos, -1)
        return kernel_attention(impl, q, *kv, self.pos, k_pos, spec.window)


def init_model(cfg: Gemma4Config, dtype=jnp.float32, seed: int = 0) -> Gemma4Text:
    """A randomly initialised model (tests, benchmarks)."""
    return Gemma4Text(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: Gemma4Config, dtype=jnp.float32) -> Gemma4Text:
    """The model with ShapeDtypeStructs for parameters: shapes without memory (loading, counting)."""
    return nnx.eval_shape(lambda: Gemma4Text(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(model: Gemma4Text) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def target_shapes(cfg: Gemma4Config, dtype) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every parameter of the model, keyed by path (a fresh dict; the abstract model behind
    it is built once per config and dtype: seconds for a real variant, and loading asks several times)."""
    return dict(_param_shapes(cfg, np.dtype(dtype).name))


@functools.cache
def _param_shapes(cfg: Gemma4Config, dtype_name: str) -> tuple:
    return tuple((path, (tuple(var.get_value().shape), np.dtype(var.get_value().dtype)))
                 for path, var in iter_params(abstract_model(cfg, jnp.dtype(dtype_name))))


def iter_params(module: nnx.Module):
    """(path, Param) for every parameter of a module, paths as attribute/key names."""
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            yield tuple(str(x) for x in path), var


class Structure:
    """A model's graphdef and its state's tree structure, as one static argument of the compiled programs (which
    take the parameters as a flat list): hashed once. Hashing the graphdef of one node per layer and flattening
    its NNX State cost milliseconds on every call (measured on the CPU for E4B's 42 layers: 5.3 ms a dispatch,
    against 0.5 ms for the same arrays held as stacks)."""

    __slots__ = ("graphdef", "treedef", "_hash", "_key")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))
        self._key = None

    @property
    def cache_key(self) -> str:
        """The same text in every process for an equal structure (`generation.programs` keys programs by it)."""
        if self._key is None:
            self._key = hashlib.sha256((repr(self.graphdef) + str(self.treedef)).encode()).hexdigest()
        return self._key

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Structure) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)


def split(module: nnx.Module) -> tuple[Structure, list[jax.Array]]:
    """(structure, parameters as a flat list): the form the compiled programs take (`merge` inverts it)."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return Structure(graphdef, treedef), leaves


def merge(structure, params):
    """The module of `split`'s (structure, parameter list), or of `nnx.split`'s (graphdef, state)."""
    if isinstance(structure, Structure):
        return nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, params))
    return nnx.merge(structure, params)
