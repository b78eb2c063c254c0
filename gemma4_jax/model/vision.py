"""The Gemma 4 vision tower and its embedder in Flax NNX (docs/architecture.md §5).

Owns the vision configuration (`VisionConfig`, parsed from the HF `vision_config`), the modules
(patch embedder, bidirectional ViT layers stacked on a leading axis, pooler, `embed_vision`), the
jitted entry point `image_features` that turns processor output into the soft tokens that replace the
`<|image|>` placeholders of the text sequence, and the strict loader of the `model.vision_tower.*` and
`model.embed_vision.*` tensors.

Inputs are what transformers' Gemma4ImageProcessor returns: `pixel_values` [B,P,C] (C = 3·patch²,
values in [0,1], patches padded with zeros to the budget P = max_soft_tokens·k²) and `position_ids`
[B,P,2] (patch (x, y), padding patches (-1, -1)). Shapes are static; padding is carried by masks
and only dropped at the very end.

Dimension legend: B images, P patches, C patch pixels, D vision width (D_v), N query heads,
K kv heads, G = N/K, H head dim, F MLP width, L soft tokens per image (P/k²), E text width.
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
from .text import apply_rope, gelu, inverse_frequencies, rms_norm

F32 = jnp.float32
TOWER_PREFIX = "model.vision_tower."
EMBED_PREFIX = "model.embed_vision."


@dataclass(frozen=True)
class VisionConfig:
    """The parsed vision tower (and `embed_vision`) configuration. Hashable: a valid static jit argument."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    text_hidden_size: int  # E: width of the language model, the output of embed_vision
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rms_norm_eps: float = 1e-6  # also embed_vision's eps (it uses the vision config's, not the text one's)
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], text_hidden_size: int | None = None) -> VisionConfig:
        """From an HF dict: either a whole Gemma4 `config.json` (with `vision_config` and `text_config`)
        or the `vision_config` alone, in which case `text_hidden_size` must be given."""
        if "vision_config" in cfg:
            vc, tc = cfg["vision_config"], cfg.get("text_config") or {}
            if not vc:
                raise ConfigError("the config has no vision_config: this checkpoint has no vision tower")
            text_hidden_size = text_hidden_size or tc.get("hidden_size")
        else:
            vc = cfg
        if not text_hidden_size:
            raise ConfigError("the text model's hidden_size is needed for embed_vision; pass text_hidden_size")
        get = vc.get
        heads = get("num_attention_heads", 12)
        hidden = get("hidden_size", 768)
        head_dim = get("head_dim") or hidden // heads
        rope = get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision rope_type {rope['rope_type']!r} is not supported (only 'axial')")
        if get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"vision hidden_activation {get('hidden_activation')!r} is not supported")
        if head_dim % 4:
            raise ConfigError(f"vision head_dim {head_dim} must be a multiple of 4 (2-D RoPE)")
        return cls(
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", 3072),
            num_layers=get("num_hidden_layers", 16),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=head_dim,
            text_hidden_size=int(text_hidden_size),
            patch_size=get("patch_size", 16),
            pooling_kernel_size=get("pooling_kernel_size", 3),
            position_embedding_size=get("position_embedding_size", 10240),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 100.0))),
            use_clipped_linears=bool(get("use_clipped_linears", False)),
            standardize=bool(get("standardize", False)),
        )


# ---------------------------------------------------------------------------------------------
# Pure math helpers.


def padding_mask(position_ids_bp2: jax.Array) -> jax.Array:
    """[B,P] True on padding patches, which the processor marks with position (-1, -1)."""
    return jnp.all(position_ids_bp2 == -1, axis=-1)


