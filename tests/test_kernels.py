"""Attention kernels in Pallas interpret mode (CPU) against their jnp references, and the references
against the model's own XLA attention.

Interpret mode fills every output buffer with NaN before the kernel runs (checked below), so a block the
kernel never writes shows up as NaN; every comparison also asserts finiteness. Small block sizes make
even these short sequences span several query blocks, key blocks and decode splits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import all_eqns
from jax.experimental import pallas as pl

from gemma4_jax.kernels import (
    DecodeConfig,
    FlashConfig,
    attention,
    decode_attention,
    decode_attention_reference,
    dispatch,
    flash_attention,
    flash_attention_reference,
    resolve,
)
from gemma4_jax.model.text import attention as model_attention
from gemma4_jax.model.text import attention_mask

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL_FLASH = FlashConfig(block_m=16, block_k=16, num_warps=4, num_stages=1)
SMALL_DECODE = DecodeConfig(block_k=16, num_warps=4, num_stages=1, target_programs=64)


def _qkv(seed, b, t, s, n, kh, h, dtype):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32)
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32)
    v = jax.random.normal(kv, (b, s, kh, h), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _ring_positions(lengths, slots):
    """Slot j of a ring buffer of `slots` holds the latest position p < length with p ≡ j (mod slots), else −1."""
    j = np.arange(slots)[None, :]
    last = np.asarray(lengths)[:, None] - 1
    p = j + slots * np.floor_divide(last - j, slots)
    return jnp.asarray(np.where(p >= 0, p, -1), jnp.int32)


def _assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "kernel left unwritten (NaN-poisoned) or non-finite outputs"
    err = np.max(np.abs(out - ref))
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"


def test_interpret_mode_poisons_outputs():
    """The premise of the coverage checks: outputs a kernel does not write read back as NaN."""
    def half(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((32, 16), jnp.float32)
    out = pl.pallas_call(half, grid=(2,), in_specs=[pl.BlockSpec((16, 16), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert np.isfinite(np.asarray(out[:16])).all() and np.isnan(np.asarray(out[16:])).all()


# (head_dim, G, dtype, window, T, S, offset, scale, causal) — offset: first query position (chunked prefill).
FLASH_CASES = [
    (64, 1, jnp.float32, None, 37, 37, 0, 0.125, True),  # odd length, plain causal
    (64, 4, jnp.float32, 5, 50, 50, 0, 0.125, True),  # sliding window, GQA 4
    (256, 2, jnp.float32, 16, 13, 43, 30, 0.0625, True),  # chunk at an offset into a cache, window
    (512, 8, jnp.float32, None, 33, 33, 0, 1.0, True),  # Gemma-like full layer, scale 1.0
    (512, 1, jnp.bfloat16, 9, 21, 32, 11, 0.044, True),
    (256, 8, jnp.bfloat16, None, 40, 40, 0, 0.0625, True),
    (64, 16, jnp.float32, 3, 24, 24, 0, 0.125, True),  # G=16: one token × 16 heads per block
    (64, 2, jnp.float32, None, 17, 29, 0, 0.125, False),  # non-causal (all valid keys)
]


@pytest.mark.parametrize("h,g,dtype,window,t,s,offset,scale,causal", FLASH_CASES)
def test_flash_attention(h, g, dtype, window, t, s, offset, scale, causal):
    b, kh = 2, 2 if h < 512 else 1
    q, k, v = _qkv(h + g + t, b, t, s, kh * g, kh, h, dtype)
    if scale == 1.0:  # Gemma's scale: keep scores O(1) the way q_norm/k_norm do
        q = (q.astype(jnp.float32) / np.sqrt(h)).astype(dtype)
    q_pos = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_pos = k_pos.at[1, s - 5:].set(-1)  # second sequence: last 5 keys are padding
    kw = dict(scale=scale, window=window, causal=causal)
    out = flash_attention(q, k, v, q_pos, k_pos, config=SMALL_FLASH, interpret=True, **kw)
    _assert_close(out, flash_attention_reference(q, k, v, q_pos, k_pos, **kw), dtype)


def test_flash_attention_default_config_and_empty_rows():
    """Default (large) blocks on a short input; query rows that see no key come back as exact zeros."""
    b, t, s, n, kh, h = 2, 20, 20, 4, 2, 64
    q, k, v = _qkv(7, b, t, s, n, kh, h, jnp.float32)
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)).at[0, :3].set(-1)  # 3 padding queries
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    out = flash_attention(q, k, v, q_pos, k_pos, scale=0.125, window=6, interpret=True)
    ref = flash_attention_reference(q, k, v, q_pos, k_pos, scale=0.125, window=6)
    _assert_close(out, ref, jnp.float32)
    assert np.all(np.asarray(out[0, :3]) == 0.0)


# (head_dim, G, dtype, T, cache slots, window, lengths)
DECODE_CASES = [
    (512, 8, jnp.float32, 1, 64, None, (64, 23, 1)),  # full cache, different lengths per sequence
    (256, 2, jnp.bfloat16, 1, 16, 16, (50, 9, 16)),  # ring buffer: wrapped, partly empty, exactly full
    (64, 4, jnp.float32, 3, 24, 8, (40, 5, 24)),  # a few query tokens, ring of 24 with a window of 8
    (512, 1, jnp.bfloat16, 1, 100, None, (100, 57, 3)),  # slots not a multiple of the block
    (64, 1, jnp.float32, 2, 48, None, (48, 2, 30)),
]


@pytest.mark.parametrize("h,g,dtype,t,slots,window,lengths", DECODE_CASES)
def test_decode_attention(h, g, dtype, t, slots, window, lengths):
    b, kh = len(lengths), 2 if h < 512 else 1
    q, k, v = _qkv(h + g + slots, b, t, slots, kh * g, kh, h, dtype)
    lengths = np.asarray(lengths)
    k_pos = _ring_positions(lengths, slots)  # a full-length cache is a ring that never wraps
    q_pos = jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :], jnp.int32)  # the last t tokens
    scale = 1.0 / np.sqrt(h)
    out = decode_attention(q, k, v, q_pos, k_pos, scale=scale, window=window, config=SMALL_DECODE, interpret=True)
    ref = decode_attention_reference(q, k, v, q_pos, k_pos, scale=scale, window=window)
    _assert_close(out, ref, dtype)


def test_decode_attention_default_config():
    b, t, s, n, kh, h = 2, 1, 70, 8, 1, 512
    q, k, v = _qkv(3, b, t, s, n, kh, h, jnp.bfloat16)
    k_pos = _ring_positions([70, 12], s)
    q_pos = jnp.asarray([[69], [11]], jnp.int32)
    out = decode_attention(q, k, v, q_pos, k_pos, scale=0.05, interpret=True)
    _assert_close(out, decode_attention_reference(q, k, v, q_pos, k_pos, scale=0.05), jnp.bfloat16)


# (head_dim, G, dtype, T, cache slots, window, rotated fraction of the head's pairs)
PROLOGUE_CASES = [
    (256, 2, jnp.bfloat16, 1, 40, 16, 1.0),  # a sliding layer: the whole head rotates
    (512, 8, jnp.bfloat16, 1, 48, None, 0.25),  # a full layer: proportional RoPE, three quarters pass through
    (32, 4, jnp.float32, 3, 24, 8, 1.0),  # the smallest head it takes, a few query tokens
]


@pytest.mark.parametrize("h,g,dtype,t,slots,window,fraction", PROLOGUE_CASES)
def test_decode_attention_query_prologue(h, g, dtype, t, slots, window, fraction):
    """Raw queries with a `QueryPrologue`: the kernel's own norm and RoPE give the reference's attention of the
    model's queries (`Queries.value`: rms_norm with the q_norm weight, then RoPE), and in bf16 all but a rare last
    bit of the kernel fed those queries (both round the norm and each RoPE product and sum to the input dtype)."""
    from gemma4_jax.kernels.decode_attention import QueryPrologue
    from gemma4_jax.model.text import Queries, inverse_frequencies, rope_cos_sin

    lengths = np.asarray((slots + 9, 7, slots))
    b, kh = len(lengths), 1 if h == 512 else 2
    q, k, v = _qkv(h + t, b, t, slots, kh * g, kh, h, dtype)
    q = (3.0 * q.astype(jnp.float32) + 0.5).astype(dtype)  # rows far from unit RMS: the norm must act
    k_pos = _ring_positions(lengths, slots)
    q_pos = jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :], jnp.int32)
    pairs = int(fraction * h // 2)
    inv = np.concatenate([inverse_frequencies(1e4, pairs, h), np.zeros(h // 2 - pairs, np.float32)])
    cos, sin = rope_cos_sin(q_pos, inv, dtype)
    norm = (1.0 + 0.5 * jax.random.normal(jax.random.key(h), (h,))).astype(dtype)  # far from 1.0
    queries = Queries(q, norm, 1e-6, cos, sin)
    out = decode_attention(q, k, v, q_pos, k_pos, window=window, config=SMALL_DECODE, interpret=True,
                           prologue=QueryPrologue(norm, cos, sin, 1e-6))
    ref = decode_attention_reference(queries.value(), k, v, q_pos, k_pos, window=window)
    _assert_close(out, ref, dtype)
    if t == 1:  # the projection's unadded K splits (three, over more rows than sequences): the kernel adds them
        parts = jnp.stack([q.astype(jnp.float32).reshape(b, -1) * w for w in (0.25, 0.5, 0.25)])
        parts = jnp.concatenate([parts, jnp.ones_like(parts[:, :1])], axis=1)  # a row past the sequences' rows
        split = decode_attention(parts, k, v, q_pos, k_pos, window=window, config=SMALL_DECODE, interpret=True,
                                 prologue=QueryPrologue(norm, cos, sin, 1e-6))
        _assert_close(split, ref, dtype)
    if dtype == jnp.bfloat16:
        fed = decode_attention(queries.value(), k, v, q_pos, k_pos, window=window, config=SMALL_DECODE,
                               interpret=True)
        out, fed = np.asarray(out, np.float32), np.asarray(fed, np.float32)
        assert np.mean(out != fed) < 1e-3  # a norm's sum taken in two halves may move a rare last bit
        np.testing.assert_allclose(out, fed, rtol=2.0**-7, atol=0)  # and then by one bf16 step at most


@pytest.mark.parametrize("h,kh,slots,window,lengths,split", [
    (64, 2, 16, 16, (40, 5, 16), False),  # a ring buffer: the token's slot holds a key just outside the window
    (32, 1, 64, None, (30, 63), True),  # a full cache, the key and value as unadded K splits over an extra row
    (128, 1, 64, None, (1, 63, 20), False),  # the first token (an empty cache) and a cache one short of full
])
def test_decode_attention_new_key(h, kh, slots, window, lengths, split):
    """`NewKey`: the kernel attends to the step's token from its raw key and value (k = rope(rms_norm(k)·norm),
    v = rms_norm(v)) over a cache that does not hold it yet, and writes them into the token's slot in place; the
    result is the reference's over the cache with the token written as the model writes it (`Keys.value`,
    `write_token`), and so is the cache it returns."""
    from gemma4_jax.generation.cache import LayerCache, token_slot, write_token
    from gemma4_jax.kernels.decode_attention import NewKey, QueryPrologue
    from gemma4_jax.model.text import Keys, Queries, inverse_frequencies, rope_cos_sin

    dtype, n = jnp.bfloat16, 4 * kh
    lengths = np.asarray(lengths)
    b = len(lengths)
    q, k, v = _qkv(h + slots, b, 1, slots, n, kh, h, dtype)
    k_pos = _ring_positions(lengths - 1, slots)  # the cache holds the tokens before the new one
    q_pos = jnp.asarray(lengths[:, None] - 1, jnp.int32)
    inv = np.concatenate([inverse_frequencies(1e4, h // 4, h), np.zeros(h // 4, np.float32)])
    cos, sin = rope_cos_sin(q_pos, inv, dtype)
    r = jax.random.split(jax.random.key(h), 4)
    q_norm, k_norm = ((1.0 + 0.5 * jax.random.normal(x, (h,))).astype(dtype) for x in r[:2])
    k_raw, v_raw = ((3.0 * jax.random.normal(x, (b, 1, kh, h)) + 0.2).astype(dtype) for x in r[2:])
    queries, keys = Queries(q, q_norm, 1e-6, cos, sin), Keys(k_raw, v_raw, k_norm, 1e-6, cos, sin)
    written = write_token(LayerCache(k, v, k_pos), *keys.value(), q_pos)
    ref = decode_attention_reference(queries.value(), written.k, written.v, q_pos, written.pos, window=window)
    if split:  # three splits that add up to the projections exactly, over one row more than the sequences
        def parts(x):
            p = jnp.stack([x.astype(jnp.float32).reshape(b, -1) * w for w in (0.5, 0.25, 0.25)])
            return jnp.concatenate([p, jnp.ones_like(p[:, :1])], axis=1)
        k_raw, v_raw = parts(k_raw), parts(v_raw)
    out, k_out, v_out = decode_attention(q, k, v, q_pos, k_pos, window=window, config=SMALL_DECODE, interpret=True,
                                         prologue=QueryPrologue(q_norm, cos, sin, 1e-6),
                                         new_key=NewKey(k_raw, v_raw, k_norm, token_slot(q_pos, slots)))
    _assert_close(out, ref, dtype)
    # the token written into its slot in place, as the model writes it; every other slot untouched
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(written.v, np.float32))
    _assert_close(k_out, written.k, dtype)
    assert np.mean(np.asarray(k_out != written.k)) < 1e-3  # the keys' norm may move a rare last bit


def test_query_prologue_rule(monkeypatch):
    """Raw queries go to the decode kernel only (at most DECODE_MAX_TOKENS queries, head_dim ≥ 32, the setting on);
    `run_attention` refuses a prologue anywhere else."""
    from gemma4_jax.kernels.decode_attention import QueryPrologue

    ok = dict(q_len=1, head_dim=256)
    monkeypatch.setattr(dispatch, "DECODE_QUERY_PROLOGUE", False)
    assert not dispatch.query_prologue("pallas", **ok)
    monkeypatch.setattr(dispatch, "DECODE_QUERY_PROLOGUE", True)
    assert dispatch.query_prologue("pallas", **ok) and dispatch.query_prologue("interpret", **ok)
    assert not dispatch.query_prologue("xla", **ok) and not dispatch.query_prologue("cudnn", **ok)
    assert not dispatch.query_prologue("interpret", q_len=dispatch.DECODE_MAX_TOKENS + 1, head_dim=256)
    assert not dispatch.query_prologue("interpret", q_len=1, head_dim=16)
    q, k, v = _qkv(1, 1, 1, 16, 2, 1, 16, jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    prologue = QueryPrologue(jnp.ones((16,)), jnp.ones((1, 1, 16)), jnp.zeros((1, 1, 16)), 1e-6)
    with pytest.raises(ValueError, match="raw queries need the decode kernel"):
        dispatch.run_attention("interpret", q, k, v, pos, jnp.zeros((1, 16), jnp.int32), prologue=prologue)


@pytest.mark.parametrize("programs", [None, 1, 8])
def test_decode_target_programs_sets_the_splits(programs, monkeypatch):
    """`dispatch.DECODE_TARGET_PROGRAMS` (bench.py generate --decode-target-programs): the decode kernel's key splits
    aim for that many programs (1: one split, no combining step after the kernel); the output stays the
    reference's."""
    from gemma4_jax.kernels.decode_attention import default_config

    b, t, s, n, kh, h = 2, 1, 64, 4, 2, 64
    q, k, v = _qkv(5, b, t, s, n, kh, h, jnp.float32)
    k_pos = _ring_positions([64, 30], s)
    q_pos = jnp.asarray([[63], [29]], jnp.int32)
    monkeypatch.setattr(dispatch, "DECODE_TARGET_PROGRAMS", programs)

    def run(q, k, v):
        return dispatch.run_attention("interpret", q, k, v, q_pos, k_pos, scale=0.125)

    grids = [e.params["grid_mapping"].grid for e in all_eqns(jax.make_jaxpr(run)(q, k, v).jaxpr)
             if e.primitive.name == "pallas_call"]
    assert s // default_config(h, jnp.float32).block_k == 4  # key blocks: at most 4 splits
    want = {None: 4, 1: 1, 8: 2}[programs]  # splits: target / (b · kh) = 32, 1/4 and 2, rounded up, ≤ key blocks
    assert grids == [(want, b, kh)], grids
    _assert_close(run(q, k, v), decode_attention_reference(q, k, v, q_pos, k_pos, scale=0.125), jnp.float32)



