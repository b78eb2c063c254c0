"""Continuous batching (`generation/engine.py`, `Gemma4Model.generate_continuous`) on the demo model: greedy
tokens equal `generate`'s for every prompt, whatever the slots, limits and stops, at pp = 1 and through the
pipeline's ring at pp = 2; its errors."""

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.errors import ConfigError

pytestmark = pytest.mark.xdist_group("engine")  # one worker builds the demo model and its references once


@pytest.fixture(scope="module")
def demo():
    return gemma4_jax.load(dtype="float32", progress=False)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, size=int(k)).tolist() for k in rng.integers(1, 40, size=n)]


PROMPTS, LIMITS = _prompts(7), [6, 20, 1, 11, 3, 15, 9]


@pytest.fixture(scope="module")
def alone(demo):
    """`generate` for each prompt alone, with its own limit."""
    return [demo.generate([p], max_new_tokens=m, stop_tokens=())[0] for p, m in zip(PROMPTS, LIMITS, strict=True)]


@pytest.mark.parametrize("slots", [1, 3])
def test_greedy_tokens_equal_generate(demo, alone, slots):
    """Prompts of 1–39 tokens, each with its own limit (1 included: a sequence that ends at its first token),
    more prompts than slots: every answer is `generate`'s for that prompt alone."""
    got = demo.generate_continuous(PROMPTS, max_new_tokens=LIMITS, slots=slots, stop_tokens=())
    assert got == alone and [len(g) for g in got] == LIMITS


def test_stop_tokens_end_a_sequence_and_free_its_slot(demo):
    """With the checkpoint's stop ids, answers end at their first stop (kept) as a static batch's do; a stop id
    that the model emits early makes slots turn over mid-run."""
    prompts = _prompts(6, seed=1)
    want = demo.generate(prompts, max_new_tokens=24)
    assert demo.generate_continuous(prompts, max_new_tokens=24, slots=2) == want
    first = want[0][2]  # a token the model emits: as a stop id, some answers end at once, others later
    ended = []
    got = demo.generate_continuous(prompts, max_new_tokens=24, slots=2, stop_tokens=(first,),
                                   on_done=lambda i, toks: ended.append(i))
    assert got == demo.generate(prompts, max_new_tokens=24, stop_tokens=(first,))
    assert sorted(ended) == list(range(6)) and any(len(g) < 24 for g in got)


def test_long_prompts_prefill_in_pieces_between_decode_steps(demo, alone):
    """`prefill_chunk=4`: prompts longer than 4 tokens are prefilled 4 tokens at a time (`loop.extend`), one piece
    before each decode chunk of the other slots — a short prompt's answer ends while a long prompt still
    prefills — and every answer is still `generate`'s, with and without a shared prefix."""
    got = demo.generate_continuous(PROMPTS, max_new_tokens=LIMITS, slots=3, stop_tokens=(), prefill_chunk=4)
    assert got == alone
    long, short = list(range(3, 40)), [7, 8, 9]
    order = []
    demo.generate_continuous([long, short], max_new_tokens=[1, 3], slots=2, stop_tokens=(), prefill_chunk=4,
                             on_done=lambda i, toks: order.append(i))
    assert order == [1, 0]  # whole, the long prompt would end first: at its first token, in slot 0
    rng = np.random.default_rng(6)
    head = rng.integers(3, 200, size=20).tolist()
    prompts = [head + rng.integers(3, 200, size=int(k)).tolist() for k in (9, 2, 14)]
    got = demo.generate_continuous(prompts, max_new_tokens=5, slots=2, stop_tokens=(), shared_prefix=True,
                                   prefill_chunk=4)
    assert got == [demo.generate([p], max_new_tokens=5, stop_tokens=())[0] for p in prompts]