def rope_2d_cos_sin(position_ids_bp2: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D RoPE tables [B,P,H]: the first H/2 channels rotate with x, the last H/2 with y.

    Each half is an ordinary rotate-half RoPE of width H/2 with inv_freq_i = θ^(-2i/(H/2)), i < H/4.
    Computed in float32 from the raw positions (padding's -1 included: those rows are never read)
    and cast to the activation dtype, as transformers does.
    """
    half = head_dim // 2
    inv_freq = inverse_frequencies(theta, (half + 1) // 2, half)
    freqs = position_ids_bp2[..., None].astype(F32) * jnp.asarray(inv_freq.astype(np.float32))  # [B,P,2,H/4]
    fx, fy = freqs[..., 0, :], freqs[..., 1, :]
    emb = jnp.concatenate([fx, fx, fy, fy], axis=-1)  # [B,P,H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope_2d(x_bpnh: jax.Array, cos_bph: jax.Array, sin_bph: jax.Array) -> jax.Array:
    """Rotate each half of the head independently (x half, then y half)."""
    h = x_bpnh.shape[-1] // 2
    return jnp.concatenate([apply_rope(x_bpnh[..., :h], cos_bph[..., :h], sin_bph[..., :h]),
                            apply_rope(x_bpnh[..., h:], cos_bph[..., h:], sin_bph[..., h:])], axis=-1)


def bidirectional_attention(q_bpnh, k_bskh, v_bskh, key_valid_bs) -> jax.Array:
    """Full (non-causal) GQA attention with scale 1.0 (q_norm/k_norm replace 1/√H); padding keys masked.

    Only keys are masked (transformers' bidirectional padding mask): padding queries get ordinary
    outputs, which the pooler zeroes.
    """
    b, p, n, h = q_bpnh.shape
    k = k_bskh.shape[2]
    q = q_bpnh.reshape(b, p, k, n // k, h)
    acc = jnp.promote_types(q.dtype, F32)  # float32 (float64 for float64 inputs)
    scores = jnp.einsum("BPKGH,BSKH->BKGPS", q, k_bskh, preferred_element_type=acc)
    scores = jnp.where(key_valid_bs[:, None, None, None, :], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)  # softmax in float32
    # The sum over keys blocked on a GPU too (numerics.KEY_SUM_BACKENDS: XLA's one product there sums far from exact).
    out = numerics.einsum("BKGPS,BSKH->BPKGH", probs, v_bskh, backends=numerics.KEY_SUM_BACKENDS,
                          preferred_element_type=acc)
    return out.astype(q_bpnh.dtype).reshape(b, p, n, h)


def pooling_index(position_ids_bp2: jax.Array, k: int) -> jax.Array:
    """[B,P] soft-token slot of every patch: the k×k cell (x//k, y//k), numbered row by row.

    The row stride is (max x + 1)//k of the image; padding patches are clamped to (0, 0), so they
    land in slot 0, which is harmless because their hidden states are zero (as in transformers).
    """
    pos = jnp.maximum(position_ids_bp2, 0)
    width = jnp.max(pos[..., 0], axis=-1, keepdims=True) + 1
    cell = pos // k
    return cell[..., 0] + (width // k) * cell[..., 1]


def soft_token_mask(position_ids_bp2, k: int) -> jax.Array:
    """[B,L] True on soft-token slots that receive at least one patch (L = P//k²)."""
    pos = jnp.asarray(position_ids_bp2)
    length = pos.shape[1] // (k * k)
    idx = pooling_index(pos, k)
    return jnp.any(idx[:, :, None] == jnp.arange(length)[None, None, :], axis=1)


def num_soft_tokens(position_ids_bp2, k: int = 3) -> int:
    """Total number of soft tokens the images produce (host side; the length of `image_features`)."""
    return int(np.asarray(soft_token_mask(position_ids_bp2, k)).sum())


# ---------------------------------------------------------------------------------------------
# Modules.


def _param(rngs: nnx.Rngs, shape, axes, dtype, stack: int | None, init: str = "normal") -> nnx.Param:
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "clip":  # no clipping: (in_min, in_max, out_min, out_max) = (-inf, inf, -inf, inf)
        value = jnp.broadcast_to(jnp.array([-jnp.inf, jnp.inf, -jnp.inf, jnp.inf], dtype), shape)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class ClippedLinear(nnx.Module):
    """x → clamp(clamp(x, in_min, in_max) W, out_min, out_max); without clipping a plain matmul.

    `w` keeps the einsum layout given by `shape` (e.g. [D,N,H]); `clip` holds the four bounds
    (in_min, in_max, out_min, out_max), stored in the parameter dtype like transformers' buffers.
    """

    def __init__(self, shape, axes, spec: str, clipped: bool, dtype, rngs: nnx.Rngs, stack: int | None = None):
        self.spec, self.clipped = spec, clipped
        self.w = _param(rngs, shape, axes, dtype, stack)
        if clipped:
            self.clip = _param(rngs, (4,), ("clip",), dtype, stack, "clip")

    def __call__(self, x):
        if self.clipped:
            c = self.clip[...].astype(x.dtype)
            x = jnp.clip(x, c[0], c[1])
        y = numerics.einsum(self.spec, x, self.w[...])
        if self.clipped:
            y = jnp.clip(y, c[2], c[3])
        return y


class VisionLayer(nnx.Module):
    """One ViT block (or, with `stack=n`, n of them on a leading axis): the text model's 4-norm block
    with q/k norms with weight, v norm without, 2-D RoPE, scale 1.0, no layer scalar."""

    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs, stack: int | None = None):
        d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        clip = cfg.use_clipped_linears
        self.eps = cfg.rms_norm_eps
        norm = lambda dim, ax: _param(rngs, (dim,), (ax,), dtype, stack, "ones")  # noqa: E731
        self.input_norm, self.post_attn_norm = norm(d, "vision_embed"), norm(d, "vision_embed")
        self.pre_ffw_norm, self.post_ffw_norm = norm(d, "vision_embed"), norm(d, "vision_embed")
        self.q_norm, self.k_norm = norm(h, "head_dim"), norm(h, "head_dim")
        lin = lambda shape, axes, spec: ClippedLinear(shape, axes, spec, clip, dtype, rngs, stack)  # noqa: E731
        self.q_proj = lin((d, n, h), ("vision_embed", "q_heads", "head_dim"), "BPD,DNH->BPNH")
        self.k_proj = lin((d, k, h), ("vision_embed", "kv_heads", "head_dim"), "BPD,DKH->BPKH")
        self.v_proj = lin((d, k, h), ("vision_embed", "kv_heads", "head_dim"), "BPD,DKH->BPKH")
        self.o_proj = lin((n, h, d), ("q_heads", "head_dim", "vision_embed"), "BPNH,NHD->BPD")
        self.gate = lin((d, f), ("vision_embed", "mlp"), "BPD,DF->BPF")
        self.up = lin((d, f), ("vision_embed", "mlp"), "BPD,DF->BPF")
        self.down = lin((f, d), ("mlp", "vision_embed"), "BPF,FD->BPD")

    def __call__(self, x_bpd, cos, sin, valid_bp):
        eps = self.eps
        qa, ka, va = numerics.unmerged(rms_norm(x_bpd, self.input_norm[...], eps), 3)  # float32 on a GPU: apart
        q = apply_rope_2d(rms_norm(self.q_proj(qa), self.q_norm[...], eps), cos, sin)
        k = apply_rope_2d(rms_norm(self.k_proj(ka), self.k_norm[...], eps), cos, sin)
        v = rms_norm(self.v_proj(va), None, eps)  # v_norm has no weight and V gets no RoPE
        o = self.o_proj(bidirectional_attention(q, k, v, valid_bp))
        x = x_bpd + rms_norm(o, self.post_attn_norm[...], eps)
        ga, ua = numerics.unmerged(rms_norm(x, self.pre_ffw_norm[...], eps), 2)
        m = self.down(gelu(self.gate(ga)) * self.up(ua))
        return x + rms_norm(m, self.post_ffw_norm[...], eps)


class VisionTower(nnx.Module):
    """transformers' Gemma4VisionModel: patches [B,P,C] → pooled soft tokens [B,L,D] and their mask [B,L]."""

    def __init__(self, cfg: VisionConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        d = cfg.hidden_size
        self.patch_proj = _param(rngs, (cfg.patch_dim, d), ("patch", "vision_embed"), dtype, None)
        self.pos_table = _param(rngs, (2, cfg.position_embedding_size, d), ("xy", "vision_pos", "vision_embed"),
                                dtype, None)
        self.layers = VisionLayer(cfg, dtype, rngs, stack=cfg.num_layers)
        if cfg.standardize:
            self.std_bias = _param(rngs, (d,), ("vision_embed",), dtype, None, "zeros")
            self.std_scale = _param(rngs, (d,), ("vision_embed",), dtype, None, "ones")

    def embed_patches(self, pixel_values_bpc, position_ids_bp2, pad_bp):
        """Linear patch embedding of 2·pixel−1 (the model's only input normalisation) + x/y position tables."""
        pv = 2 * (pixel_values_bpc - 0.5)  # in the processor's dtype (float32), then cast, as transformers does
        x = numerics.einsum("BPC,CD->BPD", pv.astype(self.dtype), self.patch_proj[...])
        pos = jnp.maximum(position_ids_bp2, 0)  # padding (-1) looks up row 0 and is zeroed below
        table = self.pos_table[...]
        pe = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        return x + jnp.where(pad_bp[..., None], jnp.zeros((), pe.dtype), pe)

    def encode(self, x_bpd, position_ids_bp2, valid_bp):
        """All ViT layers, scanned over the layer stack (one compiled body for every layer)."""
        cfg = self.cfg
        cos, sin = rope_2d_cos_sin(position_ids_bp2, cfg.head_dim, cfg.rope_theta, x_bpd.dtype)
        graphdef, state = nnx.split(self.layers)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, cos, sin, valid_bp), None

        x, _ = jax.lax.scan(body, x_bpd, state)
        return x

    def pool(self, x_bpd, position_ids_bp2, pad_bp):
        """k×k average pooling by position, ×√D in float32, standardised; soft tokens [B,L,D] and mask [B,L].

        Every slot divides by k² (padding patches are zeroed, not excluded from the count). The
        pooled mean is rounded to the activation dtype before the float32 ×√D, as transformers does.
        """
        cfg = self.cfg
        k = cfg.pooling_kernel_size
        b, p, d = x_bpd.shape
        if p % (k * k):
            raise ValueError(f"{p} patches per image is not a multiple of the pooling cell {k}x{k}")
        length = p // (k * k)
        idx_bp = pooling_index(position_ids_bp2, k)
        x = jnp.where(pad_bp[..., None], 0.0, x_bpd.astype(F32)) * np.float32(1.0 / (k * k))
        pooled = jax.vmap(lambda xs, ids: jax.ops.segment_sum(xs, ids, num_segments=length))(x, idx_bp)
        hits = jax.vmap(lambda ids: jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=length))(idx_bp)
        h = pooled.astype(x_bpd.dtype).astype(F32) * np.float32(math.sqrt(cfg.hidden_size))
        if cfg.standardize:  # float32: the bias subtraction cancels large values
            h = (h - self.std_bias[...].astype(F32)) * self.std_scale[...].astype(F32)
        return h.astype(self.dtype), hits > 0

    def __call__(self, pixel_values_bpc, position_ids_bp2):
        pad = padding_mask(position_ids_bp2)
        x = self.embed_patches(pixel_values_bpc, position_ids_bp2, pad)
        x = self.encode(x, position_ids_bp2, ~pad)
        return self.pool(x, position_ids_bp2, pad)


class MultimodalEmbedder(nnx.Module):
    """`embed_vision`: RMS norm without scale (vision eps) and a Linear D_v → E."""

    def __init__(self, cfg: VisionConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.eps = cfg.rms_norm_eps
        self.proj = _param(rngs, (cfg.hidden_size, cfg.text_hidden_size), ("vision_embed", "embed"), dtype, None)

    def __call__(self, h_bld):
        return numerics.einsum("BLD,DE->BLE", rms_norm(h_bld, None, self.eps), self.proj[...])


class VisionModel(nnx.Module):
    """Vision tower + embed_vision: patches → soft tokens in the text width, padded [B,L,E] with mask [B,L]."""

    def __init__(self, cfg: VisionConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.tower = VisionTower(cfg, dtype, rngs)
        self.embed = MultimodalEmbedder(cfg, dtype, rngs)

    def __call__(self, pixel_values_bpc, position_ids_bp2):
        h, valid = self.tower(pixel_values_bpc, position_ids_bp2)
        return self.embed(h), valid


def abstract_vision(cfg: VisionConfig, dtype=jnp.float32) -> VisionModel:
    """The model with ShapeDtypeStructs for parameters (loading, counting)."""
    return nnx.eval_shape(lambda: VisionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------
# Entry point.


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _image_features(graphdef, state, pixel_values_bpc, position_ids_bp2, num_tokens: int):
    feats_ble, valid_bl = nnx.merge(graphdef, state)(pixel_values_bpc, position_ids_bp2)
    flat = feats_ble.reshape(-1, feats_ble.shape[-1])
    # Row-major over (image, slot): the order of transformers' boolean indexing and masked_scatter.
    (rows,) = jnp.nonzero(valid_bl.reshape(-1), size=num_tokens, fill_value=0)
    return flat[rows]


def image_features(model: VisionModel, pixel_values_bpc, position_ids_bp2, num_tokens: int | None = None) -> jax.Array:
    """Soft tokens [num_tokens, E] to scatter, in order, into the `<|image|>` positions of the text sequence.

    Same values as transformers' `torch.cat(Gemma4Model.get_image_features(pv, pos).pooler_output)`.
    `pixel_values_bpc` [B,P,3·patch²] (float, in [0,1]) and `position_ids_bp2` [B,P,2] (int, padding
    (-1,-1)) as Gemma4ImageProcessor returns them. `num_tokens` (the total soft-token count) makes
    the whole call traceable; by default it is computed on the host from the positions.
    """
    if num_tokens is None:
        num_tokens = num_soft_tokens(position_ids_bp2, model.cfg.pooling_kernel_size)
    graphdef, state = nnx.split(model)
    return _image_features(graphdef, state, jnp.asarray(pixel_values_bpc), jnp.asarray(position_ids_bp2, jnp.int32),
                           num_tokens)


# ---------------------------------------------------------------------------------------------
# Weight loading: one strict table from HF names to parameter paths.

_LINEARS = (("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"), ("self_attn.v_proj", "v_proj"),
            ("self_attn.o_proj", "o_proj"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
            ("mlp.down_proj", "down"))
_NORMS = (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attn_norm"),
          ("pre_feedforward_layernorm", "pre_ffw_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
          ("self_attn.q_norm", "q_norm"), ("self_attn.k_norm", "k_norm"))
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def converter_table(cfg: VisionConfig) -> dict[str, tuple[tuple[int, ...] | None, tuple, int | None, Any]]:
    """{HF name: (HF shape (None = any scalar), parameter path, stack index or clip slot, transform)}."""
    d, n, k, h, f, e = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                        cfg.text_hidden_size)
    table: dict[str, tuple] = {}
    t = TOWER_PREFIX
    same = lambda a: a  # noqa: E731
    table[t + "patch_embedder.input_proj.weight"] = ((d, cfg.patch_dim), ("tower", "patch_proj"), None, np.transpose)
    table[t + "patch_embedder.position_embedding_table"] = ((2, cfg.position_embedding_size, d),
                                                            ("tower", "pos_table"), None, same)
    if cfg.standardize:
        table[t + "std_bias"] = ((d,), ("tower", "std_bias"), None, same)
        table[t + "std_scale"] = ((d,), ("tower", "std_scale"), None, same)
    # HF Linear weights are [out, in]; ours are [in, ...out] (einsum layout).
    lin = {"q_proj": ((n * h, d), lambda a: a.T.reshape(d, n, h)),
           "k_proj": ((k * h, d), lambda a: a.T.reshape(d, k, h)),
           "v_proj": ((k * h, d), lambda a: a.T.reshape(d, k, h)),
           "o_proj": ((d, n * h), lambda a: a.T.reshape(n, h, d)),
           "gate": ((f, d), np.transpose), "up": ((f, d), np.transpose), "down": ((d, f), np.transpose)}
    for i in range(cfg.num_layers):
        pre = f"{t}encoder.layers.{i}."
        for hf, ours in _NORMS:
            table[pre + hf + ".weight"] = ((h,) if ours in ("q_norm", "k_norm") else (d,),
                                           ("tower", "layers", ours), i, same)
        for hf, ours in _LINEARS:
            shape, fn = lin[ours]
            table[pre + hf + ".linear.weight"] = (shape, ("tower", "layers", ours, "w"), i, fn)
            if cfg.use_clipped_linears:
                for slot, bound in enumerate(_CLIP_BOUNDS):
                    table[pre + hf + "." + bound] = (None, ("tower", "layers", ours, "clip"), (i, slot), same)
    table[EMBED_PREFIX + "embedding_projection.weight"] = ((e, d), ("embed", "proj"), None, np.transpose)
    return table


def _get_var(module: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    obj = module
    for key in path:
        obj = getattr(obj, key)
    return obj


def load_vision(tensors: Mapping[str, Any], cfg: VisionConfig, dtype=jnp.float32) -> VisionModel:
    """A VisionModel holding the `model.vision_tower.*` / `model.embed_vision.*` tensors of `tensors`.

    `tensors` maps HF names (as `Gemma4ForConditionalGeneration.state_dict()` names them) to numpy
    arrays (any float dtype, ml_dtypes bfloat16 included); other names (text, audio) are ignored.
    Raises CheckpointError for a missing, unexpected or misshaped vision tensor.
    """
    table = converter_table(cfg)
    ours = [nm for nm in tensors if nm.startswith((TOWER_PREFIX, EMBED_PREFIX))]
    for nm in ours:
        if nm not in table:
            raise CheckpointError(f"unexpected vision tensor {nm} for this vision config")
    absent = [nm for nm in table if nm not in tensors]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise CheckpointError(f"the checkpoint lacks vision tensor {absent[0]}{more}")

    model = abstract_vision(cfg, dtype)
    buffers: dict[tuple, np.ndarray] = {}
    for nm, (hf_shape, path, index, fn) in table.items():
        value = np.asarray(tensors[nm])
        if (value.size != 1) if hf_shape is None else (value.shape != hf_shape):
            want = "a scalar" if hf_shape is None else list(hf_shape)
            raise CheckpointError(f"tensor {nm} has shape {list(value.shape)}, expected {want}")
        if path not in buffers:
            abstract = _get_var(model, path).get_value()
            buffers[path] = np.zeros(abstract.shape, np.dtype(abstract.dtype))
        value = fn(value)  # numpy casts to the buffer's dtype on assignment
        if hf_shape is None:
            buffers[path][index] = value.reshape(())
        elif index is None:
            buffers[path][...] = value
        else:
            buffers[path][index] = value
    for path, buf in buffers.items():
        _get_var(model, path).set_value(jnp.asarray(buf))
    return model