@pytest.mark.parametrize("window", [None, 6])
def test_reference_matches_model_attention(window):
    """The kernels' reference computes exactly the model's attention (scale 1.0, mask from positions)."""
    b, t, s, n, kh, h = 2, 5, 12, 8, 2, 64
    q, k, v = _qkv(11, b, t, s, n, kh, h, jnp.float32)
    q = q / 8.0
    lengths = np.array([12, 7])
    k_pos = _ring_positions(lengths, s)
    q_pos = jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :], jnp.int32)
    want = model_attention(q, k, v, attention_mask(q_pos, k_pos, window, k_pos >= 0))
    got = flash_attention_reference(q, k, v, q_pos, k_pos, scale=1.0, window=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


# Mirrors dispatch.ATTENTION_RULES: (resolve's arguments, the rule that must decide, the choice). Every rule is
# reached by at least one case (test_every_attention_rule_is_reached).
_GPU = dict(platform="gpu", group=8)
DISPATCH_CASES = [
    (dict(impl="xla", head_dim=512, **_GPU), 0, "xla"),
    (dict(impl="interpret", head_dim=64, platform="cpu", group=1), 0, "interpret"),
    # the Mosaic GPU kernel at head_dim 512 on Hopper, also when the kernels are forced
    (dict(impl="auto", head_dim=512, q_len=4096, aligned=True, hopper=True, **_GPU), 1, "mosaic"),
    (dict(impl="pallas", head_dim=512, q_len=4096, aligned=True, hopper=True, **_GPU), 1, "mosaic"),
    (dict(impl="pallas", head_dim=512, q_len=1, batch=1, **_GPU), 2, "pallas"),  # forced, even for one sequence
    # prefill: cuDNN for aligned calls up to head_dim 256
    (dict(impl="auto", head_dim=256, q_len=4096, aligned=True, **_GPU), 3, "cudnn"),
    (dict(impl="auto", head_dim=256, q_len=4096, aligned=True, hopper=True, **_GPU), 3, "cudnn"),
    (dict(impl="cudnn", head_dim=256, q_len=4096, aligned=True, **_GPU), 3, "cudnn"),
    # XLA: the CPU, float32, unsupported shapes, cuDNN asked where it does not apply
    (dict(impl="auto", head_dim=512, platform="cpu", group=8), 4, "xla"),
    (dict(impl="auto", head_dim=512, q_len=4096, aligned=True, platform="cpu", group=8), 4, "xla"),
    (dict(impl="auto", head_dim=96, **_GPU), 4, "xla"),
    (dict(impl="auto", head_dim=512, dtype=jnp.float32, **_GPU), 4, "xla"),
    (dict(impl="auto", head_dim=512, q_len=4096, aligned=True, hopper=True, dtype=jnp.float32, **_GPU), 4, "xla"),
    (dict(impl="auto", head_dim=256, q_len=4096, aligned=True, dtype=jnp.float32, **_GPU), 4, "xla"),
    (dict(impl="cudnn", head_dim=512, q_len=4096, aligned=True, **_GPU), 4, "xla"),
    (dict(impl="cudnn", head_dim=256, q_len=1, batch=2, **_GPU), 4, "xla"),  # decode: cuDNN is not used
    # decode: XLA for one sequence over more than 256 keys or an unknown number (a short prompt takes the decode
    # rules too), the kernel for one sequence over at most 256 keys and from two sequences at any length
    (dict(impl="auto", head_dim=512, q_len=1, batch=1, **_GPU), 5, "xla"),
    (dict(impl="auto", head_dim=512, q_len=1, batch=1, keys=257, **_GPU), 5, "xla"),
    (dict(impl="auto", head_dim=256, q_len=4, aligned=True, **_GPU), 5, "xla"),
    (dict(impl="auto", head_dim=512, q_len=1, batch=1, keys=256, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=256, q_len=1, batch=1, keys=16, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=256, q_len=1, batch=2, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=256, q_len=1, batch=2, keys=32768, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=512, q_len=1, aligned=True, batch=4, hopper=True, **_GPU), 6, "pallas"),
    # other prefill: the Triton kernel (not aligned, or head_dim 512 off Hopper)
    (dict(impl="auto", head_dim=512, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=512, q_len=4096, aligned=True, hopper=False, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=512, q_len=4096, aligned=False, hopper=True, **_GPU), 6, "pallas"),
    (dict(impl="auto", head_dim=256, q_len=4096, aligned=False, **_GPU), 6, "pallas"),
]


@pytest.mark.parametrize("kwargs,rule,choice", DISPATCH_CASES)
def test_dispatch_rules(kwargs, rule, choice):
    kwargs = dict(kwargs)
    impl = kwargs.pop("impl")
    name, got = dispatch.attention_rule(impl, **kwargs)
    assert (name, got) == (dispatch.ATTENTION_RULES[rule][0], choice)
    assert resolve(impl, **kwargs) == choice


def test_every_attention_rule_is_reached():
    assert {rule for _, rule, _ in DISPATCH_CASES} == set(range(len(dispatch.ATTENTION_RULES)))


def test_dispatch():
    with pytest.raises(ValueError, match="CUDA GPU"):
        resolve("cudnn", head_dim=256, group=1, platform="cpu")
    with pytest.raises(ValueError):
        resolve("pallas", head_dim=96, group=1)
    with pytest.raises(ValueError):
        resolve("cudnn-typo", head_dim=64, group=1)
    # Both kernel paths through the dispatcher (prefill-length and decode-length queries).
    for t in (1, 12):
        q, k, v = _qkv(t, 1, t, 12, 4, 2, 64, jnp.float32)
        q_pos = jnp.asarray([np.arange(12 - t, 12)], jnp.int32)
        k_pos = jnp.arange(12, dtype=jnp.int32)[None]
        kw = dict(scale=0.125, window=4)
        _assert_close(attention(q, k, v, q_pos, k_pos, impl="interpret", **kw),
                      attention(q, k, v, q_pos, k_pos, impl="xla", **kw), jnp.float32)


@pytest.mark.parametrize("prologue,new_key,partials", [(False, False, True), (True, False, True), (True, True, True),
                                                       (True, True, False)])
def test_model_through_kernels_equals_xla(monkeypatch, prologue, new_key, partials):
    """Wire-up: prefill (PrefillAttender) and a decode step (DecodeAttender, ring-buffer sliding cache) of a
    small model give the same hidden states through the kernels (interpret mode) as through XLA, with the decode
    kernel's prologue off, on for the queries alone, and on for the queries and the new key (from the projections'
    K-split partials, or from their sums)."""
    from flax import nnx

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.generation.cache import DecodeAttender, PrefillAttender, init_cache
    from gemma4_jax.model.text import init_model
    from gemma4_jax.testing.tiny import tiny_text_config

    hf = tiny_text_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                          num_kv_shared_layers=0, hidden_size_per_layer_input=0)
    cfg = Gemma4Config.from_hf_dict(hf.to_dict())
    graphdef, params = nnx.split(init_model(cfg, jnp.float32, seed=0))
    ids = jax.random.randint(jax.random.key(0), (2, 12), 5, 200)
    lengths = jnp.asarray([12, 7], jnp.int32)  # the sliding ring (8 slots) wraps for the first prompt
    monkeypatch.setattr(dispatch, "DECODE_QUERY_PROLOGUE", prologue)
    monkeypatch.setattr(dispatch, "DECODE_NEW_KEY", new_key)
    monkeypatch.setattr(dispatch, "DECODE_PROLOGUE_PARTIALS", partials)

    def run(params, impl):
        model = nnx.merge(graphdef, params)
        pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
        pre = PrefillAttender(init_cache(cfg, 2, 16, jnp.float32), pos, lengths, impl)
        x = model.decode_layers(ids, pos, pre)
        dec = DecodeAttender(pre.cache, lengths[:, None], impl)
        y = model.decode_layers(ids[:, :1], lengths[:, None], dec)
        return x, y

    (x_ref, y_ref), (x, y) = (jax.jit(run, static_argnums=1)(params, impl) for impl in ("xla", "interpret"))
    valid = np.arange(12)[None, :] < np.asarray(lengths)[:, None]  # padding rows are never used
    np.testing.assert_allclose(np.asarray(x)[valid], np.asarray(x_ref)[valid], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-4)
    # the decode step hands both layers' raw queries to the kernel (lo, hi, positions, q, its norm, cos, sin, ...,
    # the cache's k, v) as the skinny kernel's unadded K splits [S, R, K, G, H]: the kernel adds them. The full
    # layer (16 slots, unpadded) also hands it the token's raw key and value splits [S, R, K, H], their norm and
    # slot: the kernel attends to the token and writes it into the cache itself (the XLA path above attends after
    # writing it). The sliding layer's ring of 8 slots is padded to the kernel's 16-key block, so it writes first.
    # Without partials, XLA adds the splits and the kernel takes the sums (q [B, T, N, H], k and v [B, 1, K, H]).
    # Off, the kernel takes (lo, hi, the query and key positions, q rows as one array, the cache's k, v), writes
    # nothing.
    eqns = all_eqns(jax.make_jaxpr(run, static_argnums=1)(params, "interpret").jaxpr)
    decode_calls = [e for e in eqns if e.primitive.name == "pallas_call"
                    and "decode_attention" in str(e.params.get("name") or e.params.get("name_and_src_info"))]
    counts = [len(e.invars) for e in decode_calls]
    if not prologue:
        assert counts == [7, 7] and [e.invars[4].aval.ndim for e in decode_calls] == [4, 4], counts
        assert not any(e.params["input_output_aliases"] for e in decode_calls)
        return
    assert counts == ([10, 14] if new_key else [10, 10]), counts
    assert [e.invars[4].aval.ndim for e in decode_calls] == [5 if partials else 4] * 2
    if not new_key:
        assert not any(e.params["input_output_aliases"] for e in decode_calls)
        return
    full = decode_calls[1]
    # the token's key and value: their K splits [S, R, K, H], or their sums [B, 1, K, H]
    assert [(v.aval.ndim, v.aval.shape[1] == 1) for v in full.invars[8:10]] == [(4, not partials)] * 2
    assert len(full.params["input_output_aliases"]) == 2  # the cache's k and v, written in place


