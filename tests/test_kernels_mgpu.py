"""The Mosaic GPU flash-attention kernel (`flash_attention_mgpu.py`) in GPU interpret mode on the CPU, against
`flash_attention_reference` with positions 0..T−1 for queries and keys.

GPU interpret mode simulates the CTA's three warpgroups as threads with shared memory, TMA copies and
barriers, so these tests exercise the kernel's whole synchronisation protocol (ring slots, the score exchange
between the two consumers, the producer's drain) and its masking and loop bounds; they say nothing about
speed or about Mosaic's GPU lowering (layouts, register limits), which only a GPU run can check.

The interpreter needs ≥ 3 CPU devices so that the three simulated threads never share one
(`kernels/mgpu_interpret.py`); tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4.
Uninitialised interpreter buffers are NaN, so every comparison also asserts finiteness. Cases marked slow run
only with MGPU_INTERPRET_SLOW=1. A separate test lowers the real GPU path for CUDA (no GPU needed), which
checks what Pallas/Mosaic verify at lowering time.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.kernels import mgpu_interpret
from gemma4_jax.kernels.flash_attention import flash_attention_reference
from gemma4_jax.kernels.flash_attention_mgpu import (
    SMEM_BYTES,
    MgpuConfig,
    default_config,
    flash_attention_mgpu,
    smem_bytes,
)
from gemma4_jax.testing.lowering import lowered_for_the_gpu


def _interpret_available() -> str | None:
    """None if GPU interpret mode can run here, else the reason it cannot."""
    try:
        import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: F401
    except ImportError as e:  # pragma: no cover
        return f"no Pallas Mosaic GPU module: {e}"
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
    except ImportError:
        if not hasattr(plgpu, "InterpretGPUParams"):
            return "this jax has no GPU interpret mode (InterpretGPUParams)"
    if tuple(jax.__version_info__[:2]) >= (0, 11) and (os.cpu_count() or 1) < 3:
        return ("jax >= 0.11's GPU interpreter deadlocks the 3-warpgroup kernel on < 3 CPU cores, one CPU device "
                "per simulated thread or not (jax 0.11.2 on a 2-core CPU, 2026-12-08)")
    if len(jax.devices("cpu")) < 3 and (os.cpu_count() or 1) < 3:
        return ("GPU interpret mode can deadlock with < 3 CPU cores on one device; set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=4")
    return None


_REASON = _interpret_available()
needs_interpret = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
slow = pytest.mark.skipif(not os.environ.get("MGPU_INTERPRET_SLOW"), reason="slow; set MGPU_INTERPRET_SLOW=1")


def _qkv(seed, b, t, n, kh, h, amp=1.0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = amp * jax.random.normal(kq, (b, t, n, h), jnp.float32)
    k = amp * jax.random.normal(kk, (b, t, kh, h), jnp.float32)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.float32)
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def _check_case(b, t, n, kh, h, window, scale, amp, config=None, seed=0):
    q, k, v = _qkv(seed, b, t, n, kh, h, amp)
    out = flash_attention_mgpu(q, k, v, scale=scale, window=window, config=config, interpret=True)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ref = flash_attention_reference(q, k, v, pos, pos, scale=scale, window=window, causal=True)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape == (b, t, n, h)
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.abs(out - ref) - 1e-2 * np.abs(ref)  # bf16 output: ~1 ulp of slack at |o| > 2
    assert err.max() <= 2e-2, f"max abs error {np.abs(out - ref).max():.3g}"


# (B, T, N, K, H, window, scale, input amplitude, config)
CASES = [
    # Gemma-like global layer: G = 8 (8 tokens × 8 heads per 64-row block), 16 query blocks × 1–4 key steps.
    pytest.param(1, 128, 8, 1, 512, None, 512 ** -0.5, 1.0, None, id="h512-g8"),
    # Batch 2, two KV heads, T not a multiple of the block (padding), sliding window, scale 1.0 as in the model.
    pytest.param(2, 100, 4, 2, 512, 40, 1.0, 512 ** -0.25, None, id="h512-g2-b2-window-scale1"),
    # G = 1 and a window shorter than a key step: some rows see nothing in their first visited block.
    pytest.param(1, 96, 1, 1, 512, 5, 512 ** -0.5, 1.0, None, id="h512-g1-window5"),
    # A smaller head: its own default config (64-key steps, 3 stages).
    pytest.param(1, 200, 4, 1, 128, None, 128 ** -0.5, 1.0, None, id="h128-g4"),
]
SLOW_CASES = [
    # Window wider than two key steps: masked window-edge block, unmasked interior blocks, masked diagonal block.
    pytest.param(1, 256, 4, 2, 256, 160, 256 ** -0.5, 1.0, None, id="h256-g2-window-interior"),
    pytest.param(1, 160, 2, 2, 64, None, 0.125, 1.0, None, id="h64-g1"),
    pytest.param(1, 130, 16, 1, 512, 33, 512 ** -0.5, 1.0, MgpuConfig(block_kv=32, num_stages=1),
                 id="h512-g16-one-stage"),
    pytest.param(1, 128, 64, 1, 64, 17, 0.125, 1.0, None, id="h64-g64-window"),
]


@needs_interpret
@pytest.mark.parametrize("b,t,n,kh,h,window,scale,amp,config", CASES)
def test_matches_reference(b, t, n, kh, h, window, scale, amp, config):
    _check_case(b, t, n, kh, h, window, scale, amp, config)


@needs_interpret
@slow
@pytest.mark.parametrize("b,t,n,kh,h,window,scale,amp,config", SLOW_CASES)
def test_matches_reference_slow(b, t, n, kh, h, window, scale, amp, config):
    _check_case(b, t, n, kh, h, window, scale, amp, config)


def _cuda_lowering_available() -> bool:
    try:
        lowered_for_the_gpu(jax.jit(lambda x: x + 1), jax.ShapeDtypeStruct((8,), jnp.float32))
        return True
    except Exception:  # noqa: BLE001 - any failure means: cannot lower for CUDA on this host
        return False


@pytest.mark.skipif(not _cuda_lowering_available(), reason="this jax cannot lower for CUDA on this host")
@pytest.mark.parametrize(
    "h,g,window,config",
    [(512, 8, 1024, None), (512, 1, None, MgpuConfig(exchange_swizzle=False)), (128, 4, 64, None)],
    ids=["h512-g8-window", "h512-g1-plain-exchange", "h128-g4-window"],
)
def test_lowers_to_mosaic_gpu(h, g, window, config):
    """The GPU path (not interpret mode) traces and lowers through Pallas to a Mosaic GPU custom call on a CPU
    host: that checks wgmma shapes and swizzles, register layouts, tiled loads/stores and loop-carried layouts
    — everything short of PTX generation and running, which need a GPU."""
    q = jax.ShapeDtypeStruct((1, 1000, 8, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, 8 // g, h), jnp.bfloat16)
    assert "mosaic_gpu" in lowered_for_the_gpu(flash_attention_mgpu, q, k, k, window=window, config=config)


def test_default_configs_fit_shared_memory():
    for h in (64, 128, 256, 512):
        assert smem_bytes(h, default_config(h)) <= SMEM_BYTES - 1024, h
    assert smem_bytes(512, default_config(512)) == 224 * 1024  # the budget in the module docstring


@pytest.mark.parametrize(
    "shape_q,shape_kv,dtype,kwargs,match",
    [
        ((1, 64, 2, 96), (1, 64, 1, 96), jnp.bfloat16, {}, "head_dim"),
        ((1, 64, 3, 128), (1, 64, 1, 128), jnp.bfloat16, {}, "power of two"),
        ((1, 64, 2, 128), (1, 64, 1, 128), jnp.float32, {}, "bfloat16"),
        ((1, 64, 2, 128), (1, 32, 1, 128), jnp.bfloat16, {}, "k and v"),
        ((1, 64, 2, 512), (1, 64, 1, 512), jnp.bfloat16, {"config": MgpuConfig(block_kv=64, num_stages=1)},
         "shared memory"),
        ((1, 64, 2, 128), (1, 64, 1, 128), jnp.bfloat16, {"window": 0}, "window"),
    ],
)
def test_rejects_unsupported(shape_q, shape_kv, dtype, kwargs, match):
    q = jnp.zeros(shape_q, dtype)
    k = jnp.zeros(shape_kv, dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention_mgpu(q, k, k, **kwargs)


def test_config_validation():
    with pytest.raises(ValueError):
        MgpuConfig(block_kv=48)
    with pytest.raises(ValueError):
        MgpuConfig(num_stages=0)


@needs_interpret
def test_dispatcher_routes_prefill_at_512_to_mosaic(monkeypatch):
    """On a (pretended) Hopper GPU, `auto` sends aligned head_dim-512 prefill to this kernel (interpreted here),
    with the model's scale and window and ragged rows whose padding keys sit at the end; the valid rows equal
    the reference, and decode-length calls stay off it."""
    from gemma4_jax.kernels import dispatch

    monkeypatch.setattr(dispatch, "MOSAIC_INTERPRET", True)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda platform: True)
    monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
    monkeypatch.setattr(dispatch, "mosaic_compiles", lambda *args: True)  # the real check compiles for a GPU
    calls = []
    real = dispatch.mosaic_attention
    monkeypatch.setattr(dispatch, "mosaic_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    b, t, kh, g, h = 2, 40, 1, 4, 512
    q, k, v = _qkv(3, b, t, kh * g, kh, h, 512 ** -0.25)
    lengths = np.array([40, 23])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.where(pos < lengths[:, None], pos, -1)
    out = dispatch.attention(q, k, v, pos, k_pos, scale=1.0, window=9, aligned=True)
    assert calls == [dict(scale=1.0, window=9)]
    ref = flash_attention_reference(q, k, v, pos, k_pos, scale=1.0, window=9)
    valid = np.arange(t)[None, :] < lengths[:, None]
    out, ref = np.asarray(out, np.float32)[valid], np.asarray(ref, np.float32)[valid]
    assert np.isfinite(out).all()
    assert np.max(np.abs(out - ref) - 1e-2 * np.abs(ref)) <= 2e-2
    assert dispatch.resolve("auto", head_dim=h, group=g, q_len=1, batch=1, aligned=True) == "xla"  # decode


def test_interpret_thread_runner_returns_after_the_thread_finished():
    """GPU interpret mode runs each simulated thread as its own XLA:CPU program (kernels/mgpu_interpret.py's
    runner), and XLA:CPU may return from a call before the program has run to its end. A thread that
    returned early leaves its last callbacks (barrier deallocation) running while the interpreter checks
    that no barrier is left, which failed CI intermittently. Here every thread's last callback is slow; the
    caller, right after thread_map, must see every one of them done, for 24 kernel-like calls (without the
    runner's wait, several of the 24 returned early in every try here)."""
    import time

    from jax._src import callback

    mgpu_interpret.params(True)  # installs the runner
    try:
        from jax._src.pallas.mosaic.interpret import thread_map as tm
    except ImportError:  # pragma: no cover
        pytest.skip("this jax has no GPU interpret thread_map")
    if not getattr(tm._run_jaxpr, "_mgpu_thread_runner", False):  # pragma: no cover
        pytest.skip("the interpreter's thread runner is not where kernels/mgpu_interpret.py expects it")
    finished, seen = [], []
    scalar = jax.ShapeDtypeStruct((), jnp.int32)

    def last_step(tok):
        time.sleep(0.02)
        finished.append(1)
        return tok

    def thread(i, tok):
        tok = jax.lax.fori_loop(0, i + 1, lambda j, t: t + j, tok)
        return callback.io_callback(last_step, scalar, tok, ordered=False)

    def after(tok):
        seen.append(len(finished))
        return tok

    @jax.jit
    def call(tok):
        tok = tm.thread_map(thread, 3, tok, use_ordered_callback=True)
        return callback.io_callback(after, scalar, tok, ordered=True)

    for n in range(24):
        jax.block_until_ready(call(jnp.int32(n)))
    assert seen == [3 * (n + 1) for n in range(24)]
