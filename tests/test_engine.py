"""Continuous batching (`generation/engine.py`, `Gemma4Model.generate_continuous`) on the demo model: greedy
tokens equal `generate`'s for every prompt, whatever the slots, limits and stops; its errors."""

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.errors import ConfigError


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


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_greedy_tokens_equal_generate(demo, alone, slots):
    """Prompts of 1–39 tokens, each with its own limit (1 included: a sequence that ends at its first token),
    more prompts than slots (and fewer): every answer is `generate`'s for that prompt alone."""
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


def test_sampling_keeps_each_limit(demo):
    prompts = _prompts(4, seed=2)
    got = demo.generate_continuous(prompts, max_new_tokens=[3, 5, 2, 7], slots=2, temperature=0.8, top_k=20,
                                   seed=3, stop_tokens=())
    assert [len(g) for g in got] == [3, 5, 2, 7]
    assert all(0 <= t < demo.config.vocab_size for g in got for t in g)


def test_bad_input_and_the_pipeline_are_refused(demo):
    with pytest.raises(ConfigError, match="limits"):
        demo.generate_continuous([[5, 6]], max_new_tokens=[3, 4])
    with pytest.raises(ConfigError, match="at least 1"):
        demo.generate_continuous([[5, 6]], max_new_tokens=4, slots=0)
    with pytest.raises(ConfigError, match="context"):
        demo.generate_continuous([[5] * 10], max_new_tokens=demo.context)
    piped = gemma4_jax.load(progress=False, pp=2)
    with pytest.raises(ConfigError, match="pp = 1"):
        piped.generate_continuous([[5, 6]], max_new_tokens=2)