@pytest.mark.parametrize("h,g,window", [(64, 1, None), (256, 4, 5), (128, 2, 1), (64, 8, 16)])
def test_cudnn_mapping(monkeypatch, h, g, window):
    """Our semantics map onto jax.nn.dot_product_attention's arguments: causal, window W = left window W−1,
    padding keys at the end of ragged rows ignored by the valid queries. Checked through its XLA backend
    (cuDNN itself needs a GPU: `bench.py attention --check` compares it there)."""
    from gemma4_jax.kernels import dispatch

    monkeypatch.setattr(dispatch, "CUDNN_BACKEND", "xla")
    b, t, kh = 2, 23, 2
    q, k, v = _qkv(h + g, b, t, t, kh * g, kh, h, jnp.float32)
    lengths = np.array([23, 9])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.where(pos < lengths[:, None], pos, -1)
    got = dispatch.cudnn_attention(q, k, v, scale=0.3, window=window)
    want = flash_attention_reference(q, k, v, pos, k_pos, scale=0.3, window=window)
    valid = np.arange(t)[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=0, atol=1e-5)


def test_model_prefill_routes_to_cudnn(monkeypatch):
    """Wire-up: on a (pretended) GPU, 'cudnn' prefill sends the head_dim-≤256 layers to cuDNN (run through its
    XLA backend here) with the model's positions vouched for as aligned, and the result equals the model's XLA
    path; decode never goes to cuDNN. (`auto` makes the same prefill choice: test_dispatch.)"""
    from flax import nnx

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.generation.cache import DecodeAttender, PrefillAttender, init_cache
    from gemma4_jax.kernels import dispatch
    from gemma4_jax.model.text import init_model
    from gemma4_jax.testing.tiny import tiny_text_config

    monkeypatch.setattr(dispatch, "CUDNN_BACKEND", "xla")
    monkeypatch.setattr(dispatch, "_on_gpu", lambda platform: True)
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "xla")  # the projections' kernel has no CPU path outside interpret
    calls = []
    real = dispatch.cudnn_attention
    monkeypatch.setattr(dispatch, "cudnn_attention", lambda *a, **kw: calls.append(kw["window"]) or real(*a, **kw))
    hf = tiny_text_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                          num_kv_shared_layers=0, hidden_size_per_layer_input=0, sliding_window=5)
    cfg = Gemma4Config.from_hf_dict(hf.to_dict())
    graphdef, params = nnx.split(init_model(cfg, jnp.bfloat16, seed=1))
    t = 12  # longer than DECODE_MAX_TOKENS, so a prefill call
    ids = jax.random.randint(jax.random.key(2), (2, t), 5, 200)
    lengths = jnp.asarray([t, 10], jnp.int32)

    @functools.partial(jax.jit, static_argnums=1)  # traced once per path: the calls are counted while tracing
    def run(params, impl):
        model = nnx.merge(graphdef, params)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
        pre = PrefillAttender(init_cache(cfg, 2, 16, jnp.bfloat16), pos, lengths, impl)
        x = model.decode_layers(ids, pos, pre)
        y = model.decode_layers(ids[:, :1], lengths[:, None], DecodeAttender(pre.cache, lengths[:, None], impl))
        return x, y

    x_ref, y_ref = run(params, "xla")
    assert calls == []
    x, y = run(params, "cudnn")
    assert calls == [5, None], calls  # both layers' prefill (the sliding one with its window), no decode call
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    for got, want in ((np.asarray(x, np.float32)[valid], np.asarray(x_ref, np.float32)[valid]),
                      (np.asarray(y, np.float32), np.asarray(y_ref, np.float32))):
        assert np.isfinite(got).all()
        assert np.max(np.abs(got - want)) <= 2e-2 * max(1.0, float(np.max(np.abs(want))))


