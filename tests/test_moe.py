"""The MoE expert kernels (`gemma4_jax.kernels.moe`) in Pallas interpret mode against their jnp reference, the
block plans, the GPU lowering at 26B-A4B's real shapes, the dispatcher, and the model (pp = 1 and pp = 2) with
the kernels in place of XLA against transformers.

Interpret mode fills every output buffer with NaN before a kernel runs (tests/test_kernels.py checks that), so
a block the kernels never write and the combine reads shows up as NaN; every comparison asserts finiteness.
"""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import FAMILIES, hf_logits, rel_err

import gemma4_jax
from gemma4_jax.kernels import MoeConfig, dispatch, moe_experts, moe_experts_reference, moe_mgpu, resolve_moe
from gemma4_jax.kernels.moe import default_config, plan_rows, plan_sorted
from gemma4_jax.kernels.moe_mgpu import (
    MgpuMoeConfig,
    moe_experts_mgpu,
    plan_tiles,
    plan_tiles_kernel,
    token_table,
    token_tiles_apply,
)
from gemma4_jax.testing.lowering import lowered_for_the_gpu

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
# Small blocks: several column tiles, depth steps and row blocks even at these sizes.
SORTED16 = MoeConfig(plan="sorted", block_m=16, block_n_up=16, block_k_up=16, block_n_down=32, block_k_down=16,
                     num_warps=4, num_stages=1)
ROWS16 = MoeConfig(plan="rows", block_m=16, block_n_up=32, block_k_up=32, block_n_down=16, block_k_down=32,
                   num_warps=4, num_stages=1)


def _inputs(seed, m, k, e, d, f, dtype, idx=None):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (m, d), jnp.float32).astype(dtype)
    gate = (d**-0.5 * jax.random.normal(ks[1], (e, f, d), jnp.float32)).astype(dtype)
    up = (d**-0.5 * jax.random.normal(ks[2], (e, f, d), jnp.float32)).astype(dtype)
    down = (f**-0.5 * jax.random.normal(ks[3], (e, d, f), jnp.float32)).astype(dtype)
    if idx is None:  # k distinct experts per token, as top-k gives
        idx = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(ks[4], m))
    w = jax.random.uniform(ks[5], (m, k), jnp.float32, 0.1, 1.0)
    return x, w, jnp.asarray(idx, jnp.int32), gate, up, down


