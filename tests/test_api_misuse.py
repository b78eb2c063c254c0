"""Misused `load` and `generate` arguments: one `Gemma4Error` sentence at the call, never a Python error later."""

import re

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.api import layer_split_stages
from gemma4_jax.demo import demo_path


@pytest.fixture(scope="module")
def demo():
    return gemma4_jax.load(demo_path(), dtype="float32", progress=False)


# The demo model has 6 layers; the tests run with 4 CPU devices (conftest), so pp=2 is possible.
@pytest.mark.parametrize("kw, words", [
    (dict(max_seq_len=0), "max_seq_len must be a positive integer (or None: the model's context), got 0"),
    (dict(max_seq_len=-5), "max_seq_len must be a positive integer"),
    (dict(max_seq_len=2.5), "max_seq_len must be a positive integer"),
    (dict(layer_split="a,b"), "a layer split must be comma-separated integers like 0,21,42, got 'a,b'"),
    (dict(layer_split="0,3"), "a layer split must run from 0 to 6"),
    (dict(pp=True), "pp must be a positive integer, got True"),
    (dict(layer_split="0,3,6"), "layer_split 0,3,6 makes 2 stages but pp=1"),
    (dict(layer_split=[0, 3.0, 6], pp=2), "or a sequence of integers), got [0, 3.0, 6]"),
    (dict(layer_split="0,2,4,6", pp=2), "layer_split 0,2,4,6 makes 3 stages but pp=2"),
])
def test_load_refuses_bad_run_options(kw, words):
    with pytest.raises(gemma4_jax.Gemma4Error, match=re.escape(words)) as err:
        gemma4_jax.load(progress=False, **kw)
    assert "\n" not in str(err.value)


def test_load_takes_a_split_as_text_or_integers():
    assert gemma4_jax.load(progress=False, layer_split=(0, 6), max_seq_len=np.int64(16)).context == 16
    for split in ("0,2,6", [0, 2, 6], np.array([0, 2, 6])):
        assert [(s.start, s.stop) for s in layer_split_stages(split, 6)] == [(0, 2), (2, 6)]


def test_generate_takes_one_stop_id_and_refuses_what_logits_refuses(demo):
    ids = [2, 105, 30, 31, 32]
    free = demo.generate([ids], max_new_tokens=6, stop_tokens=())[0]
    stop = free[2]
    assert demo.generate([ids], max_new_tokens=6, stop_tokens=stop)[0] == free[:free.index(stop) + 1]
    with pytest.raises(gemma4_jax.Gemma4Error) as want:
        demo.logits(np.array([[2.0, 5.5]]))
    for floats in (np.array([[2.0, 5.5]]), [[2.0, 5.5]]):  # no silent truncation to [[2, 5]]
        with pytest.raises(gemma4_jax.Gemma4Error) as err:
            demo.generate(floats, max_new_tokens=3)
        assert str(err.value) == str(want.value)
    for bad in ("<eos>", [1.5], [demo.config.vocab_size]):
        with pytest.raises(gemma4_jax.Gemma4Error, match="stop_tokens must be|stop token ids must lie"):
            demo.generate([ids], max_new_tokens=3, stop_tokens=bad)
    # a numpy integer is a token count too, in continuous batching as in `generate`
    assert demo.generate_continuous([ids], max_new_tokens=np.int64(3), stop_tokens=()) == [free[:3]]


def test_generate_and_the_tokenizer_refuse_what_they_cannot_use(demo):
    """Each a `Gemma4Error` sentence at the call (they were a misleading sentence, a TypeError mid-generation, a
    silently ignored option, an OverflowError or a TypeError from the tokenizers library)."""
    cases = [
        (lambda: demo.generate([], max_new_tokens=3), "there are no prompts: give at least one id list"),
        (lambda: demo.generate([[2, 5]], max_new_tokens=2, on_tokens=3),
         "on_tokens must be a function of each new block of tokens, got 3"),
        (lambda: demo.generate_text(["Hi"], chat=False, thinking=True),
         "thinking=True needs the chat template: drop chat=False"),
        (lambda: demo.tokenizer.decode([5, -1]), "token ids must be non-negative integers, got -1"),
        (lambda: demo.tokenizer.decode(["a"]), "token ids must be non-negative integers, got 'a'"),
        (lambda: demo.tokenizer.id_to_token(-2), "token ids must be non-negative integers, got -2"),
        (lambda: demo.tokenizer.encode(None), "encode takes text (a str), got NoneType None"),
    ]
    for call, words in cases:
        with pytest.raises(gemma4_jax.Gemma4Error, match=f"^{re.escape(words)}$"):
            call()
    ids = demo.tokenizer.encode("Hi there")
    assert demo.tokenizer.decode(np.array(ids)) == demo.tokenizer.decode(ids)  # numpy ids still decode