def test_mosaic_falls_back_when_it_does_not_compile(monkeypatch):
    """Where this jax cannot build the Mosaic kernel (its API moves between releases), `auto` on a Hopper GPU
    takes the Triton kernel and says so once, instead of failing the model."""
    from gemma4_jax.kernels import dispatch, flash_attention_mgpu

    monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
    dispatch.mosaic_compiles.cache_clear()

    class Broken:
        @staticmethod
        def lower(*args):
            raise NotImplementedError("no such Mosaic GPU primitive in this jax")

    monkeypatch.setattr(flash_attention_mgpu, "flash_attention_mgpu", Broken)
    try:
        with pytest.warns(UserWarning, match="does not compile with this jax"):
            assert resolve("auto", head_dim=512, group=8, platform="gpu", q_len=4096, aligned=True) == "pallas"
        assert resolve("pallas", head_dim=512, group=8, platform="gpu", q_len=4096, aligned=True) == "pallas"
    finally:
        dispatch.mosaic_compiles.cache_clear()


def test_grid_barrier_probe_rounds_read_what_the_last_round_wrote():
    """The grid-barrier probe (interpret mode: the rounds as the grid's outer axis) and its chain of one kernel a
    round both give the reference exactly: each round reads the next program's row of the round before and adds 1
    (integer values, so float32 sums are exact; a wrong row, round or order changes them)."""
    from gemma4_jax.kernels import grid_barrier as gb

    programs, rounds = 5, 4
    x = jnp.asarray(np.random.default_rng(3).integers(-64, 64, (programs, gb.BLOCK)), jnp.float32)
    buf = jnp.zeros((rounds + 1, programs, gb.BLOCK), jnp.float32).at[0].set(x)
    zero = jnp.zeros((1,), jnp.int32)
    out, counter, ok = gb.probe_barrier(buf, zero, zero, rounds=rounds, interpret=True)
    want = gb.probe_reference(x, rounds)
    assert np.array_equal(np.asarray(out[rounds]), np.asarray(want)) and np.all(np.asarray(ok) == 1)
    assert int(counter[0]) == (rounds - 1) * programs  # what the GPU kernel's arrivals add, for a caller's next base
    y = x
    for _ in range(rounds):
        y = gb.probe_chain_round(y, interpret=True)
    assert np.array_equal(np.asarray(y), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(x + rounds))  # the rows moved: the check can tell