def _check(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "the combine read an unwritten (NaN-poisoned) or non-finite row"
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err <= TOL[dtype], f"max|Δ|/max|ref| = {err:.3g} > {TOL[dtype]}"


def _seed(name: str) -> int:
    """A case's input seed: fixed across runs (Python's `hash` of a string is salted per process)."""
    return zlib.crc32(name.encode()) % 1000


def _assert_a_wrong_expert_differs(out, ref, x, w, idx, gate, up, down, num_experts):
    """The comparison can tell a wrong expert: the same inputs with the heaviest routed slot's expert changed
    differ from `out` by more than the bf16 tolerance."""
    m, j = np.unravel_index(int(np.argmax(np.asarray(w))), w.shape)
    wrong = moe_experts_reference(x, w, idx.at[m, j].set((idx[m, j] + 1) % num_experts), gate, up, down)
    assert np.max(np.abs(np.asarray(out, np.float32) - np.asarray(wrong, np.float32))) > TOL[jnp.bfloat16] * np.max(
        np.abs(np.asarray(ref, np.float32))), "the comparison cannot tell a wrong expert"


def _one_expert_everywhere(m, k, e):
    """Every token sends slot 0 to expert 3; the other slots take distinct other experts."""
    rest = [x for x in range(e) if x != 3]
    return np.array([[3] + [rest[(i + j) % len(rest)] for j in range(k - 1)] for i in range(m)])


# (case, M, k, E, D, F, dtype, idx builder or None, config)
CASES = [
    ("batch1_top8_rows", 1, 8, 16, 64, 32, jnp.float32, None, ROWS16),
    ("batch1_top8_sorted", 1, 8, 16, 64, 32, jnp.bfloat16, None, SORTED16),
    ("few_rows_unused_experts", 3, 2, 16, 64, 32, jnp.float32, None, SORTED16),  # 10 of 16 experts get nothing
    ("one_expert_gets_every_row", 40, 2, 8, 64, 32, jnp.float32, _one_expert_everywhere, SORTED16),  # 3 blocks
    ("rows_not_block_multiple", 37, 2, 8, 32, 48, jnp.bfloat16, None, SORTED16),
    ("batch64_top8", 64, 8, 16, 64, 32, jnp.bfloat16, None, SORTED16),
    ("batch64_rows_plan", 64, 2, 8, 64, 32, jnp.float32, None, ROWS16),
    ("default_config", 9, 8, 16, 128, 64, jnp.bfloat16, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_moe_kernels_match_reference(case):
    _, m, k, e, d, f, dtype, build, cfg = case
    idx = build(m, k, e) if build else None
    x, w, idx, gate, up, down = _inputs(_seed(case[0]), m, k, e, d, f, dtype, idx)
    out = moe_experts(x, w, idx, gate, up, down, config=cfg, interpret=True)
    ref = moe_experts_reference(x, w, idx, gate, up, down, precision=jax.lax.Precision.HIGHEST)
    assert out.dtype == x.dtype
    _check(out, ref, dtype)


def test_moe_kernels_detect_a_wrong_expert():
    """The comparison above is sensitive: the same inputs with one routed expert changed disagree."""
    x, w, idx, gate, up, down = _inputs(7, 5, 2, 8, 64, 32, jnp.float32)
    out = moe_experts(x, w, idx, gate, up, down, config=SORTED16, interpret=True)
    wrong = moe_experts_reference(x, w, idx.at[2, 1].set((idx[2, 1] + 1) % 8), gate, up, down)
    assert np.max(np.abs(np.asarray(out) - np.asarray(wrong))) > 1e-2


@pytest.mark.parametrize("m,k,e,bm", [(1, 8, 128, 16), (37, 2, 8, 16), (64, 8, 16, 64), (40, 2, 8, 16)])
def test_block_plans(m, k, e, bm):
    """Each routed row sits exactly once in a block of its own expert, at the position `pos` says; unused blocks
    hold no rows; the sorted plan's blocks run in expert order (one expert's blocks adjacent)."""
    rng = np.random.default_rng(m)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(m)]).astype(np.int32)
    if m == 40:
        idx = _one_expert_everywhere(m, k, e).astype(np.int32)
    flat = idx.reshape(-1)
    for kind, plan in (("rows", plan_rows(jnp.asarray(idx), bm)), ("sorted", plan_sorted(jnp.asarray(idx), e, bm))):
        expert, rows, pos = (np.asarray(a) for a in (plan.expert, plan.rows, plan.pos))
        valid = rows >= 0
        assert sorted(rows[valid].tolist()) == list(range(m * k))
        assert (np.asarray(rows).reshape(-1)[pos] == np.arange(m * k)).all()
        b, _ = np.nonzero(valid)
        assert (expert[b] == flat[rows[valid]]).all()
        assert not valid[expert < 0].any()
        if kind == "sorted":
            used = expert[expert >= 0]
            assert (np.diff(used) >= 0).all() and (expert[len(used):] < 0).all()
        else:
            assert valid[:, 0].all() and not valid[:, 1:].any()


def test_sorted_plan_blocks_are_dense():
    """The sorted plan pads only each expert's last block: used blocks = Σ_e ceil(n_e / bm)."""
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(16)[:8] for _ in range(64)]).astype(np.int32)
    plan = plan_sorted(jnp.asarray(idx), 16, 16)
    n = np.bincount(idx.reshape(-1), minlength=16)
    assert int((np.asarray(plan.expert) >= 0).sum()) == int(np.sum(-(-n // 16)))
    used = np.asarray(plan.expert)[np.asarray(plan.expert) >= 0]
    assert (np.diff(used) >= 0).all()


def _lower_at_real_shapes(fn, tokens: int, **static) -> str:
    """`fn` lowered for CUDA on this CPU at 26B-A4B's expert shapes (D 2816, F 704, 128 experts, top 8), checking
    that the program passes the expert weights to the kernels untouched: no transpose, gather or copy of a
    weight-shaped array."""
    d, f, e, k = 2816, 704, 128, 8
    bf = jnp.bfloat16
    s = jax.ShapeDtypeStruct
    args = (s((tokens, d), bf), s((tokens, k), jnp.float32), s((tokens, k), jnp.int32), s((e, f, d), bf),
            s((e, f, d), bf), s((e, d, f), bf))
    text = lowered_for_the_gpu(fn, *args, **static)
    weight_types = ("tensor<128x2816x704xbf16>", "tensor<128x704x2816xbf16>")
    for line in text.splitlines():
        if any(t in line for t in weight_types):
            assert "custom_call" in line or "func.func" in line or "return" in line, line
    return text


@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_moe_kernels_lower_for_the_gpu_at_real_shapes(tokens):
    """The Triton kernels lower at the real shapes, weights untouched (`_lower_at_real_shapes`)."""
    text = _lower_at_real_shapes(moe_experts, tokens)
    assert text.count("stablehlo.custom_call") == 2, "one gate_up and one down kernel"


def test_default_config_by_rows():
    assert default_config(8, 2816, 704).plan == "rows"
    assert default_config(128, 2816, 704).plan == "sorted" and default_config(128, 2816, 704).block_m == 16
    big = default_config(16384, 2816, 704)
    assert big.plan == "sorted" and big.block_m >= 64
    for cfg in (default_config(r, 2816, 704) for r in (8, 128, 16384)):
        assert 704 % cfg.block_n_up == 0 and 2816 % cfg.block_k_up == 0
        assert 2816 % cfg.block_n_down == 0 and 704 % cfg.block_k_down == 0


def test_resolve_moe():
    r = resolve_moe
    assert r("auto", d=2816, f=704, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("cudnn", d=2816, f=704, dtype=jnp.bfloat16, platform="gpu") == "pallas"
    assert r("auto", d=2816, f=704, dtype=jnp.float32, platform="gpu") == "xla"  # float32: XLA at HIGHEST
    assert r("auto", d=2816, f=704, dtype=jnp.bfloat16, platform="cpu") == "xla"
    assert r("xla", d=2816, f=704, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert r("pallas", d=2816, f=704, dtype=jnp.float32, platform="gpu") == "pallas"
    assert r("interpret", d=64, f=32, dtype=jnp.float32, platform="cpu") == "interpret"
    assert r("auto", d=2816, f=700, dtype=jnp.bfloat16, platform="gpu") == "xla"  # F has no 16-aligned block
    with pytest.raises(ValueError, match="MoE kernels"):
        r("pallas", d=2816, f=700, dtype=jnp.bfloat16, platform="gpu")
    with pytest.raises(ValueError, match="impl"):
        r("fast", d=64, f=32)


@pytest.fixture
def moe_kernels_in_model(monkeypatch):
    """The model's MoE layers take the kernels (interpret mode) while attention stays on XLA."""
    monkeypatch.setattr(dispatch, "MOE_FORCE", "interpret")


@pytest.mark.parametrize("shape", [(2, 24), (1, 4)], ids=["sorted_plan", "rows_plan"])
def test_model_with_moe_kernels_matches_transformers(shape, hf_models, hf_dirs, moe_kernels_in_model):
    """26B-A4B family, float32: the kernels in the model give transformers' logits (2×24 tokens = 96 routed rows
    take the sorted plan; 1×4 = 8 rows the rows plan)."""
    ids = np.random.default_rng(5).integers(3, 256, size=shape)
    assert (ids.size * FAMILIES["26b-a4b"]["top_k_experts"] > 16) == (shape[0] == 2)
    model = gemma4_jax.load(hf_dirs["26b-a4b", "causal"], dtype="float32", attn_impl="xla", progress=False)
    assert rel_err(model.logits(ids), hf_logits(hf_models["26b-a4b"], ids)) <= 1e-4


@pytest.mark.devices(2)
def test_generation_and_pipeline_with_moe_kernels(hf_dirs, moe_kernels_in_model):
    """Prefill + decode (rows plan at decode) and a pp = 2 split with the kernels give the XLA path's greedy
    tokens (float32: bfloat16 pipelines drift from pp = 1 on random weights, docs/pipeline.md)."""
    prompts = [[2, 17, 99, 40, 7, 12], [2, 5, 6]]
    path = hf_dirs["26b-a4b", "causal"]
    with_kernels = gemma4_jax.load(path, dtype="float32", attn_impl="xla", progress=False)
    ours = with_kernels.generate(prompts, max_new_tokens=5, stop_tokens=())
    piped = gemma4_jax.load(path, dtype="float32", attn_impl="xla", pp=2, progress=False)
    ours_pp = piped.generate(prompts, max_new_tokens=5, stop_tokens=())
    dispatch.MOE_FORCE = "xla"
    jax.clear_caches()  # the knob is read when a step is traced: no compiled program may carry over
    plain = gemma4_jax.load(path, dtype="float32", attn_impl="xla", progress=False)
    xla = plain.generate(prompts, max_new_tokens=5, stop_tokens=())
    assert ours == xla and ours_pp == xla, (ours, ours_pp, xla)


# ---------------------------------------------------------------------------------------------
# The Mosaic GPU grouped GEMM (`moe_mgpu`), in JAX's GPU interpret mode (unwritten outputs are NaN there too)

MGPU_SMALL = MgpuMoeConfig(block_n_up=64, block_n_down=64, block_k=64, stages=2)
MGPU_PADDED128 = MgpuMoeConfig(block_m=128, block_n_up=64, block_n_down=32, stages=3, padded=True)
# (case, M, k, E, D, F, idx builder or None, config): 16-bit only, D and F multiples of 64, 64-row tiles
MGPU_CASES = [
    ("batch1_top8", 1, 8, 16, 64, 64, None, None),
    ("few_rows_unused_experts", 3, 2, 16, 128, 64, None, MGPU_SMALL),  # 10 of 16 experts get nothing
    ("one_expert_gets_every_row", 80, 2, 8, 64, 128, _one_expert_everywhere, None),  # its run spans 2 tiles
    ("rows_not_block_multiple", 37, 2, 8, 128, 192, None, MGPU_SMALL),  # 74 rows: a partial last block
    ("batch64_top8", 64, 8, 16, 64, 128, None, None),  # 512 rows, experts straddling block boundaries
    ("batch64_top8_padded_bm128", 64, 8, 16, 64, 128, None, MGPU_PADDED128),  # each expert from its own block
    ("one_expert_padded", 80, 2, 8, 128, 64, _one_expert_everywhere, dataclasses.replace(MGPU_SMALL, padded=True)),
]


@pytest.mark.parametrize("case", MGPU_CASES, ids=[c[0] for c in MGPU_CASES])
def test_mosaic_moe_kernels_match_reference(case):
    _, m, k, e, d, f, build, cfg = case
    idx = build(m, k, e) if build else None
    x, w, idx, gate, up, down = _inputs(_seed(case[0]), m, k, e, d, f, jnp.bfloat16, idx)
    out = moe_experts_mgpu(x, w, idx, gate, up, down, config=cfg, interpret=True)
    ref = moe_experts_reference(x, w, idx, gate, up, down, precision=jax.lax.Precision.HIGHEST)
    assert out.dtype == x.dtype
    _check(out, ref, jnp.bfloat16)
    _assert_a_wrong_expert_differs(out, ref, x, w, idx, gate, up, down, e)


@pytest.mark.parametrize("m,k,e", [(1, 8, 128), (37, 2, 8), (64, 8, 16), (80, 2, 8), (3, 2, 16)])
def test_tile_plan(m, k, e):
    """Every sorted row is owned by exactly one used tile, of its own expert; tiles stay within their block;
    `order` sorts the routed rows by expert and `pos` inverts it; the static tile bound holds."""
    bm = 64
    rng = np.random.default_rng(m)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(m)]).astype(np.int32)
    if m == 80:
        idx = _one_expert_everywhere(m, k, e).astype(np.int32)
    plan = plan_tiles(jnp.asarray(idx), e, bm)
    table, order, pos = (np.asarray(a) for a in (plan.table, plan.order, plan.pos))
    flat = idx.reshape(-1)
    assert (np.diff(flat[order]) >= 0).all() and (order[pos] == np.arange(m * k)).all()
    owner = np.full(m * k, -1)
    for expert, block, lo, hi in table.T[table[0] >= 0]:
        assert 0 <= lo < hi <= bm
        rows = block * bm + np.arange(lo, hi)
        assert (owner[rows] == -1).all(), "a row owned twice"
        owner[rows] = expert
    assert (owner == flat[order]).all()
    n = np.bincount(flat, minlength=e)
    start = np.cumsum(n) - n
    tiles = sum((s + c - 1) // bm - s // bm + 1 for s, c in zip(start, n, strict=True) if c)
    assert int((table[0] >= 0).sum()) == tiles <= table.shape[1]


# (M, k, E, block_m, every row to one expert?): the decode step of 26B-A4B at batch 16 first
PLAN_KERNEL_CASES = [(16, 8, 128, 64, False), (2, 8, 128, 64, False), (16, 8, 128, 128, False),
                     (8, 2, 16, 64, True), (16, 2, 16, 64, False), (4, 4, 256, 64, False)]


@pytest.mark.parametrize("m,k,e,bm,one", PLAN_KERNEL_CASES)
def test_plan_kernel_equals_the_tile_plan(m, k, e, bm, one):
    """The one-launch plan (Triton, interpreted) gives `plan_tiles`' table, order and pos exactly — experts with
    no rows, one expert with every row, experts straddling blocks — and marks the tiles past them unused."""
    rng = np.random.default_rng(m * 1000 + e + bm)
    idx = _one_expert_everywhere(m, k, e) if one else np.stack([rng.permutation(e)[:k] for _ in range(m)])
    idx = jnp.asarray(idx, jnp.int32)
    want = plan_tiles(idx, e, bm)
    got = plan_tiles_kernel(idx, e, bm, interpret=True)
    t = want.table.shape[1]
    np.testing.assert_array_equal(np.asarray(got.table)[:, :t], np.asarray(want.table))
    assert (np.asarray(got.table)[0, t:] == -1).all() and got.table.shape[1] >= t
    np.testing.assert_array_equal(np.asarray(got.order), np.asarray(want.order))
    np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(want.pos))


def test_mosaic_moe_with_the_plan_kernel_matches_reference():
    """The experts with the one-launch plan (both interpreted): 4 tokens × top 8 of 16 experts."""
    x, w, idx, gate, up, down = _inputs(5, 4, 8, 16, 64, 64, jnp.bfloat16)
    out = moe_experts_mgpu(x, w, idx, gate, up, down, interpret=True, plan_kernel=True)
    ref = moe_experts_reference(x, w, idx, gate, up, down, precision=jax.lax.Precision.HIGHEST)
    _check(out, ref, jnp.bfloat16)


def test_plan_kernel_lowers_for_the_gpu():
    """26B-A4B's batch-16 plan (128 routed rows, 128 experts) lowers to one Triton call on this CPU."""
    text = lowered_for_the_gpu(plan_tiles_kernel, jax.ShapeDtypeStruct((16, 8), jnp.int32), 128, 64)
    assert text.count("stablehlo.custom_call") == 1


@pytest.mark.parametrize("tokens", [16, 2048])
def test_mosaic_moe_lowers_for_the_gpu_at_real_shapes(tokens):
    """The Mosaic GPU kernels lower through Pallas at the real shapes on this CPU (wgmma shapes, swizzles and TMA
    boxes are checked there), weights untouched (`_lower_at_real_shapes`)."""
    assert _lower_at_real_shapes(moe_experts_mgpu, tokens).count("mosaic_gpu") >= 2


# Token tiles (a decode step's experts without a plan): (case, M, k, E, D, F, idx builder or None, config)
TOKEN_TILE_CASES = [
    ("batch1_top8", 1, 8, 16, 64, 64, None, None),
    ("batch16_top8_of_128", 16, 8, 128, 64, 64, None, None),  # 26B-A4B's decode routing: most experts unused
    ("one_expert_gets_every_token", 13, 2, 8, 128, 64, _one_expert_everywhere, MGPU_SMALL),  # 13 rows: not 8k
    ("batch64_top8", 64, 8, 16, 64, 128, None, None),  # every expert, every one of the 64 rows of its tile
    # gate_up 128 deep a step in a ring of 2, down 64 deep in a ring of 3
    ("gate_up_steps_of_128", 8, 4, 16, 256, 64, None, MgpuMoeConfig(block_k_up=128, stages_up=2, stages=3)),
]


@pytest.mark.parametrize("case", TOKEN_TILE_CASES, ids=[c[0] for c in TOKEN_TILE_CASES])
def test_mosaic_token_tiles_match_reference(case):
    """Token tiles (interpreted; unwritten rows NaN): each chosen expert's tile over every token, no plan."""
    _, m, k, e, d, f, build, cfg = case
    idx = build(m, k, e) if build else None
    x, w, idx, gate, up, down = _inputs(_seed(case[0]) + 7, m, k, e, d, f, jnp.bfloat16, idx)
    out = moe_experts_mgpu(x, w, idx, gate, up, down, config=cfg, interpret=True, token_tiles=True)
    ref = moe_experts_reference(x, w, idx, gate, up, down, precision=jax.lax.Precision.HIGHEST)
    assert out.dtype == x.dtype
    _check(out, ref, jnp.bfloat16)
    _assert_a_wrong_expert_differs(out, ref, x, w, idx, gate, up, down, e)


def test_token_tiles_only_where_the_tokens_fit_one_tile():
    """Token tiles need unpadded tiles of at least M rows; elsewhere `token_tiles=True` keeps the plan."""
    assert token_tiles_apply(64, MgpuMoeConfig()) and not token_tiles_apply(65, MgpuMoeConfig())
    assert token_tiles_apply(128, MgpuMoeConfig(block_m=128)) and not token_tiles_apply(1, MGPU_PADDED128)
    table = np.asarray(token_table(jnp.asarray([[3, 1], [1, 6]], jnp.int32), 8))
    np.testing.assert_array_equal(table, [[-1, 1, -1, 3, -1, -1, 6, -1], list(range(8)), [0] * 8, [2] * 8])


def test_mosaic_token_tiles_lower_without_a_plan():
    """At 26B-A4B's decode shapes (16 tokens) token tiles lower to the two Mosaic kernels, weights untouched, and
    without the plan's sort or the gather of x into sorted order, which the default path has."""
    tiles = _lower_at_real_shapes(moe_experts_mgpu, 16, token_tiles=True)
    plan = _lower_at_real_shapes(moe_experts_mgpu, 16)
    assert tiles.count("mosaic_gpu") >= 2 and "stablehlo.sort" not in tiles and "stablehlo.sort" in plan
    deep = _lower_at_real_shapes(moe_experts_mgpu, 16, token_tiles=True,
                                 config=MgpuMoeConfig(block_k_up=256, stages_up=2))  # 512-byte weight-row steps
    assert deep.count("mosaic_gpu") >= 2


def test_mosaic_moe_refuses_float32_and_misfit_configs(monkeypatch):
    """float32 never reaches wgmma (whose float32 is TF32): the kernel and a forced dispatch both refuse it."""
    x, w, idx, gate, up, down = _inputs(1, 4, 2, 8, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="16-bit"):
        moe_experts_mgpu(x, w, idx, gate, up, down)
    monkeypatch.setattr(dispatch, "MOE_FORCE", "mosaic")
    with pytest.raises(ValueError, match="16-bit"):
        resolve_moe("auto", d=64, f=64, dtype=jnp.float32)
    with pytest.raises(ValueError, match="divide"):
        xb, wb, ib, gb, ub, db = _inputs(1, 4, 2, 8, 64, 64 * 3, jnp.bfloat16)
        moe_experts_mgpu(xb, wb, ib, gb, ub, db, config=MgpuMoeConfig(block_n_up=128))
    with pytest.raises(ValueError, match="block_m"):
        MgpuMoeConfig(block_m=32)


def test_resolve_moe_mosaic_by_rows(monkeypatch):
    """On a (pretended) Hopper GPU, `auto` takes the Mosaic kernels from MOSAIC_MOE_MIN_ROWS routed rows up and
    the Triton kernels below; never for float32 or on the CPU."""
    monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
    monkeypatch.setattr(dispatch, "mosaic_moe_compiles", lambda *args: True)  # the real check compiles for a GPU
    monkeypatch.setattr(dispatch, "MOSAIC_MOE_MIN_ROWS", 256)
    r = functools.partial(resolve_moe, "auto", d=2816, f=704)
    assert r(rows=255, platform="gpu") == "pallas" and r(rows=256, platform="gpu") == "mosaic"
    assert r(rows=4096, dtype=jnp.float32, platform="gpu") == "xla" and r(rows=4096, platform="cpu") == "xla"
    monkeypatch.setattr(dispatch, "mosaic_moe_compiles", lambda *args: False)  # this jax cannot build them
    assert r(rows=4096, platform="gpu") == "pallas"
    monkeypatch.setattr(dispatch, "is_hopper", lambda: False)
    assert r(rows=4096, platform="gpu") == "pallas"


def test_model_with_mosaic_moe_kernels_matches_xla_experts(monkeypatch):
    """A 26B-A4B-family model in bf16 (random weights, norms and scalars perturbed; expert width 64, which the
    kernels need; one sliding and one full layer, since every interpreted kernel is traced once a layer) with the
    Mosaic kernels (interpreted) in every MoE layer: its logits agree with the same model on XLA's experts to bf16
    accuracy, through prefill at pp = 1 (48 routed rows a layer)."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.testing.synthetic import random_model

    cfg = Gemma4Config.from_hf_dict(dict(FAMILIES["26b-a4b"], moe_intermediate_size=64, num_hidden_layers=2,
                                         layer_types=["sliding_attention", "full_attention"]), name="moe-f64")
    model = random_model(cfg, jnp.bfloat16)
    ids = np.random.default_rng(9).integers(3, 256, size=(2, 12))
    monkeypatch.setattr(dispatch, "MOSAIC_INTERPRET", True)
    got = {}
    for force in ("xla", "mosaic"):
        monkeypatch.setattr(dispatch, "MOE_FORCE", force)
        jax.clear_caches()
        got[force] = np.asarray(Gemma4Model(model, RunConfig(dtype="bfloat16", attn_impl="xla")).logits(ids),
                                np.float32)
    assert np.isfinite(got["mosaic"]).all()
    assert rel_err(got["mosaic"], got["xla"]) <= 3e-2
    # 4 × 4 tokens, 32 routed rows a layer: the plan from its one-launch kernel (interpreted too)
    ids = ids[:, :4].repeat(2, axis=0)[:4]
    monkeypatch.setattr(dispatch, "MOE_PLAN_KERNEL", True)
    monkeypatch.setattr(dispatch, "MOE_TOKEN_TILES_MAX_TOKENS", 0)
    for force in ("xla", "mosaic"):
        monkeypatch.setattr(dispatch, "MOE_FORCE", force)
        jax.clear_caches()
        got[force] = np.asarray(Gemma4Model(model, RunConfig(dtype="bfloat16", attn_impl="xla")).logits(ids),
                                np.float32)
    assert np.isfinite(got["mosaic"]).all() and rel_err(got["mosaic"], got["xla"]) <= 3e-2
    # the same 16 tokens a layer by token tiles (no plan; the default at ≤ 16 tokens)
    monkeypatch.setattr(dispatch, "MOE_PLAN_KERNEL", False)
    monkeypatch.setattr(dispatch, "MOE_TOKEN_TILES_MAX_TOKENS", 16)
    monkeypatch.setattr(dispatch, "MOE_FORCE", "mosaic")
    traced = []
    monkeypatch.setattr(moe_mgpu, "token_tile_experts",
                        lambda *a, _f=moe_mgpu.token_tile_experts, **kw: traced.append(1) or _f(*a, **kw))
    jax.clear_caches()
    tiles = np.asarray(Gemma4Model(model, RunConfig(dtype="bfloat16", attn_impl="xla")).logits(ids), np.float32)
    assert traced, "the model's 16-token MoE layers did not take token tiles"
    assert np.isfinite(tiles).all() and rel_err(tiles, got["xla"]) <= 3e-2


def test_mosaic_moe_build_check_falls_back_with_a_warning():
    """Where the Mosaic MoE kernels cannot be built (here: no GPU to compile for; elsewhere a jax whose Mosaic GPU
    API moved), the check says so once and `auto` keeps the Triton kernels."""
    dispatch.mosaic_moe_compiles.cache_clear()
    try:
        with pytest.warns(UserWarning, match="MoE kernels does not compile with this jax"):
            assert dispatch.mosaic_moe_compiles(64, 64, "bfloat16") is False
    finally:
        dispatch.mosaic_moe_compiles.cache_clear()


def test_dense_mlp_after_the_router_changes_no_value(monkeypatch):
    """`dispatch.DENSE_AFTER_ROUTER`: each MoE layer's dense MLP reads its input through `model.after`, which ties
    it to the router's weights (a NaN there reaches it: the edge is real) and leaves its values alone: a
    26B-A4B-family model (random weights, norms and scalars perturbed) gives the same float32 logits with it."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.model import text
    from gemma4_jax.testing.synthetic import random_model

    x = jnp.asarray([[1.5, -0.0, 2.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(text.after(x, jnp.asarray([0.25, 3.0]))), np.asarray(x))
    assert np.isnan(np.asarray(text.after(x, jnp.asarray([np.nan])))).all()

    cfg = Gemma4Config.from_hf_dict(FAMILIES["26b-a4b"], name="moe-after")
    model = random_model(cfg, jnp.float32)
    ids = np.random.default_rng(4).integers(3, 256, size=(2, 6))
    got, original = {}, text.after
    for on in (False, True):
        monkeypatch.setattr(dispatch, "DENSE_AFTER_ROUTER", on)
        calls = []
        monkeypatch.setattr(text, "after", lambda *a, _c=calls: _c.append(1) or original(*a))
        jax.clear_caches()
        got[on] = np.asarray(Gemma4Model(model, RunConfig(dtype="float32", attn_impl="xla")).logits(ids))
        moe_layers = sum(s.moe for s in cfg.layers)
        assert len(calls) == (moe_layers if on else 0), (on, len(calls), moe_layers)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got[True], got[False])
    else:  # XLA:GPU fuses around the tie otherwise: float32 roundings move (4e-7 of a logit on an H100), no more
        np.testing.assert_allclose(got[True], got[False], rtol=0, atol=1e-5 * np.abs(got[False]).max())


def test_router_own_norm_changes_no_value_and_has_its_own_reduction(monkeypatch):
    """`dispatch.ROUTER_OWN_NORM`: XLA merges the router's mean of squares with the other norms' of the same stream
    (one reduce where three were written); behind the barrier the router keeps a reduction of its own (one more in
    the optimised program), and every value stays the same: the routing weights and experts exactly, and a
    26B-A4B-family model's float32 logits bit for bit."""
    from flax import nnx

    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.model import text
    from gemma4_jax.testing.synthetic import random_model

    cfg = Gemma4Config.from_hf_dict(FAMILIES["26b-a4b"], name="moe-own-norm")
    graphdef, state = nnx.split(text.MoE(cfg, jnp.float32, nnx.Rngs(3)))
    norm = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (cfg.hidden_size,), jnp.float32)

    def layer_piece(state, x):  # the router beside another norm of the same stream, as in a MoE layer
        w, idx, _ = nnx.merge(graphdef, state).route(x, "xla")
        return w, idx, text.rms_norm(x, norm, cfg.rms_norm_eps)

    x = jax.random.normal(jax.random.key(2), (5, cfg.hidden_size), jnp.float32)
    got, reduces = {}, {}
    for on in (False, True):
        monkeypatch.setattr(dispatch, "ROUTER_OWN_NORM", on)
        jax.clear_caches()  # the flag is read while tracing
        fn = jax.jit(layer_piece)
        got[on] = [np.asarray(a) for a in fn(state, x)]
        reduces[on] = sum(" reduce(" in line for line in fn.lower(state, x).compile().as_text().splitlines())
    assert reduces[True] == reduces[False] + 1, reduces
    for a, b in zip(got[True], got[False], strict=True):
        np.testing.assert_array_equal(a, b)

    model = random_model(cfg, jnp.float32)
    ids = np.random.default_rng(5).integers(3, 256, size=(2, 6))
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(dispatch, "ROUTER_OWN_NORM", on)
        jax.clear_caches()
        logits[on] = np.asarray(Gemma4Model(model, RunConfig(dtype="float32", attn_impl="xla")).logits(ids))
    np.testing.assert_array_equal(logits[True], logits[False])
