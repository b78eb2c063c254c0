"""The router kernel (`kernels/router.py`, interpret mode) against the model's router math: the top-k with its
tie rule, the softmax and scale, the experts' token table, rows beyond M; and the model taking it at decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.kernels import dispatch, moe_mgpu, router
from gemma4_jax.testing.lowering import lowered_for_the_gpu

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too


def _parts(m: int, e: int, k: int, splits: int, seed: int) -> jnp.ndarray:
    """Partial products whose sums are small multiples of 1/4 (exact in bf16: many ties inside each row's top k),
    with experts 0..k-1 far below the rest, so that the rows beyond M (zeros, whose top k would be 0..k-1) cannot
    hide in the table."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(-6, 7, size=(m, e)).astype(np.float32) / 4
    logits[:, :k] = -100.0
    parts = rng.normal(size=(splits, m, e)).astype(np.float32) / 64
    parts[-1] = logits - parts[:-1].sum(axis=0)
    return jnp.asarray(parts)


@pytest.mark.parametrize("m,e,k,splits", [(1, 128, 8, 22), (5, 128, 8, 22), (16, 128, 8, 1), (3, 8, 2, 4)])
def test_route_kernel_matches_the_model_router(m, e, k, splits):
    parts = _parts(m, e, k, splits, seed=m * 100 + e)
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, size=e), jnp.bfloat16)
    w, idx, table = router.route(parts, scale, top_k=k, interpret=True)
    logits = jnp.sum(parts, axis=0).astype(jnp.bfloat16)
    ref_w, ref_idx = router.route_reference(logits, scale, k)
    assert w.shape == (m, k) and idx.shape == (m, k) and table.shape == (4, e)
    # ties inside the top k (the same logit for several experts) are broken as lax.top_k does: lower expert first
    ties = [len(set(np.asarray(logits[r].astype(jnp.float32))[np.asarray(ref_idx[r])])) < k for r in range(m)]
    assert any(ties) or k == 2
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(table), np.asarray(moe_mgpu.token_table(ref_idx, e)))
    assert not np.any(np.asarray(table[0, :k]) >= 0)  # no row beyond M counted


@pytest.mark.usefixtures("on_the_cpu")  # bfloat16 roundings as written (conftest)
def test_route_rounds_the_logits_to_the_model_dtype():
    """Two experts whose float32 sums differ below bf16's resolution tie once rounded: the lower one wins."""
    parts = np.zeros((2, 1, 16), np.float32)
    parts[0, 0, 3], parts[0, 0, 9] = 1.0, 1.0 + 2**-12
    w, idx, _ = router.route(jnp.asarray(parts), jnp.ones((16,), jnp.bfloat16), top_k=2, interpret=True)
    assert list(np.asarray(idx[0])) == [3, 9]
    _, idx32, _ = router.route(jnp.asarray(parts), jnp.ones((16,), jnp.float32), top_k=2, dtype=jnp.float32,
                               interpret=True)
    assert list(np.asarray(idx32[0])) == [9, 3]


def test_route_kernel_lowers_for_the_gpu():
    text = lowered_for_the_gpu(router.route, jax.ShapeDtypeStruct((22, 16, 128), jnp.float32),
                               jax.ShapeDtypeStruct((128,), jnp.bfloat16), top_k=8)
    assert "router_top8_of_128" in text and "stablehlo.sort" not in text


@pytest.mark.usefixtures("on_the_cpu")  # bfloat16 roundings as written (conftest)
def test_model_router_takes_the_kernel_at_decode(monkeypatch):
    """A 26B-A4B-family MoE layer's `route` under the skinny kernel (interpret) goes through the router kernel at
    ≤ 16 rows, with the XLA route's experts and weights, and hands its table on; at 17 rows, or with the knob off,
    XLA's top-k."""
    from hf_fixtures import FAMILIES

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.testing.synthetic import random_model

    cfg = Gemma4Config.from_hf_dict(dict(FAMILIES["26b-a4b"], num_experts=16, top_k_experts=4), name="moe16")
    layer = next(lay for lay in random_model(cfg, jnp.bfloat16).layers if getattr(lay, "moe_enabled", False))
    moe = layer.moe
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, cfg.hidden_size)), jnp.bfloat16)
    calls = []
    monkeypatch.setattr(router, "route", lambda *a, _f=router.route, **kw: calls.append(1) or _f(*a, **kw))
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "interpret")
    monkeypatch.setattr(dispatch, "ROUTER_KERNEL", True)
    w, idx, table = moe.route(x, "auto")
    assert calls and table is not None
    monkeypatch.setattr(dispatch, "ROUTER_KERNEL", False)
    ref_w, ref_idx, ref_table = moe.route(x, "auto")
    assert len(calls) == 1 and ref_table is None
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(table), np.asarray(moe_mgpu.token_table(ref_idx, 16)))
    monkeypatch.setattr(dispatch, "ROUTER_KERNEL", True)
    assert dispatch.resolve_router("auto", rows=17, d=64, experts=16, k=4) == "xla"
    monkeypatch.setattr(dispatch, "DENSE_FORCE", None)
    assert dispatch.resolve_router("xla", rows=4, d=64, experts=16, k=4) == "xla"
    assert dispatch.resolve_router("auto", rows=4, d=64, experts=16, k=4, platform="cpu") == "xla"
    assert dispatch.resolve_router("interpret", rows=4, d=64, experts=16, k=3) == "xla"  # k not a power of two
    assert dispatch.resolve_router("interpret", rows=4, d=64, experts=16, k=4) == "interpret"