def test_kernel_products_take_float32_at_full_precision(monkeypatch):
    """Every product inside the Triton kernels (the online-softmax loop of the prefill and decode attention
    kernels, the skinny projections, the experts) asks for IEEE precision on float32 operands itself, outside any
    `jax.default_matmul_precision` scope (with none, Triton rounds them to TF32 on a GPU), and for nothing on 16-bit
    ones. Interpret mode on the CPU computes either way: this checks what each product asks for."""
    from jax.experimental.pallas import triton as plgpu

    from gemma4_jax.kernels.gemv import gemv
    from gemma4_jax.kernels.moe import moe_experts

    seen, real = [], plgpu.dot

    def spy(a, b, *args, **kw):
        seen.append((jnp.dtype(a.dtype).name, kw.get("precision")))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(plgpu, "dot", spy)
    jax.clear_caches()  # every kernel below is traced again, through the spy
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        seen.clear()
        q, k, v = _qkv(1, 1, 16, 16, 2, 1, 32, dtype)
        pos = jnp.arange(16, dtype=jnp.int32)[None]
        flash_attention(q, k, v, pos, pos, config=SMALL_FLASH, interpret=True)
        decode_attention(q[:, :1], k, v, pos[:, -1:], pos, config=SMALL_DECODE, interpret=True)
        gemv(jnp.asarray(rng.normal(size=(2, 64)), dtype), jnp.asarray(rng.normal(size=(64, 32)), dtype),
             interpret=True)
        experts = [jnp.asarray(rng.normal(size=shape), dtype) for shape in ((4, 32, 32), (4, 32, 32), (4, 32, 32))]
        moe_experts(jnp.asarray(rng.normal(size=(3, 32)), dtype), jnp.full((3, 2), 0.5, jnp.float32),
                    jnp.asarray([[0, 1], [2, 3], [1, 2]], jnp.int32), *experts, interpret=True)
        want = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        assert len(seen) >= 5 and set(seen) == {(jnp.dtype(dtype).name, want)}, (dtype, set(seen))
