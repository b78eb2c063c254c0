"""The L2 prefetch kernel (`kernels/l2_prefetch.py`, interpret mode on the CPU) and its place in a decode step
(`model.prefetch_weights`, `dispatch.L2_PREFETCH_BYTES`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import all_eqns, rel_err

import gemma4_jax
from gemma4_jax.generation.cache import init_cache
from gemma4_jax.generation.loop import decode_logits, prefill
from gemma4_jax.kernels import dispatch, l2_prefetch

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # several tests call a decode step directly


@pytest.mark.parametrize("counts, loads", [("all", 1), ("prefixes", 1), ("all", 3), ("prefixes", 2)])
def test_each_program_reads_its_share_and_nothing_past_the_counts(counts, loads):
    """Each program returns the largest value of its own contiguous share of every weight's first `count`
    elements (numpy's max over the same ranges): the last counted element (a marker) is read, and a larger one
    just past the count is not; with `loads` blocks in flight a share is whole loop steps of that many blocks."""
    rng = np.random.default_rng(0)
    shapes = [(64, 96), (40, 33), (128, 80)]  # 6144, 1320 (not a multiple of the block) and 10240 elements
    sizes = [int(np.prod(s)) for s in shapes]
    want_counts = sizes if counts == "all" else [6144, 1000, 0]
    programs, block = 5, 256
    ws = []
    for shape, size, c in zip(shapes, sizes, want_counts, strict=True):
        w = rng.uniform(-1, 1, size).astype(np.float32)
        if c:
            w[c - 1] = 2.0 + len(ws)  # the last element read: each weight's own marker
        if c < size:
            w[c] = 50.0  # the first element not read
        ws.append(w.reshape(shape))
    got = np.asarray(l2_prefetch.prefetch([jnp.asarray(w, jnp.bfloat16) for w in ws], jnp.zeros((2, 3)),
                                          counts=None if counts == "all" else tuple(want_counts),
                                          programs=programs, block=block, loads=loads, interpret=True,
                                          eviction="evict_last" if counts == "all" else "evict_normal"))
    assert got.shape == (programs,) and not (got >= 50).any(), got  # nothing past a count was read
    # each program's share: ceil(ceil(c / P) / (block · loads)) loop steps of each weight, in program order
    best = np.full(programs, -np.inf)
    for w, c in zip(ws, want_counts, strict=True):
        flat = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)).reshape(-1)[:c]
        per = math.ceil(math.ceil(c / programs) / (block * loads)) * block * loads
        for p in range(programs):
            part = flat[p * per:(p + 1) * per]
            if part.size:
                best[p] = max(best[p], part.max())
    np.testing.assert_array_equal(got, best)
    assert got.max() == 2.0 + max(i for i, c in enumerate(want_counts) if c)  # the last weight's last element


def test_bad_counts_and_eviction_say_so():
    w = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="counts"):
        l2_prefetch.prefetch([w], w, counts=(33,), interpret=True)
    with pytest.raises(ValueError, match="eviction"):
        l2_prefetch.prefetch([w], w, eviction="evict_later", interpret=True)
    with pytest.raises(ValueError, match="loads"):
        l2_prefetch.prefetch([w], w, loads=0, interpret=True)


def test_budget_counts_takes_weights_whole_in_order():
    assert l2_prefetch.budget_counts([10, 20, 30], 2, 50) == (10, 15, 0)
    assert l2_prefetch.budget_counts([10, 20], 2, 1000) == (10, 20)
    assert l2_prefetch.budget_counts([10, 20], 4, 3) == (0, 0)


def test_resolve_prefetch(monkeypatch):
    """With a budget (the default's, 24 MiB), 16-bit decode-sized calls on a GPU under auto, any dtype in interpret
    mode; never when off, under xla, past the row limit or in a layer past the weight limit."""
    small = dispatch.L2_PREFETCH_MAX_LAYER_BYTES
    assert dispatch.L2_PREFETCH_BYTES == 24 << 20
    assert dispatch.resolve_prefetch("auto", rows=4, layer_bytes=small, platform="cuda") == "pallas"
    assert dispatch.resolve_prefetch("auto", rows=4, layer_bytes=small + 1, platform="cuda") is None
    assert dispatch.resolve_prefetch("auto", rows=4, layer_bytes=small, dtype=jnp.float32, platform="cuda") is None
    assert dispatch.resolve_prefetch("auto", rows=4, layer_bytes=small, platform="cpu") is None
    assert dispatch.resolve_prefetch("interpret", rows=4, layer_bytes=small, dtype=jnp.float32,
                                     platform="cpu") == "interpret"
    assert dispatch.resolve_prefetch("interpret", rows=4, layer_bytes=small + 1, platform="cpu") is None
    assert dispatch.resolve_prefetch("xla", rows=4, layer_bytes=small, platform="cuda") is None
    assert dispatch.resolve_prefetch("auto", rows=dispatch.L2_PREFETCH_MAX_ROWS + 1, layer_bytes=small,
                                     platform="cuda") is None
    monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", 0)
    assert dispatch.resolve_prefetch("auto", rows=1, layer_bytes=small, platform="cuda") is None  # off
    # the second point's own budget works with the first point off
    assert dispatch.resolve_prefetch("auto", rows=1, layer_bytes=small, budget=1, platform="cuda") == "pallas"
    monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", 2**20)
    assert "L2_PREFETCH_BYTES=1048576" in dispatch.settings()  # programs kept across processes are keyed by it


def test_the_layer_limit_takes_the_small_models_only():
    """The rule's intent at the real shapes in bf16: every layer of E2B and E4B (measured faster with the prefetch)
    is within the weight limit, every layer of 26B-A4B and 31B (not measured) past it."""
    from gemma4_jax.config import PRESETS, Gemma4Config
    from gemma4_jax.parallel.stages import layer_param_bytes

    for preset, within in (("e2b", True), ("e4b", True), ("26b-a4b", False), ("31b", False)):
        sizes = layer_param_bytes(Gemma4Config.from_hf_dict(PRESETS[preset]), 2)
        assert ((sizes <= dispatch.L2_PREFETCH_MAX_LAYER_BYTES) == within).all(), preset


def test_a_layer_counts_its_own_weight_bytes(hf_dirs):
    """`DecoderLayer.weight_bytes`, which the rule reads, is the layer's parameter bytes (stages' count), experts
    included."""
    from gemma4_jax.parallel.stages import layer_param_bytes

    for family in ("e2b", "26b-a4b"):
        model = gemma4_jax.load(hf_dirs[family, "causal"], dtype="float32", attn_impl="xla", progress=False)
        from gemma4_jax.model.text import merge

        layers = merge(model.graphdef, model.state).layers
        want = layer_param_bytes(model.config, 4)
        got = [layer.weight_bytes() for layer in layers]
        assert got == list(want), (family, got, list(want))


def _live(jaxpr) -> list:
    """The equations of `jaxpr` whose results reach its outputs, and the same inside those (jit bodies)."""
    from jax.extend.core import jaxprs_in_params

    needed = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    live = []
    for e in reversed(jaxpr.eqns):
        if any(v in needed for v in e.outvars) or e.effects:
            live.append(e)
            needed |= {v for v in e.invars if not isinstance(v, jax.extend.core.Literal)}
    out = list(live)
    for e in live:
        for sub in jaxprs_in_params(e.params):
            out += _live(sub)
    return out


def _prefetch_launches(model, cache, tok, pos) -> tuple[list, set]:
    """The prefetch launches of a decode step's program, and the ids of the equations that reach its outputs."""
    from gemma4_jax.generation.loop import decode_step
    from gemma4_jax.model.text import merge

    jaxpr = jax.make_jaxpr(lambda c, t, p: decode_step(merge(model.graphdef, model.state), c, t, p))(cache, tok, pos)
    calls = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name in ("jit", "pjit") and e.params["name"] == "prefetch"]
    return calls, {id(e) for e in _live(jaxpr.jaxpr)}


