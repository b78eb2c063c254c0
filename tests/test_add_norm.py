"""The add-and-norm kernel (`gemma4_jax.kernels.add_norm`) in Pallas interpret mode against the model's own
arithmetic: the partials' sum in the stream's dtype, `model.rms_norm`, the residual add, `model.rms_norm` again.
Interpret mode fills outputs with NaN before the kernel runs, so a piece of a row left unwritten shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.kernels.add_norm import add_norm, supports
from gemma4_jax.model.text import rms_norm
from gemma4_jax.testing.lowering import lowered_for_the_gpu

# interpret mode on the CPU, on a GPU machine too: the bfloat16 cases check the model's roundings bit for bit
pytestmark = pytest.mark.usefixtures("on_the_cpu")

EPS = 1e-6


def _reference(parts, x, post, nxt):
    y = jnp.sum(parts, axis=0).astype(x.dtype)
    xn = x + rms_norm(y, post, EPS)
    return xn, rms_norm(xn, nxt, EPS)


def _inputs(s, m, d, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    parts = 2.0 * jax.random.normal(k[0], (s, m, d), jnp.float32)
    x = (3.0 * jax.random.normal(k[1], (m, d), jnp.float32)).astype(dtype)
    post = (1.0 + 0.4 * jax.random.normal(k[2], (d,), jnp.float32)).astype(dtype)  # norms away from 1
    nxt = (1.0 + 0.4 * jax.random.normal(k[3], (d,), jnp.float32)).astype(dtype)
    return parts, x, post, nxt


# (splits, rows, width, dtype): one piece and several (1536 = 3 × 512, 2816 = 11 × 256), 1 and 16 rows
CASES = [(1, 1, 96, jnp.float32), (3, 5, 1536, jnp.float32), (11, 16, 2816, jnp.bfloat16), (16, 1, 1536, jnp.bfloat16)]


@pytest.mark.parametrize("case", CASES, ids=[f"s{c[0]}_m{c[1]}_d{c[2]}_{jnp.dtype(c[3]).name}" for c in CASES])
def test_add_norm_matches_the_models_arithmetic(case):
    s, m, d, dtype = case
    args = _inputs(s, m, d, dtype, seed=s + m)
    got = add_norm(*args, eps=EPS, interpret=True)
    want = _reference(*args)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == (m, d)
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), "a piece of a row was never written"
        err = np.max(np.abs(g - w)) / np.max(np.abs(w))
        assert err <= tol, err
        if dtype == jnp.bfloat16:  # rounded where the model rounds: nearly every element equal
            assert np.mean(g == w) > 0.99


def test_add_norm_fails_without_each_step():
    """The comparison is sharp: leaving out a split, the first norm's weight or the second norm changes the
    result beyond the tolerance."""
    parts, x, post, nxt = _inputs(3, 4, 256, jnp.float32, seed=9)
    xn, a = add_norm(parts, x, post, nxt, eps=EPS, interpret=True)

    def far(g, w):
        return np.max(np.abs(np.asarray(g) - np.asarray(w))) / np.max(np.abs(np.asarray(w))) > 1e-3

    assert far(xn, _reference(parts[:2], x, post, nxt)[0])
    assert far(xn, _reference(parts, x, jnp.ones_like(post), nxt)[0])
    assert far(a, xn)


def test_supports_and_lowers_for_the_gpu():
    assert supports(1536) and supports(2816) and supports(5376) and not supports(100)
    s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    text = lowered_for_the_gpu(add_norm, s((11, 16, 2816), jnp.float32), s((16, 2816), bf), s((2816,), bf),
                               s((2816,), bf), eps=EPS)
    assert text.count("stablehlo.custom_call") == 1 and "add_rms_norm_2816" in text
