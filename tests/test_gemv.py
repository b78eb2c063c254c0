"""The skinny dense-matmul kernel (`gemma4_jax.kernels.gemv`) in Pallas interpret mode against plain jnp, its
GPU lowering at the real shapes, the dispatcher, `model.linear`'s views of each projection, and the model's
decode with the kernel in every projection against transformers.

Interpret mode fills every output buffer with NaN before a kernel runs (tests/test_kernels.py checks that), so a
partial sum that no program writes shows up as NaN in the result; every comparison asserts finiteness.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import FAMILIES, hf_logits, rel_err

import gemma4_jax
from gemma4_jax.kernels import dispatch
from gemma4_jax.kernels.dispatch import resolve_dense
from gemma4_jax.kernels.gemv import (
    GEMV_MAX_ROWS,
    TARGET_PROGRAMS,
    GemvConfig,
    default_config,
    gemv,
    gemv_many,
    gemv_parts,
    gemv_reference,
)
from gemma4_jax.model.text import linear, rms_norm
from gemma4_jax.testing.lowering import lowered_for_the_gpu

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _check(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "a partial sum was never written (NaN-poisoned) or the result is not finite"
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err <= TOL[dtype], f"max|Δ|/max|ref| = {err:.3g} > {TOL[dtype]}"


# (M, K, N, dtype, config or None for the default)
CASES = [
    (1, 256, 96, jnp.float32, GemvConfig(block_n=32, block_k=32, split_k=1)),
    (1, 256, 96, jnp.float32, GemvConfig(block_n=32, block_k=32, split_k=4)),  # four partials added
    (3, 192, 64, jnp.bfloat16, GemvConfig(block_n=16, block_k=64, split_k=3)),  # K/S not a power of two
    (16, 128, 48, jnp.float32, GemvConfig(block_n=16, block_k=16, split_k=2)),  # every padded row is real
    (2, 512, 128, jnp.bfloat16, None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}_k{c[1]}_n{c[2]}_{c[4] or 'default'}" for c in CASES])
def test_gemv_matches_reference(case):
    m, k, n, dtype, cfg = case
    kx, kw = jax.random.split(jax.random.key(m * 1000 + k))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (k**-0.5 * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
    ref = gemv_reference(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    _check(gemv(x, w, config=cfg, interpret=True), ref, dtype)
    # the same product with W stored [N, K] (`nk`): the kernel reads its transpose in place
    _check(gemv(x, jnp.asarray(w.T), config=cfg, interpret=True, nk=True), ref, dtype)


@pytest.mark.parametrize("nk", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}_k{c[1]}_n{c[2]}_{c[4] or 'default'}" for c in CASES])
def test_gemv_sums_its_splits_in_the_kernel(case, nk):
    """`sum_in_kernel`: each column tile's last program adds the tile's K-split partials in split order, so the
    result is, bit for bit, the partial products (`gemv_parts`, the same config) added in that order in float32
    and rounded once; and within the tolerance of a float32 product. Unwritten partials are NaN in interpret mode,
    so a tile summed before all its splits are out, or a split left out, fails."""
    m, k, n, dtype, cfg = case
    kx, kw = jax.random.split(jax.random.key(m * 1000 + k + 7))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (k**-0.5 * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
    wk = jnp.asarray(w.T) if nk else w
    got = gemv(x, wk, config=cfg, interpret=True, nk=nk, sum_in_kernel=True)
    parts = np.asarray(gemv_parts(x, wk, config=cfg, interpret=True, nk=nk))
    want = parts[0]
    for p in parts[1:]:
        want = want + p  # float32, split order
    assert got.dtype == x.dtype and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jnp.asarray(want).astype(dtype), np.float32))
    ref = gemv_reference(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    _check(got, ref, dtype)


def test_gemv_detects_a_wrong_column_tile():
    """A kernel that reads the wrong W columns must fail the comparison (the reference is not the kernel's own)."""
    x = jax.random.normal(jax.random.key(0), (1, 64))
    w = jax.random.normal(jax.random.key(1), (64, 64))
    ref = gemv_reference(x, w, precision=jax.lax.Precision.HIGHEST)
    rolled = jnp.roll(w, 16, axis=1)
    cfg = GemvConfig(block_n=16, block_k=16, split_k=2)
    with pytest.raises(AssertionError):
        _check(gemv(x, rolled, config=cfg, interpret=True), ref, jnp.float32)
    with pytest.raises(AssertionError):  # [N, K] read as if it were [K, N]
        _check(gemv(x, jnp.asarray(w.T), config=cfg, interpret=True), ref, jnp.float32)


# (M, K, Ns, dtype, norm?, config or None for the default)
MANY = [
    (1, 192, (64, 16, 16), jnp.float32, True, GemvConfig(block_n=16, block_k=64, split_k=1)),
    (3, 192, (64, 16, 16), jnp.float32, True, GemvConfig(block_n=16, block_k=32, split_k=3)),  # K/S = 64
    (16, 256, (96, 32), jnp.bfloat16, True, GemvConfig(block_n=32, block_k=64, split_k=2)),
    (2, 256, (128, 128), jnp.bfloat16, False, None),
]


@pytest.mark.parametrize("case", MANY, ids=[f"m{c[0]}_k{c[1]}_n{'-'.join(map(str, c[2]))}_norm{c[4]}" for c in MANY])
def test_gemv_many_matches_norm_then_each_projection(case):
    """Several weights in one launch, with the RMS norm (float32, rounded to x's dtype, as the model's) before
    them: each output against the model's `rms_norm` and a float32 product; a norm weight away from 1."""
    m, k, ns, dtype, norm, cfg = case
    keys = jax.random.split(jax.random.key(m + k), len(ns) + 2)
    x = (3.0 * jax.random.normal(keys[0], (m, k), jnp.float32)).astype(dtype)
    g = (1.0 + 0.5 * jax.random.normal(keys[1], (k,), jnp.float32)).astype(dtype)
    ws = [(k**-0.5 * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
          for kw, n in zip(keys[2:], ns, strict=True)]
    a = rms_norm(x, g, 1e-6) if norm else x
    outs = gemv_many(x, ws, g if norm else None, eps=1e-6, config=cfg, interpret=True)
    assert len(outs) == len(ws)
    for out, w in zip(outs, ws, strict=True):
        ref = gemv_reference(a.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        _check(out, ref, dtype)
    if norm:  # the norm is applied: the un-normalised product is far from it
        plain = gemv_reference(x.astype(jnp.float32), ws[0].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        with pytest.raises(AssertionError):
            _check(outs[0], plain, dtype)


def test_gemv_lowers_many_with_the_norm_for_the_gpu():
    """E2B's queries, keys and values after the input norm: one Triton call on this CPU's CUDA lowering, each
    weight reaching it untouched."""
    bf = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, 1536), bf)
    ws = [jax.ShapeDtypeStruct((1536, n), bf) for n in (2048, 256, 256)]
    text = lowered_for_the_gpu(gemv_many, x, ws, jax.ShapeDtypeStruct((1536,), bf))
    assert text.count("stablehlo.custom_call") == 1


def test_default_config_fills_the_gpu():
    for k, n in ((2816, 2112), (2112, 2816), (2816, 4096), (4096, 2816), (2816, 8192), (2560, 10240), (1536, 256)):
        cfg = default_config(k, n)
        assert n % cfg.block_n == 0 and (k // cfg.split_k) % cfg.block_k == 0 and k % cfg.split_k == 0
        steps = k // cfg.block_k
        # the fewest splits that reach the target, or every split there is
        assert (n // cfg.block_n) * cfg.split_k >= TARGET_PROGRAMS or cfg.split_k == steps
        smaller = [s for s in range(1, cfg.split_k) if steps % s == 0]
        assert all((n // cfg.block_n) * s < TARGET_PROGRAMS for s in smaller)


def test_default_config_narrows_tiles_before_it_splits_k(monkeypatch):
    """With MIN_BLOCK_N lowered, column tiles narrow first (no K split where the narrower tiles reach the target),
    and MAX_SPLIT_K caps the splits; the knobs key the programs kept across processes."""
    from gemma4_jax.kernels import gemv as gemv_module

    monkeypatch.setattr(gemv_module, "MIN_BLOCK_N", 16)
    monkeypatch.setattr(gemv_module, "TARGET_PROGRAMS", 128)
    assert default_config(1536, 2048) == GemvConfig(block_n=16, block_k=128, split_k=1)  # 128 tiles of 16
    assert default_config(2816, 4096) == GemvConfig(block_n=32, block_k=128, split_k=1)  # 128 tiles of 32
    cfg = default_config(1536, 256)  # 16 tiles of 16: split K as before
    assert (cfg.block_n, cfg.split_k) == (16, 12)
    monkeypatch.setattr(gemv_module, "MAX_SPLIT_K", 1)
    assert default_config(1536, 256) == GemvConfig(block_n=16, block_k=128, split_k=1)
    assert "gemv.MAX_SPLIT_K=1" in dispatch.settings() and "gemv.MIN_BLOCK_N=16" in dispatch.settings()


@pytest.mark.parametrize("m,nk", [(1, False), (16, False), (16, True)])
def test_gemv_lowers_for_the_gpu_at_real_shapes(m, nk):
    """26B-A4B's dense MLP gate (2816 → 2112, or stored [2112, 2816] with `nk`) lowers to one Triton call on this
    CPU, and the weight reaches it untouched: no transpose or copy of a weight-shaped array."""
    bf = jnp.bfloat16
    shape = (2112, 2816) if nk else (2816, 2112)
    args = (jax.ShapeDtypeStruct((m, 2816), bf), jax.ShapeDtypeStruct(shape, bf))
    text = lowered_for_the_gpu(gemv, *args, nk=nk)
    assert text.count("stablehlo.custom_call") == 1
    for line in text.splitlines():
        if f"tensor<{shape[0]}x{shape[1]}xbf16>" in line:
            assert "custom_call" in line or "func.func" in line or " call @" in line, line  # or a nested jit


def test_resolve_dense():
    r = resolve_dense
    assert r("auto", rows=1, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("cudnn", rows=16, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("auto", rows=GEMV_MAX_ROWS + 1, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "xla"
    # the weight limits: one row up to 12 Mi elements, 2-16 rows up to 6 Mi (E2B's 1536 × 6144, 9 Mi)
    assert r("auto", rows=1, k=2816, n=4096, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("auto", rows=1, k=2816, n=8192, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert r("auto", rows=1, k=1536, n=12288, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert r("auto", rows=1, k=1536, n=6144, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("auto", rows=2, k=1536, n=6144, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert r("auto", rows=16, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("auto", rows=1, k=5376, n=21504, dtype=jnp.bfloat16, platform="gpu") == "xla"  # 31B's MLP: cuBLAS
    assert r("auto", rows=1, k=2816, n=2112, dtype=jnp.float32, platform="gpu") == "xla"
    assert r("auto", rows=1, k=2816, n=2112, dtype=jnp.bfloat16, platform="cpu") == "xla"
    assert r("pallas", rows=1, k=2816, n=2112, dtype=jnp.float32, platform="gpu") == "pallas"
    assert r("interpret", rows=4, k=64, n=32, dtype=jnp.float32, platform="cpu") == "interpret"
    assert r("interpret", rows=4, k=64, n=30, dtype=jnp.float32, platform="cpu") == "xla"  # N has no 16-block
    assert r("xla", rows=1, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "xla"
    with pytest.raises(ValueError, match="impl"):
        r("fast", rows=1, k=64, n=32)


def test_the_weight_limits_move_projections_to_xla_and_key_programs(monkeypatch):
    """`dispatch.GEMV_MAX_WEIGHT` (bench.py generate --gemv-max-weight): weights above it go to XLA, and a program
    traced under another limit is another program (`dispatch.settings`)."""
    from gemma4_jax.kernels import dispatch

    before = dispatch.settings()
    monkeypatch.setattr(dispatch, "GEMV_MAX_WEIGHT", 2816 * 2112)
    assert resolve_dense("auto", rows=1, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert resolve_dense("auto", rows=1, k=2816, n=4096, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert dispatch.settings() != before
    # GEMV_MAX_WEIGHT_BATCHED (--gemv-max-weight-batched): the same for 2-16 rows, one row untouched
    before = dispatch.settings()
    monkeypatch.setattr(dispatch, "GEMV_MAX_WEIGHT_BATCHED", 2816 * 4096)
    assert resolve_dense("auto", rows=2, k=2816, n=4096, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert resolve_dense("auto", rows=1, k=2816, n=4096, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert dispatch.settings() != before
    # and below GEMV_MIN_WEIGHT (bench.py generate --gemv-min-weight): 26B-A4B's router to XLA, the rest kept
    before = dispatch.settings()
    monkeypatch.setattr(dispatch, "GEMV_MIN_WEIGHT", 2816 * 128 + 1)
    assert resolve_dense("auto", rows=16, k=2816, n=128, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert resolve_dense("auto", rows=16, k=2816, n=2112, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert dispatch.settings() != before
    # every other knob read while tracing keys the programs too
    for name in ("GEMV_SUM_IN_KERNEL", "DENSE_AFTER_ROUTER", "ROUTER_OWN_NORM"):
        before = dispatch.settings()
        monkeypatch.setattr(dispatch, name, not getattr(dispatch, name))
        assert dispatch.settings() != before, name


@pytest.mark.parametrize("eq,xs,ws", [
    ("BTD,DNH->BTNH", (1, 1, 64), (64, 4, 16)),  # queries
    ("BTNH,NHD->BTD", (2, 1, 4, 16), (4, 16, 32)),  # output: two contracted dims
    ("BTD,DF->BTF", (3, 2, 32), (32, 48)),  # MLP
    ("MD,DE->ME", (5, 32), (32, 16)),  # router
])
def test_linear_views_match_the_einsum(eq, xs, ws):
    kx, kw = jax.random.split(jax.random.key(len(eq)))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    want = jnp.einsum(eq, x, w, precision=jax.lax.Precision.HIGHEST)
    got = linear(eq, x, w, impl="interpret")
    assert got.shape == want.shape
    _check(got, want, jnp.float32)


@pytest.mark.parametrize("eq,xs,ws", [
    ("BTD,DNH->BTNH", (1, 1, 64), (64, 4, 16)),  # queries
    ("BTNH,NHD->BTD", (1, 1, 4, 16), (4, 16, 32)),  # output: two contracted dims
    ("BTD,DF->BTF", (1, 1, 32), (32, 48)),  # MLP
])
def test_one_row_xla_products_run_padded(eq, xs, ws, monkeypatch):
    """`dispatch.ONE_ROW_PADDED_MAX_WEIGHT` (bench.py generate --one-row-padded-max-weight): a one-row product that
    XLA takes on a GPU runs on x padded to 16 rows (a 16-row dot in the program) with the einsum's result; weights
    above the limit, two rows, the CPU and impl 'xla' keep the plain einsum."""
    monkeypatch.setattr(dispatch, "_on_gpu", lambda platform: True)
    monkeypatch.setattr(dispatch, "GEMV_MAX_WEIGHT", 0)
    monkeypatch.setattr(dispatch, "GEMV_MAX_WEIGHT_BATCHED", 0)
    k = int(np.prod(xs[-(len(ws) - 1):])) if eq.startswith("BTNH") else xs[-1]
    n = int(np.prod(ws)) // k
    kx, kw = jax.random.split(jax.random.key(len(eq)))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    want = jnp.einsum(eq, x, w, precision=jax.lax.Precision.HIGHEST)

    def dot_rows(f, *args):
        eqns = jax.make_jaxpr(f)(*args).eqns
        return sorted({e.invars[0].aval.shape[0] for e in eqns if e.primitive.name == "dot_general"})

    assert dot_rows(lambda x, w: linear(eq, x, w), x, w) == [1]  # off by default
    before = dispatch.settings()
    monkeypatch.setattr(dispatch, "ONE_ROW_PADDED_MAX_WEIGHT", k * n)
    assert dispatch.settings() != before
    got = linear(eq, x, w)
    assert got.shape == want.shape
    _check(got, want, jnp.float32)
    assert dot_rows(lambda x, w: linear(eq, x, w), x, w) == [16]
    assert dot_rows(lambda x, w: linear(eq, x, w, impl="xla"), x, w) == [1]
    x2 = jnp.concatenate([x, x])
    assert dot_rows(lambda x, w: linear(eq, x, w), x2, w) == [2]  # two rows: as they are
    monkeypatch.setattr(dispatch, "ONE_ROW_PADDED_MAX_WEIGHT", k * n - 1)
    assert dot_rows(lambda x, w: linear(eq, x, w), x, w) == [1]
    monkeypatch.setattr(dispatch, "ONE_ROW_PADDED_MAX_WEIGHT", k * n)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda platform: False)
    assert dot_rows(lambda x, w: linear(eq, x, w), x, w) == [1]


@pytest.mark.parametrize("family,fused", [("e2b", False), ("26b-a4b", False), ("e2b", True), ("26b-a4b", True),
                                          ("e2b", "add_norm"), ("26b-a4b", "add_norm"), ("e2b", "summed")])
def test_model_with_gemv_matches_transformers(family, fused, hf_models, hf_dirs, monkeypatch):
    """float32, every projection of a 1×4-token forward through the kernel (interpret mode; attention and the
    experts on XLA): transformers' logits. e2b covers the per-layer-input projections and KV-shared layers,
    26b-a4b the router and k_eq_v; `fused`: q/k/v and gate/up in one launch each, the norm inside; "add_norm":
    the output projection's partials, the post-attention norm, the residual and the pre-MLP norm in one kernel;
    "summed": every projection's K splits added in its kernel (`dispatch.GEMV_SUM_IN_KERNEL`)."""
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "interpret")
    monkeypatch.setattr(dispatch, "GEMV_SUM_IN_KERNEL", fused == "summed")
    monkeypatch.setattr(dispatch, "FUSED_PROJECTIONS", fused is True)
    monkeypatch.setattr(dispatch, "FUSED_ADD_NORM", fused == "add_norm")
    monkeypatch.setattr(dispatch, "MOE_FORCE", "xla")
    jax.clear_caches()
    ids = np.random.default_rng(7).integers(3, 256, size=(1, 4))
    model = gemma4_jax.load(hf_dirs[family, "causal"], dtype="float32", attn_impl="xla", progress=False)
    assert FAMILIES[family]  # the family exists in the fixtures
    assert rel_err(model.logits(ids), hf_logits(hf_models[family], ids)) <= 1e-4


def test_generation_with_gemv_equals_xla(hf_dirs, monkeypatch):
    """Greedy prefill + decode with the kernel in every decode projection gives the XLA path's tokens (float32)."""
    prompts = [[2, 17, 99, 40, 7, 12], [2, 5, 6]]
    path = hf_dirs["e4b", "causal"]
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "interpret")
    ours = gemma4_jax.load(path, dtype="float32", attn_impl="xla", progress=False).generate(
        prompts, max_new_tokens=5, stop_tokens=())
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "xla")
    jax.clear_caches()  # the knob is read when a step is traced: no compiled program may carry over
    plain = gemma4_jax.load(path, dtype="float32", attn_impl="xla", progress=False).generate(
        prompts, max_new_tokens=5, stop_tokens=())
    assert ours == plain, (ours, plain)


@pytest.mark.parametrize("name,fused", [("e2b", False), ("e4b", False), ("26b-a4b", False), ("31b", False),
                                        ("e2b", True), ("26b-a4b", "add_norm"), ("26b-a4b", "summed"),
                                        ("e2b", "summed_norm"), ("e2b", "b16"), ("e2b", "padded")])
def test_every_variant_lowers_its_decode_step_for_the_gpu(name, fused, monkeypatch):
    """Each released variant's batch-1 decode step, at the real shapes, lowers for CUDA on this CPU with the skinny
    kernel at exactly the projections the dispatcher gives it (and 26B-A4B's MoE kernels); `fused`: the queries
    run after the input norm inside one launch with the keys and values; "add_norm": each layer's output
    projection feeds the one add-and-norm kernel; "summed": every skinny kernel adds its own K splits;
    "summed_norm": all but gate, up and the per-layer-input gate, whose sums XLA fuses with the GELU; "b16": the
    batch-16 step, under the weight limit of 2-16 rows; "padded": the kernel up to 6 Mi elements, XLA's products
    of up to 12 Mi on the one row padded to 16 (E2B's 1536 × 6144 and 6144 × 1536), larger ones on one row."""
    import os
    import re
    import sys

    from flax import nnx

    from gemma4_jax.config import preset
    from gemma4_jax.generation.cache import init_cache
    from gemma4_jax.generation.loop import decode_logits
    from gemma4_jax.kernels.gemv import supports as gemv_supports
    from gemma4_jax.model.text import Gemma4Text

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from bench_dense import projection_shapes

    monkeypatch.setattr(dispatch, "_on_gpu", lambda platform: True)
    monkeypatch.setattr(dispatch, "ONE_ROW_STREAM_ROWS", 1)  # the one-row step (a dense model's default is 4 rows)
    monkeypatch.setattr(dispatch, "FUSED_PROJECTIONS", fused is True)
    monkeypatch.setattr(dispatch, "FUSED_ADD_NORM", fused == "add_norm")
    monkeypatch.setattr(dispatch, "GEMV_SUM_IN_KERNEL", {"summed": True, "summed_norm": "norm"}.get(fused, False))
    if fused == "padded":
        monkeypatch.setattr(dispatch, "GEMV_MAX_WEIGHT", 6 * 2**20)
        monkeypatch.setattr(dispatch, "ONE_ROW_PADDED_MAX_WEIGHT", 12 * 2**20)
    jax.clear_caches()  # the knobs are read when a step is traced: no trace of another test may be reused
    cfg = preset(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma4Text(cfg, jnp.bfloat16, nnx.Rngs(0))))
    batch = 16 if fused == "b16" else 1  # "b16": the weight limit of 2-16 rows (dispatch.gemv_max_weight)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, 256, jnp.bfloat16))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = lowered_for_the_gpu(decode_logits, graphdef, state, cache, tok, tok)
    names = re.findall(r'name = "((?:rmsnorm_|summed_)?gemv_[\dx_]+|moe_\w+)"', text)
    gemvs = [n for n in names if "gemv_" in n]
    plain = {n.split("gemv_")[1] for n in gemvs if not n.startswith("summed_")}
    summed = {n.split("gemv_")[1] for n in gemvs if n.startswith("summed_")}
    want = {f"{k}x{n}" for k, n in projection_shapes(cfg) if k * n <= dispatch.gemv_max_weight(batch)
            and gemv_supports(k, n)}
    mlp_in = {f"{cfg.hidden_size}x{s.mlp_width}" for s in cfg.layers} & want
    if fused == "summed":
        assert gemvs and not plain, sorted(plain)
    elif fused == "summed_norm":  # gate, up and the per-layer-input gate (E2B's 1536 × 256, as its keys' and values')
        assert plain == mlp_in | {f"{cfg.hidden_size}x{cfg.ple_dim}"}, sorted(plain)
        assert summed and not summed & mlp_in, sorted(summed)
    else:
        assert gemvs and not summed, sorted(summed)
    got = {shape for n in names if "gemv_" in n for shape in n.split("gemv_")[1].split("_")}
    got |= {n for n in names if n.startswith("moe_")}
    want |= {"moe_gate_up", "moe_down"} if cfg.num_experts else set()
    assert got == want, (sorted(got ^ want))
    # the queries (with keys and values where they fit too) run after the input norm, inside one launch
    q = f"{cfg.hidden_size}x{cfg.num_heads * cfg.layers[0].head_dim}"
    assert (q in want and fused is True) == any(n.startswith(f"rmsnorm_gemv_{q}") for n in names), sorted(set(names))
    dots = set(re.findall(r"dot_general.*\(tensor<(\d+)x(\d+)xbf16>, tensor<(\d+)x(\d+)xbf16>\)", text))
    padded = {f"{k}x{n}" for m, k, _, n in dots if m == "16"}  # at batch 1 (at 16, every dot has 16 rows)
    assert batch == 16 or padded == ({"1536x6144", "6144x1536"} if fused == "padded" else set()), sorted(dots)
    calls = len(re.findall(r"call @add_norm\b", text))  # after each output projection on the skinny kernel
    on_kernel = sum(f"{cfg.num_heads * s.head_dim}x{cfg.hidden_size}" in want for s in cfg.layers)  # the outputs'
    assert calls == (on_kernel if fused == "add_norm" else 0), calls
    assert fused != "add_norm" or on_kernel >= cfg.num_layers // 2, on_kernel
    assert (f'name = "add_rms_norm_{cfg.hidden_size}"' in text) == (fused == "add_norm")