# A prefetch changes no value, but its launch is a new node in the step's program, around which XLA may fuse the
# step's float32 sums in another order: without a prefetch and with one, the logits agree to float32 rounding
# (1.6e-6 of 0.8 with the tests' XLA flags, 2026-12-07), far below what a prefetch that fed a weight's value into
# the step would change.
SAME_STEP = 1e-5


def test_a_decode_step_prefetches_each_layers_next_weights(hf_dirs, monkeypatch):
    """With a budget, each layer of a decode step launches one prefetch after its queries, over the weights it
    streams next in the order it reads them (output projection, gate, up, down, the per-layer input's) up to the
    budget, and the step's results depend on it (else XLA would drop the kernel); the logits are the full
    forward's and, to float32 rounding (SAME_STEP), those of the same step without it."""

    model = gemma4_jax.load(hf_dirs["e2b", "causal"], dtype="float32", attn_impl="xla", progress=False)
    cfg = model.config
    ids = np.random.default_rng(3).integers(3, 256, size=(1, 7)).astype(np.int32)
    full = model.logits(ids)
    cache = init_cache(cfg, 1, 16, jnp.float32)
    _, cache = prefill(model.graphdef, model.state, jnp.asarray(ids[:, :5]), jnp.asarray([5]), cache)
    tok, pos = jnp.asarray(ids[:, 5]), jnp.asarray([5], jnp.int32)
    # the prefetch in interpret mode, the projections on XLA (`resolve_prefetch`'s own rule is tested above)
    monkeypatch.setattr(dispatch, "resolve_prefetch",
                        lambda impl, rows, layer_bytes, budget, dtype: "interpret" if rows <= 4 and budget else None)
    d, f, nh = cfg.hidden_size, cfg.layers[0].mlp_width, cfg.num_heads * cfg.layers[0].head_dim
    budget = 4 * (nh * d + d * f + d)  # the output projection, the gate and one row of up, in float32
    steps = {}
    for on in (0, budget):
        monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", on)
        jax.clear_caches()  # the knobs are read when a step is traced
        calls, live = _prefetch_launches(model, cache, tok, pos)
        if not on:
            assert not calls
        else:
            assert len(calls) == cfg.num_layers, len(calls)
            assert all(id(e) in live for e in calls)  # each reaches the step's outputs
            for e, spec in zip(calls, cfg.layers, strict=True):
                shapes = [v.aval.shape for v in e.invars]
                want = [(cfg.num_heads, spec.head_dim, d), (d, spec.mlp_width),
                                            (d, spec.mlp_width), (spec.mlp_width, d)]
                if spec.ple:
                    want += [(d, cfg.ple_dim), (cfg.ple_dim, d)]
                assert shapes[:-1] == want and shapes[-1][-2:] == (cfg.num_heads, spec.head_dim), shapes
                pallas = [x for x in all_eqns(e.params["jaxpr"].jaxpr) if x.primitive.name == "pallas_call"]
                name = pallas[0].params["jaxpr"].debug_info.func_src_info.split()[0]
                counts = tuple(int(n) for n in name.removeprefix("l2_prefetch_").split("_"))
                if spec.head_dim == cfg.layers[0].head_dim and spec.mlp_width == f:  # the budget's own layer kind
                    assert counts == (nh * d, d * f, d) + (0,) * (len(want) - 3), (spec.index, counts)
                else:  # whole weights in order, then a prefix of one, within the budget
                    sizes = [int(np.prod(s)) for s in want]
                    cut = next((i for i, (c, n) in enumerate(zip(counts, sizes, strict=True)) if c < n), len(sizes))
                    assert counts[:cut] == tuple(sizes[:cut]) and not any(counts[cut + 1:]), (spec.index, counts)
                    assert sum(counts) == min(budget // 4, sum(sizes)), (spec.index, counts)
        step, _ = decode_logits(model.graphdef, model.state, jax.tree.map(jnp.copy, cache), tok, pos)  # donated
        steps[on] = np.asarray(step)
    assert rel_err(steps[budget], steps[0]) <= SAME_STEP
    assert rel_err(steps[budget], full[:, 5]) <= 1e-4


def _one_step_after_a_prompt(hf_dirs, monkeypatch):
    """E2B's tiny float32 model, its cache after a 5-token prompt, and the next token and position; the prefetch in
    interpret mode at up to 4 rows with a budget (`resolve_prefetch`'s own rule is tested above), the projections
    on XLA."""
    model = gemma4_jax.load(hf_dirs["e2b", "causal"], dtype="float32", attn_impl="xla", progress=False)
    ids = np.random.default_rng(4).integers(3, 256, size=(1, 6)).astype(np.int32)
    cache = init_cache(model.config, 1, 16, jnp.float32)
    _, cache = prefill(model.graphdef, model.state, jnp.asarray(ids[:, :5]), jnp.asarray([5]), cache)
    monkeypatch.setattr(dispatch, "resolve_prefetch",
                        lambda impl, rows, layer_bytes, budget, dtype: "interpret" if rows <= 4 and budget else None)
    return model, cache, jnp.asarray(ids[:, 5]), jnp.asarray([5], jnp.int32)


def test_smallest_first_order_gives_the_budget_to_the_small_weights(hf_dirs, monkeypatch):
    """`L2_PREFETCH_ORDER = 'smallest_first'`: each layer's prefetch takes the weights it streams next smallest first
    (in stream order among equals), so a budget of the two smallest, the per-layer input's, covers them whole and
    nothing else, where the stream order would give it to the output projection; the step's logits stay those
    without a prefetch, to float32 rounding (SAME_STEP)."""
    model, cache, tok, pos = _one_step_after_a_prompt(hf_dirs, monkeypatch)
    cfg = model.config
    d, spec = cfg.hidden_size, cfg.layers[0]
    stream = [(cfg.num_heads, spec.head_dim, d), (d, spec.mlp_width), (d, spec.mlp_width), (spec.mlp_width, d),
              (d, cfg.ple_dim), (cfg.ple_dim, d)]  # the order the layer reads them
    want = sorted(stream, key=lambda x: int(np.prod(x)))
    assert spec.ple and want[:2] == [(d, cfg.ple_dim), (cfg.ple_dim, d)] and want[0] != stream[0]
    sizes = [int(np.prod(x)) for x in want]
    monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", 4 * (sizes[0] + sizes[1]))
    monkeypatch.setattr(dispatch, "L2_PREFETCH_ORDER", "smallest_first")
    jax.clear_caches()
    calls, live = _prefetch_launches(model, cache, tok, pos)
    e = calls[0]  # the first layer's
    assert [v.aval.shape for v in e.invars][:-1] == want and id(e) in live
    pallas = [x for x in all_eqns(e.params["jaxpr"].jaxpr) if x.primitive.name == "pallas_call"]
    counts = tuple(int(n) for n in pallas[0].params["jaxpr"].debug_info.func_src_info.split()[0]
                   .removeprefix("l2_prefetch_").split("_"))
    assert counts == (sizes[0], sizes[1], 0, 0, 0, 0), counts
    with_order, _ = decode_logits(model.graphdef, model.state, jax.tree.map(jnp.copy, cache), tok, pos)
    monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", 0)
    jax.clear_caches()
    without, _ = decode_logits(model.graphdef, model.state, jax.tree.map(jnp.copy, cache), tok, pos)
    assert rel_err(np.asarray(with_order), np.asarray(without)) <= SAME_STEP


def test_the_second_point_reads_the_per_layer_input_and_the_next_projections(hf_dirs, monkeypatch):
    """With `L2_PREFETCH_NEXT_BYTES` (and the first point off), each layer of a decode step launches one prefetch
    once its MLP is done, over its per-layer-input weights and then the next layer's q/k/v projections (the last
    layer: its own alone), whole within the budget; the step's results depend on each, and its logits equal, bit
    for bit, the same step's without it (float32)."""

    model, cache, tok, pos = _one_step_after_a_prompt(hf_dirs, monkeypatch)
    cfg = model.config
    monkeypatch.setattr(dispatch, "L2_PREFETCH_BYTES", 0)
    d, n = cfg.hidden_size, cfg.num_heads
    steps = {}
    for on in (0, 2**30):  # the launches
        monkeypatch.setattr(dispatch, "L2_PREFETCH_NEXT_BYTES", on)
        jax.clear_caches()
        calls, live = _prefetch_launches(model, cache, tok, pos)
        if not on:
            assert not calls
            continue
        assert len(calls) == cfg.num_layers and all(id(e) in live for e in calls), len(calls)
        for e, spec in zip(calls, cfg.layers, strict=True):
            want = [(d, cfg.ple_dim), (cfg.ple_dim, d)]
            if spec.index + 1 < cfg.num_layers:
                nxt = cfg.layers[spec.index + 1]
                want.append((d, n, nxt.head_dim))
                if nxt.owns_kv:
                    want += [(d, nxt.num_kv_heads, nxt.head_dim)] * (1 if nxt.k_eq_v else 2)
            assert [v.aval.shape for v in e.invars][:-1] == want, (spec.index, [v.aval.shape for v in e.invars])
    for on in (2**30, 0):
        monkeypatch.setattr(dispatch, "L2_PREFETCH_NEXT_BYTES", on)
        jax.clear_caches()
        step, _ = decode_logits(model.graphdef, model.state, jax.tree.map(jnp.copy, cache), tok, pos)  # donated
        steps[on] = np.asarray(step)
    assert rel_err(steps[2**30], steps[0]) <= SAME_STEP
