"""Each parity test must fail when the feature it covers is broken.

Every case below breaks one feature of docs/architecture.md §2/§8 (by patching one helper of the model)
and asserts that the float32 comparison with transformers then fails by a wide margin.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_logits, rel_err
from test_parity import F32_BOUND

import gemma4_jax
from gemma4_jax.model import text as mdl

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too

_orig = {name: getattr(mdl, name) for name in ("rms_norm", "attention", "attention_mask", "rope_inv_freq",
                                                "softcap")}


def _plus_one_norm(x, w, eps):
    return _orig["rms_norm"](x, None if w is None else w + 1.0, eps)


def _rsqrt_scaled_attention(q, k, v, mask):
    return _orig["attention"](q * q.shape[-1] ** -0.5, k, v, mask)


def _window_off_by_one(q_pos, k_pos, window, k_valid=None, blocks=None):
    return _orig["attention_mask"](q_pos, k_pos, None if window is None else window + 1, k_valid, blocks)


def _rope_denominator_is_rotated_width(spec):
    inv = _orig["rope_inv_freq"](spec)
    rotated = int(spec.rope_fraction * spec.head_dim // 2)
    if rotated * 2 < spec.head_dim:  # proportional layers: use 2·rotated instead of the full head_dim
        inv = inv.copy()
        inv[:rotated] = 1.0 / spec.rope_theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float32) / (2 * rotated))
    return inv


def _keqv_after_norm(self, k_raw, v_raw, cos, sin):
    v = mdl.rms_norm(mdl.added(k_raw), self.k_norm[...], self.eps) if self.k_eq_v else v_raw  # after k_norm
    return mdl.Keys(k_raw, v, self.k_norm[...], self.eps, cos, sin)


def _scale_then_renormalise(self, x, impl="auto"):
    d = x.shape[-1]
    r = mdl.rms_norm(x, None, self.eps) * self.router_scale[...] * d**-0.5
    w, idx = mdl.jax.lax.top_k(mdl.jax.nn.softmax((r @ self.router_proj[...]).astype(jnp.float32)), self.top_k)
    w = w * self.per_expert_scale[...][idx]
    return w / w.sum(-1, keepdims=True), idx, None


def _ple_ignored(cfg, table, proj, norm, ids, h, dtype):
    b, t = ids.shape
    return jnp.zeros((b, t, *proj.shape[1:]), h.dtype)


MUTATIONS = {
    "rmsnorm_plus_one": ("31b", mdl, "rms_norm", _plus_one_norm),
    "attention_scale_rsqrt_d": ("31b", mdl, "attention", _rsqrt_scaled_attention),
    "sliding_window_off_by_one": ("31b", mdl, "attention_mask", _window_off_by_one),
    "proportional_rope_wrong_denominator": ("31b", mdl, "rope_inv_freq", _rope_denominator_is_rotated_width),
    "no_final_softcap": ("31b", mdl, "softcap", lambda x, cap: x),
    "k_eq_v_value_after_k_norm": ("31b", mdl.Attention, "keys_values", _keqv_after_norm),
    "moe_scale_before_renormalise": ("26b-a4b", mdl.MoE, "route", _scale_then_renormalise),
    "per_layer_embeddings_ignored": ("e2b", mdl, "per_layer_inputs", _ple_ignored),
}


def _eager_logits(model, ids):
    # Eager (not the cached jit) so a patched helper is really traced.
    return np.asarray(model.module(jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_broken_feature_is_caught(name, monkeypatch, hf_models, hf_dirs):
    family, owner, attr, replacement = MUTATIONS[name]
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 24))
    ref = hf_logits(hf_models[family], ids)
    model = gemma4_jax.load(hf_dirs[family, "causal"], progress=False)
    assert rel_err(_eager_logits(model, ids), ref) <= F32_BOUND  # intact: passes
    monkeypatch.setattr(owner, attr, replacement)
    err = rel_err(_eager_logits(model, ids), ref)
    assert err > 5 * F32_BOUND, f"{name} went unnoticed (error {err:.1e})"


@pytest.mark.parametrize("name", ["no_final_softcap", "per_layer_embeddings_ignored", "rmsnorm_plus_one"])
@pytest.mark.devices(2)
def test_broken_feature_breaks_the_pipeline_too(name, monkeypatch, hf_models, hf_dirs):
    """The pipeline's stages run the model's own functions (embedding, per-layer inputs, layers, head), so a
    mutated model function breaks pp = 2 as well: one source of the math for both runtimes."""
    family, owner, attr, replacement = MUTATIONS[name]
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 24))
    ref = hf_logits(hf_models[family], ids)
    monkeypatch.setattr(owner, attr, replacement)
    jax.clear_caches()  # no program traced before the patch may be reused
    piped = gemma4_jax.load(hf_dirs[family, "causal"], pp=2, progress=False)
    err = rel_err(piped.logits(ids), ref)
    assert err > 5 * F32_BOUND, f"{name} went unnoticed at pp=2 (error {err:.1e})"


def test_layer_scalar_must_be_loaded(hf_models, hf_dirs):
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 16))
    ref = hf_logits(hf_models["e4b"], ids)
    model = gemma4_jax.load(hf_dirs["e4b", "causal"], progress=False)
    module = model.module
    for layer in module.layers:
        layer.layer_scalar.set_value(jnp.ones_like(layer.layer_scalar[...]))
    assert rel_err(np.asarray(module(jnp.asarray(ids, jnp.int32))), ref) > 5 * F32_BOUND