def test_default_pieces_are_one_length_so_extend_compiles_once(demo, monkeypatch):
    """By default (`engine.PREFILL_CHUNK`) every piece, the shared prefix's (longer than a piece) and each prompt's
    own tokens (shorter and longer than a piece), is padded to one length: `extend` sees one shape, one compiled
    program. The answers are still `generate`'s."""
    from gemma4_jax.generation import engine

    lengths = []
    extend = engine.extend

    def recording(graphdef, params, ids_bt, *rest, **kw):
        lengths.append(ids_bt.shape[1])
        return extend(graphdef, params, ids_bt, *rest, **kw)

    monkeypatch.setattr(engine, "extend", recording)
    rng = np.random.default_rng(8)
    head = rng.integers(3, 200, size=engine.PREFILL_CHUNK + 45).tolist()
    prompts = [head + rng.integers(3, 200, size=k).tolist() for k in (5, engine.PREFILL_CHUNK + 30, 120)]
    got = demo.generate_continuous(prompts, max_new_tokens=3, slots=2, stop_tokens=(), shared_prefix=True)
    assert set(lengths) == {engine.PIECE_MIN} and len(lengths) == 2 + 1 + 2 + 1  # prefix, then each prompt's pieces
    assert got == [demo.generate([p], max_new_tokens=3, stop_tokens=())[0] for p in prompts]


def test_sampling_keeps_each_limit(demo):
    prompts = _prompts(4, seed=2)
    got = demo.generate_continuous(prompts, max_new_tokens=[3, 5, 2, 7], slots=2, temperature=0.8, top_k=20,
                                   seed=3, stop_tokens=())
    assert [len(g) for g in got] == [3, 5, 2, 7]
    assert all(0 <= t < demo.config.vocab_size for g in got for t in g)


def test_no_more_slots_than_prompts(demo, monkeypatch):
    """`slots` beyond the prompts' count allocates no cache rows for them (a batch size of 10,000 for two prompts
    cost 2.3 GB and 3× the time), and the tokens are those of two slots."""
    from gemma4_jax.generation import engine

    rows = []
    real = engine.init_cache
    monkeypatch.setattr(engine, "init_cache", lambda cfg, b, *a, **k: rows.append(b) or real(cfg, b, *a, **k))
    prompts = [[2, 5, 6, 7], [2, 9]]
    many = demo.generate_continuous(prompts, max_new_tokens=4, slots=10_000, stop_tokens=())
    assert rows and max(rows) <= len(prompts), rows
    assert many == demo.generate_continuous(prompts, max_new_tokens=4, slots=2, stop_tokens=())


def test_token_limits_and_slots_are_integers(demo):
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be an integer, got 2\.5$"):
        demo.generate_continuous([[5, 6], [5, 7]], max_new_tokens=[2.5, 5])
    with pytest.raises(ConfigError, match=r"^slots must be an integer, got 2\.7$"):
        demo.generate_continuous([[5, 6]], max_new_tokens=3, slots=2.7)
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be an integer or one integer per prompt"):
        demo.generate_continuous([[5, 6]], max_new_tokens="3")
    got = demo.generate_continuous([[5, 6], [5, 7]], max_new_tokens=np.array([3, 4]), stop_tokens=())
    assert [len(g) for g in got] == [3, 4]


def test_bad_input_is_refused(demo):
    with pytest.raises(ConfigError, match="limits"):
        demo.generate_continuous([[5, 6]], max_new_tokens=[3, 4])
    with pytest.raises(ConfigError, match="at least 1"):
        demo.generate_continuous([[5, 6]], max_new_tokens=4, slots=0)
    with pytest.raises(ConfigError, match="context"):
        demo.generate_continuous([[5] * 10], max_new_tokens=demo.context)


@pytest.fixture(scope="module")
def piped():
    return gemma4_jax.load(dtype="float32", progress=False, pp=2)


@pytest.mark.devices(2)
def test_the_pipeline_ring_gives_the_same_tokens(demo, piped, alone):
    """pp = 2: the slots are the ring's rows (two micro-batches of two rows); every answer is `generate`'s at
    pp = 1 for that prompt alone, also with long prompts prefilled in pieces; stop tokens end answers and turn
    slots over. (A shared prefix through the stages:
    tests/test_pipeline.py.)"""
    got = piped.generate_continuous(PROMPTS, max_new_tokens=LIMITS, slots=3, stop_tokens=())
    assert got == alone
    got = piped.generate_continuous(PROMPTS, max_new_tokens=LIMITS, slots=3, stop_tokens=(), prefill_chunk=8)
    assert got == alone  # prompts of 9-39 tokens prefilled 8 at a time, between calls of the ring
    prompts = _prompts(6, seed=1)
    stop = demo.generate(prompts, max_new_tokens=24, stop_tokens=())[0][2]  # a token the model emits
    want = demo.generate(prompts, max_new_tokens=24, stop_tokens=(stop,))
    assert piped.generate_continuous(prompts, max_new_tokens=24, slots=4, stop_tokens=(stop,)) == want
    assert any(len(w) < 24 for w in want)


