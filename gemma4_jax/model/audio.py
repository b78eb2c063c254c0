"""The Gemma 4 audio tower (E2B/E4B, docs/architecture.md §5) and its embedder, in Flax NNX.

Owns the audio configuration (`AudioConfig`), the USM-style conformer that turns log-mel features
into soft tokens (conv subsampling front end, chunked local attention with a relative position
term, light conv module, macaron FFNs), `embed_audio` (RMS without scale, Linear → text width),
the strict table from transformers' tensor names (`model.audio_tower.…`, `model.embed_audio.…`)
to our parameters, and the helpers that turn per-clip features into the soft tokens a prompt gets.

Numerics follow transformers' `Gemma4Model.get_audio_features` + `embed_audio`: attention runs in
float32 whatever the parameter dtype; norms are float32 inside and cast back.

Dimension legend (einsums and names use it):
  B clips, T frames (mel frames at the input, soft tokens after subsampling), F mel bins,
  C chunk (query block), U blocks = ceil(T/C), W key context per block, L relative positions,
  D audio width, N heads, H head dim, O output width (`output_proj_dims`), E text width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import CheckpointError, ConfigError
from ..kernels import numerics
from .text import rms_norm, softcap

F32 = jnp.float32
TOWER_PREFIX = "model.audio_tower."
EMBED_PREFIX = "model.embed_audio."
# transformers builds the FFN norms and the layer's own three norms as `Gemma4RMSNorm(hidden_size)`,
# i.e. with the class default eps, not `rms_norm_eps` (the light conv and embedder norms do use it).
FIXED_NORM_EPS = 1e-6
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
               "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclass(frozen=True)
class AudioConfig:
    """The parsed `audio_config` plus the text width the embedder projects to. Hashable (static under jit)."""

    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    hidden_act: str = "silu"
    conv_channels: tuple[int, int] = (128, 32)  # the two stride-2 Conv2d layers of the front end
    conv_kernel_size: int = 5  # depthwise causal conv of the light conv module
    residual_weight: float = 0.5  # FFN residual scale
    chunk_size: int = 12
    context_left: int = 13  # key window reaches context_left − 1 frames back (see chunk_mask)
    context_right: int = 0
    logit_cap: float = 50.0
    invalid_logit: float = -1e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_dims: int = 1536
    text_hidden_size: int = 1536

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], text_hidden_size: int | None = None) -> AudioConfig:
        """From a whole `config.json` dict (takes `audio_config` and `text_config.hidden_size`) or from
        an `audio_config` dict alone, then `text_hidden_size` is required."""
        if "audio_config" in config:
            if config["audio_config"] is None:
                raise ConfigError("this config has no audio tower (audio_config is null)")
            text = config.get("text_config") or {}
            text_hidden_size = text_hidden_size or text.get("hidden_size")
            config = config["audio_config"]
        if config.get("model_type", "gemma4_audio") != "gemma4_audio":
            raise ConfigError(f"audio_config has model_type {config['model_type']!r}, expected 'gemma4_audio'")
        if text_hidden_size is None:
            raise ConfigError("the audio embedder needs the text hidden_size (pass text_hidden_size)")
        d = cls()
        get = lambda key, default: config.get(key, default)  # noqa: E731
        cfg = cls(
            hidden_size=int(get("hidden_size", d.hidden_size)),
            num_layers=int(get("num_hidden_layers", d.num_layers)),
            num_heads=int(get("num_attention_heads", d.num_heads)),
            hidden_act=str(get("hidden_act", d.hidden_act)),
            conv_channels=tuple(int(c) for c in get("subsampling_conv_channels", d.conv_channels)),
            conv_kernel_size=int(get("conv_kernel_size", d.conv_kernel_size)),
            residual_weight=float(get("residual_weight", d.residual_weight)),
            chunk_size=int(get("attention_chunk_size", d.chunk_size)),
            context_left=int(get("attention_context_left", d.context_left)),
            context_right=int(get("attention_context_right", d.context_right)),
            logit_cap=float(get("attention_logit_cap", d.logit_cap)),
            invalid_logit=float(get("attention_invalid_logits_value", d.invalid_logit)),
            use_clipped_linears=bool(get("use_clipped_linears", d.use_clipped_linears)),
            rms_norm_eps=float(get("rms_norm_eps", d.rms_norm_eps)),
            gradient_clipping=float(get("gradient_clipping", d.gradient_clipping)),
            output_dims=int(get("output_proj_dims", d.output_dims)),
            text_hidden_size=int(text_hidden_size),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"audio hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if len(self.conv_channels) != 2:
            raise ConfigError(f"subsampling_conv_channels must have 2 entries, got {list(self.conv_channels)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported audio hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.chunk_size < 1 or self.context_left < 1 or self.context_right < 0:
            raise ConfigError("audio attention needs chunk_size >= 1, context_left >= 1, context_right >= 0")

    # -- derived sizes ----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_past(self) -> int:
        """Past frames each block's key window reaches back (`context_left` counts the current frame)."""
        return self.context_left - 1

    @property
    def context_size(self) -> int:
        """W: keys per query block, [block start − max_past, block end + context_right)."""
        return self.chunk_size + self.max_past + self.context_right

    @property
    def num_rel_positions(self) -> int:
        """L: transformers' sinusoid table holds distances W//2 … 0 (not max_past … 0; equal for 12/13/0)."""
        return self.context_size // 2 + 1

    @property
    def proj_in(self) -> int:
        """Width of the flattened front-end output. transformers sizes it as (c0 // 4)·c1, which only fits
        features with ceil(ceil(F/2)/2) = c0 // 4 mel bins (128 bins with the real 128/32 channels)."""
        return (self.conv_channels[0] // 4) * self.conv_channels[1]


def num_soft_tokens(input_features_mask: np.ndarray) -> np.ndarray:
    """Soft tokens per clip [B]: valid frames among 0, 4, 8, … (two stride-2 subsamplings of the mask)."""
    return np.asarray(input_features_mask, bool)[:, ::2][:, ::2].sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# Pure math helpers.


def clamp(x: jax.Array, limit: float) -> jax.Array:
    """transformers' `gradient_clipping` clamp, with the limit capped at the dtype's max."""
    limit = min(limit, float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -limit, limit)


def layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with a weight and no bias, float32 inside."""
    xf = x.astype(F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(F32)).astype(x.dtype)


def rel_pos_embedding(cfg: AudioConfig, dtype) -> jax.Array:
    """[L, D] sinusoids [sin…, cos…] of the distances W//2, …, 1, 0 (float32 math, cast to `dtype`)."""
    n = cfg.hidden_size // 2
    step = math.log(10000.0) / max(n - 1, 1)
    inv_timescales = np.exp(np.arange(n, dtype=np.float32) * np.float32(-step))
    t = np.arange(cfg.num_rel_positions - 1, -1, -1, dtype=np.float32)[:, None] * inv_timescales
    return jnp.asarray(np.concatenate([np.sin(t), np.cos(t)], axis=-1)).astype(dtype)


def chunk_mask(cfg: AudioConfig, valid_bt: jax.Array) -> jax.Array:
    """[B, U, C, W] bool: query c of block u may see key w of that block's window.

    Query frame q = uC + c, key frame k = uC − max_past + w, d = q − k. transformers allows
    0 ≤ d < context_left − 1 (so the oldest frame of the window is never seen: 11 past frames, not 12,
    on the real config) or 0 < −d < context_right (one future frame fewer than the window holds), on
    valid keys inside [0, T). Queries past T (block padding) see nothing.
    """
    t = valid_bt.shape[1]
    c, w = cfg.chunk_size, cfg.context_size
    u = -(-t // c)
    q_uc = np.arange(u)[:, None] * c + np.arange(c)[None]
    k_uw = np.arange(u)[:, None] * c - cfg.max_past + np.arange(w)[None]
    d_ucw = q_uc[:, :, None] - k_uw[:, None, :]
    window = ((d_ucw >= 0) & (d_ucw < cfg.context_left - 1)) | ((d_ucw < 0) & (-d_ucw < cfg.context_right))
    window &= (q_uc < t)[:, :, None] & ((k_uw >= 0) & (k_uw < t))[:, None, :]
    k_valid_buw = valid_bt[:, np.clip(k_uw, 0, t - 1)]
    return jnp.asarray(window)[None] & k_valid_buw[:, :, None, :]


def key_blocks(x_btnh: jax.Array, cfg: AudioConfig) -> jax.Array:
    """[B, U, W, N, H]: block u's key window, frames uC − max_past … uC + C + context_right − 1 (zeros outside)."""
    t = x_btnh.shape[1]
    c, w = cfg.chunk_size, cfg.context_size
    u = -(-t // c)
    padded = jnp.pad(x_btnh, ((0, 0), (cfg.max_past, cfg.context_right + c - 1), (0, 0), (0, 0)))
    return padded[:, np.arange(u)[:, None] * c + np.arange(w)[None]]


def rel_shift(x_bnucl: jax.Array, w: int) -> jax.Array:
    """Transformer-XL shift [B,N,U,C,L] → [B,N,U,C,W]: out[c, j] = x[c, j − c] for 0 ≤ j − c < L, 0 for
    L ≤ j − c; j < c reads the previous row's tail (always masked). Done as pad-flatten-crop, exactly
    as transformers does, so that every entry matches."""
    b, n, u, c, l = x_bnucl.shape
    x = jnp.pad(x_bnucl, ((0, 0),) * 4 + ((0, w + 1 - l),))
    x = x.reshape(b, n, u, c * (w + 1))[..., : c * w]
    return x.reshape(b, n, u, c, w)


# ---------------------------------------------------------------------------------------------
# Modules. Every parameter declares its logical axes; `stack=n` puts n layers on a leading axis.


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, stack: int | None,
           fill=None) -> nnx.Param:
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if fill is None:  # small normal, like transformers' initializer_range
        value = (0.02 * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    else:
        value = jnp.broadcast_to(jnp.asarray(fill, F32), shape).astype(dtype)
    return nnx.Param(value, axes=axes)


class ClippableLinear(nnx.Module):
    """x W with, when configured, x clamped to [in_min, in_max] before and the result to [out_min, out_max]
    after. `bounds` holds (in_min, in_max, out_min, out_max); ±inf (no clamp) until loaded."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: AudioConfig, dtype, rngs, stack=None):
        self.weight = _param(rngs, (d_in, d_out), axes, dtype, stack)
        self.clipped = cfg.use_clipped_linears
        if self.clipped:
            inf = float("inf")
            self.bounds = _param(rngs, (4,), ("clip",), dtype, stack, fill=[-inf, inf, -inf, inf])

    def __call__(self, x):
        if not self.clipped:
            return numerics.matmul(x, self.weight[...])
        lo_in, hi_in, lo_out, hi_out = (self.bounds[..., i] for i in range(4))
        return jnp.clip(numerics.matmul(jnp.clip(x, lo_in, hi_in), self.weight[...]), lo_out, hi_out)


class FeedForward(nnx.Module):
    """x + s · RMS(W2 act(W1 RMS(clamp x))) with s = `residual_weight` (½: the macaron half-step FFN)."""

    def __init__(self, cfg: AudioConfig, dtype, rngs, stack=None):
        d = cfg.hidden_size
        self.cfg = cfg
        self.pre_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)
        self.up = ClippableLinear(d, 4 * d, ("audio_embed", "audio_mlp"), cfg, dtype, rngs, stack)
        self.down = ClippableLinear(4 * d, d, ("audio_mlp", "audio_embed"), cfg, dtype, rngs, stack)
        self.post_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)

    def __call__(self, x_btd):
        cfg = self.cfg
        h = rms_norm(clamp(x_btd, cfg.gradient_clipping), self.pre_norm[...], FIXED_NORM_EPS)
        h = self.down(ACTIVATIONS[cfg.hidden_act](self.up(h)))
        h = rms_norm(clamp(h, cfg.gradient_clipping), self.post_norm[...], FIXED_NORM_EPS)
        return x_btd + h * cfg.residual_weight


class ChunkedAttention(nnx.Module):
    """Local self-attention in blocks of C queries, each over its W-frame key window.

    logits = q·k + q·r (r: projected sinusoid of the relative distance, Transformer-XL style), soft-capped
    at `logit_cap`. No 1/√H: q carries H^-½/ln2 · softplus(per_dim_scale) and k carries ln(1+e)/ln2,
    so both scales are 1/√H when per_dim_scale = 0. Everything after the projections is float32.
    """

    def __init__(self, cfg: AudioConfig, dtype, rngs, stack=None):
        d, h = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        ax = ("audio_embed", "audio_heads")
        self.q, self.k, self.v = (ClippableLinear(d, d, ax, cfg, dtype, rngs, stack) for _ in range(3))
        self.post = ClippableLinear(d, d, ("audio_heads", "audio_embed"), cfg, dtype, rngs, stack)
        self.rel_k = _param(rngs, (d, d), ax, dtype, stack)
        self.per_dim_scale = _param(rngs, (h,), ("head_dim",), dtype, stack, fill=0.0)

    def __call__(self, x_btd, pos_ld, valid_bucw):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        n, h, c, w = cfg.num_heads, cfg.head_dim, cfg.chunk_size, cfg.context_size
        u = -(-t // c)
        xq, xk, xv = numerics.unmerged(x_btd, 3)  # float32 on a GPU: the three products apart
        q = self.q(xq).astype(F32).reshape(b, t, n, h)
        k = self.k(xk).astype(F32).reshape(b, t, n, h)
        v = self.v(xv).astype(F32).reshape(b, t, n, h)
        q = q * ((h**-0.5) / math.log(2)) * jax.nn.softplus(self.per_dim_scale[...]).astype(F32)
        k = k * (math.log(1 + math.e) / math.log(2))

        q_bucnh = jnp.pad(q, ((0, 0), (0, u * c - t), (0, 0), (0, 0))).reshape(b, u, c, n, h)
        k_buwnh, v_buwnh = key_blocks(k, cfg), key_blocks(v, cfg)
        # The relative keys are projected in the parameter dtype (as transformers does), then float32.
        r_lnh = numerics.matmul(pos_ld, self.rel_k[...]).astype(F32).reshape(-1, n, h)
        content = jnp.einsum("BUCNH,BUWNH->BNUCW", q_bucnh, k_buwnh)
        position = rel_shift(jnp.einsum("BUCNH,LNH->BNUCL", q_bucnh, r_lnh), w)
        logits = softcap(content + position, cfg.logit_cap)
        logits = jnp.where(valid_bucw[:, None], logits, cfg.invalid_logit)  # a finite fill, as transformers
        probs = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("BNUCW,BUWNH->BUCNH", probs, v_buwnh).reshape(b, u * c, n * h)[:, :t]
        return self.post(o.astype(x_btd.dtype))


class LightConv(nnx.Module):
    """x + W_end act(RMS(clamp(causal depthwise conv(GLU(W_start RMS(x))))))."""

    def __init__(self, cfg: AudioConfig, dtype, rngs, stack=None):
        d = cfg.hidden_size
        self.cfg = cfg
        self.pre_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)
        self.start = ClippableLinear(d, 2 * d, ("audio_embed", "audio_mlp"), cfg, dtype, rngs, stack)
        self.depthwise = _param(rngs, (cfg.conv_kernel_size, d), ("conv_kernel", "audio_embed"), dtype, stack)
        self.conv_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)
        self.end = ClippableLinear(d, d, ("audio_embed", "audio_embed_out"), cfg, dtype, rngs, stack)

    def __call__(self, x_btd):
        cfg = self.cfg
        a, gate = jnp.split(self.start(rms_norm(x_btd, self.pre_norm[...], cfg.rms_norm_eps)), 2, axis=-1)
        h = a * jax.nn.sigmoid(gate)  # GLU: first half is the value, second half the gate
        # Causal depthwise conv: y[t] = Σ_j w[j] · h[t − (K−1) + j], zero before the start; float32 sums.
        kw, t = cfg.conv_kernel_size, x_btd.shape[1]
        hp = jnp.pad(h, ((0, 0), (kw - 1, 0), (0, 0))).astype(F32)
        wk = self.depthwise[...].astype(F32)
        h = sum(hp[:, j:j + t] * wk[j] for j in range(kw)).astype(x_btd.dtype)
        h = rms_norm(clamp(h, cfg.gradient_clipping), self.conv_norm[...], cfg.rms_norm_eps)
        return x_btd + self.end(ACTIVATIONS[cfg.hidden_act](h))


class ConformerLayer(nnx.Module):
    """FFN (½ residual) → attention (pre/post RMS, residual) → light conv → FFN (½) → RMS."""

    def __init__(self, cfg: AudioConfig, dtype, rngs, stack=None):
        d = cfg.hidden_size
        self.cfg = cfg
        self.ffn1 = FeedForward(cfg, dtype, rngs, stack)
        self.attn = ChunkedAttention(cfg, dtype, rngs, stack)
        self.pre_attn_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)
        self.post_attn_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)
        self.lconv = LightConv(cfg, dtype, rngs, stack)
        self.ffn2 = FeedForward(cfg, dtype, rngs, stack)
        self.out_norm = _param(rngs, (d,), ("audio_embed",), dtype, stack, fill=1.0)

    def __call__(self, x_btd, pos_ld, valid_bucw):
        gc = self.cfg.gradient_clipping
        x = self.ffn1(x_btd)
        a = self.attn(rms_norm(clamp(x, gc), self.pre_attn_norm[...], FIXED_NORM_EPS), pos_ld, valid_bucw)
        x = x + rms_norm(clamp(a, gc), self.post_attn_norm[...], FIXED_NORM_EPS)
        x = self.ffn2(self.lconv(x))
        return rms_norm(clamp(x, gc), self.out_norm[...], FIXED_NORM_EPS)


class AudioTower(nnx.Module):
    """Log-mel features [B, T, F] → tower output [B, T/4, O] and its validity mask (transformers' audio_tower)."""

    def __init__(self, cfg: AudioConfig, dtype, rngs):
        c0, c1 = cfg.conv_channels
        self.cfg = cfg
        # Conv2d kernels over (time, frequency), HWIO; the LayerNorms have a weight and no bias.
        self.conv0 = _param(rngs, (3, 3, 1, c0), ("conv_t", "conv_f", "conv_in", "conv_out"), dtype, None)
        self.norm0 = _param(rngs, (c0,), ("conv_out",), dtype, None, fill=1.0)
        self.conv1 = _param(rngs, (3, 3, c0, c1), ("conv_t", "conv_f", "conv_in", "conv_out"), dtype, None)
        self.norm1 = _param(rngs, (c1,), ("conv_out",), dtype, None, fill=1.0)
        self.input_proj = _param(rngs, (cfg.proj_in, cfg.hidden_size), ("conv_flat", "audio_embed"), dtype, None)
        self.layers = ConformerLayer(cfg, dtype, rngs, stack=cfg.num_layers)
        self.output_proj = _param(rngs, (cfg.hidden_size, cfg.output_dims), ("audio_embed", "audio_out"), dtype, None)
        self.output_bias = _param(rngs, (cfg.output_dims,), ("audio_out",), dtype, None, fill=0.0)

    def subsample(self, feats_btf, valid_bt):
        """Two (mask, 3×3 stride-2 conv, LayerNorm, ReLU) blocks, flatten (frequency-major), Linear → [B, T/4, D]."""
        cfg = self.cfg
        dtype = self.conv0[...].dtype
        x = feats_btf[..., None]  # [B, T, F, 1]: time and frequency are the conv's spatial axes
        for kernel, norm in ((self.conv0, self.norm0), (self.conv1, self.norm1)):
            x = (x * valid_bt[:, :, None, None]).astype(dtype)  # masked frames are zeroed before each conv
            x = jax.lax.conv_general_dilated(x, kernel[...], window_strides=(2, 2), padding=((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(layer_norm(x, norm[...], cfg.rms_norm_eps))
            valid_bt = valid_bt[:, ::2]  # output frame t covers input frames 2t−1 … 2t+1
        b, t, f, c = x.shape
        if f * c != cfg.proj_in:
            raise ConfigError(f"audio features with {feats_btf.shape[-1]} mel bins give {f}×{c} values per frame "
                              f"after subsampling; this audio config expects {cfg.proj_in}")
        return numerics.matmul(x.reshape(b, t, f * c), self.input_proj[...]), valid_bt

    def __call__(self, feats_btf: jax.Array, valid_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        x, valid = self.subsample(feats_btf, valid_bt)
        pos_ld = rel_pos_embedding(cfg, x.dtype)
        valid_bucw = chunk_mask(cfg, valid)
        graphdef, stack = nnx.split(self.layers)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, pos_ld, valid_bucw), None

        x, _ = jax.lax.scan(body, x, stack)
        return numerics.matmul(x, self.output_proj[...]) + self.output_bias[...], valid


class AudioEmbedder(nnx.Module):
    """`embed_audio`: RMS without a weight, then Linear O → E (no bias)."""

    def __init__(self, cfg: AudioConfig, dtype, rngs):
        self.eps = cfg.rms_norm_eps
        self.proj = _param(rngs, (cfg.output_dims, cfg.text_hidden_size), ("audio_out", "embed"), dtype, None)

    def __call__(self, x_bto):
        return numerics.matmul(rms_norm(x_bto, None, self.eps), self.proj[...])


class Gemma4Audio(nnx.Module):
    """Audio tower + embedder: `(features [B,T,F], mask [B,T]) -> (soft tokens [B,T',E], mask [B,T'])`."""

    def __init__(self, cfg: AudioConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.tower = AudioTower(cfg, dtype, rngs)
        self.embed = AudioEmbedder(cfg, dtype, rngs)

    def __call__(self, feats_btf: jax.Array, valid_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`valid_bt` is transformers' `input_features_mask` (True = real frame); None means all valid.
        Output frame t' is valid iff input frame 4t' is. Invalid rows hold whatever transformers computes
        there too; they are never merged into the prompt."""
        if valid_bt is None:
            valid_bt = jnp.ones(feats_btf.shape[:2], bool)
        h, valid = self.tower(feats_btf, jnp.asarray(valid_bt).astype(bool))
        return self.embed(h), valid


# ---------------------------------------------------------------------------------------------
# Entry points.


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, feats_btf, valid_bt):
    return nnx.merge(graphdef, state)(feats_btf, valid_bt)


def audio_features(model: Gemma4Audio, input_features, input_features_mask=None) -> tuple[jax.Array, jax.Array]:
    """Jitted `Gemma4Model.get_audio_features(...).pooler_output` and its `attention_mask`.

    `input_features` [B, T, F] (float, the feature extractor's log-mels), `input_features_mask` [B, T] bool
    (True = real frame; None = all real). Returns soft tokens [B, ceil(T/4), E] in the model dtype and their
    mask [B, ceil(T/4)]. Padding frames at the end do not change the valid rows, so T may be padded to a
    bucket to avoid recompiles.
    """
    feats = jnp.asarray(input_features)
    mask = jnp.ones(feats.shape[:2], bool) if input_features_mask is None else jnp.asarray(input_features_mask, bool)
    graphdef, state = nnx.split(model)
    return _features(graphdef, state, feats, mask)


def audio_soft_tokens(model: Gemma4Audio, input_features, input_features_mask=None) -> np.ndarray:
    """[Σ valid tokens, E]: the rows `Gemma4Model.forward` scatters into the `<|audio|>` positions, clip by
    clip in order (padding tokens dropped). Not jittable (data-dependent length); see `merge_audio_tokens`."""
    feats, valid = audio_features(model, input_features, input_features_mask)
    return np.asarray(feats)[np.asarray(valid)]


def merge_audio_tokens(embeds_bte: jax.Array, placeholder_bt: jax.Array, audio_bte: jax.Array,
                       audio_valid_bt: jax.Array) -> jax.Array:
    """Jittable `masked_scatter`: the k-th placeholder (row-major over the prompt) gets the k-th valid audio
    token (row-major over the clips). The caller guarantees equal counts, as transformers checks."""
    e = embeds_bte.shape[-1]
    src = audio_bte.reshape(-1, e)
    order = jnp.argsort(~audio_valid_bt.reshape(-1), stable=True)  # valid rows first, in order
    slot = jnp.cumsum(placeholder_bt.reshape(-1)) - 1
    picked = src[order[jnp.clip(slot, 0, src.shape[0] - 1)]].astype(embeds_bte.dtype)
    return jnp.where(placeholder_bt.reshape(-1, 1), picked, embeds_bte.reshape(-1, e)).reshape(embeds_bte.shape)


# ---------------------------------------------------------------------------------------------
# Checkpoint: transformers' names → our parameters.


@dataclass(frozen=True)
class AudioTarget:
    path: tuple[str, ...]  # attribute path in Gemma4Audio
    index: tuple[int, ...]  # leading indices into that parameter (layer, bound slot); () for the whole
    hf_shape: tuple[int, ...]
    transform: Any  # HF layout -> our layout (numpy)


def audio_converter_table(cfg: AudioConfig) -> dict[str, AudioTarget]:
    """{full HF name: AudioTarget} for every tensor of `model.audio_tower` and `model.embed_audio`."""
    d, o, e, kw = cfg.hidden_size, cfg.output_dims, cfg.text_hidden_size, cfg.conv_kernel_size
    c0, c1 = cfg.conv_channels
    same, t = (lambda a: a), (lambda a: a.T)
    hwio = lambda a: a.transpose(2, 3, 1, 0)  # noqa: E731  OIHW (torch) -> HWIO
    table: dict[str, AudioTarget] = {}

    def put(name, path, index, shape, fn=same):
        table[name] = AudioTarget(tuple(path), tuple(index), tuple(shape), fn)

    def linear(name, path, index, d_in, d_out):
        if cfg.use_clipped_linears:
            for slot, bound in enumerate(("input_min", "input_max", "output_min", "output_max")):
                put(f"{name}.{bound}", (*path, "bounds"), (*index, slot), ())
        put(f"{name}.linear.weight", (*path, "weight"), index, (d_out, d_in), t)

    sub = TOWER_PREFIX + "subsample_conv_projection."
    put(sub + "layer0.conv.weight", ("tower", "conv0"), (), (c0, 1, 3, 3), hwio)
    put(sub + "layer0.norm.weight", ("tower", "norm0"), (), (c0,))
    put(sub + "layer1.conv.weight", ("tower", "conv1"), (), (c1, c0, 3, 3), hwio)
    put(sub + "layer1.norm.weight", ("tower", "norm1"), (), (c1,))
    put(sub + "input_proj_linear.weight", ("tower", "input_proj"), (), (d, cfg.proj_in), t)
    for i in range(cfg.num_layers):
        pre, ours, ix = f"{TOWER_PREFIX}layers.{i}.", ("tower", "layers"), (i,)
        for ffn, ffn_ours in (("feed_forward1", "ffn1"), ("feed_forward2", "ffn2")):
            p, q = f"{pre}{ffn}.", (*ours, ffn_ours)
            put(p + "pre_layer_norm.weight", (*q, "pre_norm"), ix, (d,))
            put(p + "post_layer_norm.weight", (*q, "post_norm"), ix, (d,))
            linear(p + "ffw_layer_1", (*q, "up"), ix, d, 4 * d)
            linear(p + "ffw_layer_2", (*q, "down"), ix, 4 * d, d)
        p, q = pre + "self_attn.", (*ours, "attn")
        for proj in ("q", "k", "v"):
            linear(f"{p}{proj}_proj", (*q, proj), ix, d, d)
        linear(p + "post", (*q, "post"), ix, d, d)
        put(p + "relative_k_proj.weight", (*q, "rel_k"), ix, (d, d), t)
        put(p + "per_dim_scale", (*q, "per_dim_scale"), ix, (cfg.head_dim,))
        p, q = pre + "lconv1d.", (*ours, "lconv")
        put(p + "pre_layer_norm.weight", (*q, "pre_norm"), ix, (d,))
        linear(p + "linear_start", (*q, "start"), ix, d, 2 * d)
        put(p + "depthwise_conv1d.weight", (*q, "depthwise"), ix, (d, 1, kw), lambda a: a[:, 0, :].T)
        put(p + "conv_norm.weight", (*q, "conv_norm"), ix, (d,))
        linear(p + "linear_end", (*q, "end"), ix, d, d)
        for hf, mine in (("norm_pre_attn", "pre_attn_norm"), ("norm_post_attn", "post_attn_norm"),
                         ("norm_out", "out_norm")):
            put(f"{pre}{hf}.weight", (*ours, mine), ix, (d,))
    put(TOWER_PREFIX + "output_proj.weight", ("tower", "output_proj"), (), (o, d), t)
    put(TOWER_PREFIX + "output_proj.bias", ("tower", "output_bias"), (), (o,))
    put(EMBED_PREFIX + "embedding_projection.weight", ("embed", "proj"), (), (e, o), t)
    return table


def load_audio(cfg: AudioConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32) -> Gemma4Audio:
    """A `Gemma4Audio` from {HF name: array} (e.g. a whole `Gemma4ForConditionalGeneration` state dict; other
    tensors are ignored). Raises CheckpointError on a missing, misshaped or unexpected audio tensor."""
    table = audio_converter_table(cfg)
    unexpected = sorted(nm for nm in tensors if nm.startswith((TOWER_PREFIX, EMBED_PREFIX)) and nm not in table)
    if unexpected:
        raise CheckpointError(f"unexpected audio tensor {unexpected[0]} for this audio config")
    model = nnx.eval_shape(lambda: Gemma4Audio(cfg, dtype, nnx.Rngs(0)))
    params = {tuple(str(k) for k in path): var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    buffers = {p: np.zeros(v.get_value().shape, np.dtype(v.get_value().dtype)) for p, v in params.items()}
    filled = {p: np.zeros(b.shape, bool) for p, b in buffers.items()}
    for name, tgt in table.items():
        if name not in tensors:
            raise CheckpointError(f"the checkpoint lacks audio tensor {name}")
        value = np.asarray(tensors[name])
        if value.shape != tgt.hf_shape:
            raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, expected {list(tgt.hf_shape)}")
        buffers[tgt.path][tgt.index] = tgt.transform(value).astype(buffers[tgt.path].dtype)
        filled[tgt.path][tgt.index] = True
    assert all(f.all() for f in filled.values()), [p for p, f in filled.items() if not f.all()]
    for path, var in params.items():
        var.set_value(jnp.asarray(buffers[path]))
    return model