def test_a_shared_prefix_is_computed_once(demo, monkeypatch):
    """Prompts that share 150 leading tokens: the prefix is prefilled once (stats say so), in pieces through the
    same `extend` program as the prompts (each piece padded to at least `PIECE_MIN` tokens: few programs to
    compile), and every answer is still `generate`'s for the whole prompt."""
    from gemma4_jax.generation import engine

    rng = np.random.default_rng(4)
    head = rng.integers(3, 200, size=150).tolist()
    prompts = [head + rng.integers(3, 200, size=int(k)).tolist() for k in (5, 17, 1, 30)]
    limits = [6, 12, 3, 9]
    want = [demo.generate([p], max_new_tokens=m, stop_tokens=())[0] for p, m in zip(prompts, limits, strict=True)]
    calls = []

    def spy(graphdef, params, ids, start, lengths, cache, **kw):
        calls.append((ids.shape[1], int(start[0]), int(lengths[0])))
        return extend(graphdef, params, ids, start, lengths, cache, **kw)

    extend = engine.extend
    monkeypatch.setattr(engine, "extend", spy)
    stats = {}
    got = demo.generate_continuous(prompts, max_new_tokens=limits, slots=2, stop_tokens=(), shared_prefix=True,
                                   stats=stats, prefill_chunk=64)
    assert got == want
    assert calls[:3] == [(engine.PIECE_MIN, 0, 64), (engine.PIECE_MIN, 64, 64), (engine.PIECE_MIN, 128, 22)]
    assert sorted(calls[3:]) == [(engine.PIECE_MIN, 150, k) for k in (1, 5, 17, 30)]
    assert stats == {"prefix_tokens": 150, "prompt_tokens": sum(map(len, prompts)),
                     "prefill_tokens": 150 + 5 + 17 + 1 + 30}


@pytest.mark.parametrize("family", ["e2b", "26b-a4b"])
def test_extend_continues_a_prefill(family):
    """A prompt prefilled in two pieces (`loop.extend` after `prefill`) gives the logits of prefilling it whole,
    and the same cache for decoding: sliding layers' ring buffers wrapped by both pieces, KV-shared layers (E2B
    family), MoE and k_eq_v full layers (26B-A4B family); float32, norms and scalars perturbed."""
    import jax.numpy as jnp
    from hf_fixtures import FAMILIES

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.generation.cache import init_cache
    from gemma4_jax.generation.loop import bucket, decode_logits, extend, prefill
    from gemma4_jax.model.text import split
    from gemma4_jax.testing.synthetic import random_model

    cfg = Gemma4Config.from_hf_dict(FAMILIES[family], name=family)
    graphdef, params = split(random_model(cfg, jnp.float32))
    window = min(s.window for s in cfg.layers if s.window is not None)
    prompt = np.random.default_rng(5).integers(3, cfg.vocab_size, size=3 * window + 5).tolist()
    cut, length = 2 * window + 3, 64 * ((3 * window + 5) // 64 + 2)

    def run(pieces):
        cache, start, logits = init_cache(cfg, 1, length, jnp.float32), 0, None
        for i, piece in enumerate(pieces):
            ids = np.zeros((1, bucket(len(piece))), np.int32)
            ids[0, :len(piece)] = piece
            n = jnp.asarray([len(piece)], jnp.int32)
            if i == 0:
                logits, cache = prefill(graphdef, params, jnp.asarray(ids), n, cache, impl="xla")
            else:
                logits, cache = extend(graphdef, params, jnp.asarray(ids), jnp.asarray([start], jnp.int32), n,
                                       cache, impl="xla")
            start += len(piece)
        nxt, _ = decode_logits(graphdef, params, cache, jnp.asarray([7]), jnp.asarray([start]), impl="xla")
        return np.asarray(logits), np.asarray(nxt)

    whole, pieces = run([prompt]), run([prompt[:cut], prompt[cut:]])
    for a, b in zip(whole, pieces, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a)), np.max(np.abs(a - b))
