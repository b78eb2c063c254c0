"""The embedded demo model is the default of load() and the CLI; the attention path is selectable."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.demo import demo_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Sam has $50. He buys 3 books for $8 each. How much money does Sam have left?"


def test_load_without_a_path_is_the_demo_model():
    m = gemma4_jax.load(progress=False)
    assert os.path.samefile(m.path, demo_path()) and m.tokenizer is not None
    ref = gemma4_jax.load(demo_path(), progress=False)
    ids = np.array([[2, 105, 30, 31, 32]])
    np.testing.assert_array_equal(m.logits(ids), ref.logits(ids))


def test_cli_runs_the_demo_model_out_of_the_box():
    r = subprocess.run([sys.executable, "-m", "gemma4_jax.generate", "--prompt", QUESTION, "--max-new-tokens", "48"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "#### 26" in r.stdout


@pytest.mark.parametrize("pp,bound", [(1, 1e-5), (2, 3e-5)])
def test_attention_path_is_selectable_and_agrees(monkeypatch, pp, bound):
    """'interpret' runs the Pallas kernels (interpret mode) inside the model, at pp = 1 and through the pipeline's
    stages at pp = 2: the prefill and decode kernels are called (XLA's path calls neither), and the logits and
    greedy tokens are XLA's."""
    from gemma4_jax.kernels import dispatch

    calls = set()

    def counted(name, real):
        def call(*a, **k):
            calls.add((name, k.get("interpret")))
            return real(*a, **k)
        return call

    for name in ("flash_attention", "decode_attention"):
        monkeypatch.setattr(dispatch, name, counted(name, getattr(dispatch, name)))
    ids = np.array([[2, 105, 30, 31, 32, 33, 34, 35, 36], [2, 105, 40, 41, 42, 43, 44, 45, 46]])
    xla = gemma4_jax.load(progress=False, attn_impl="xla")
    want_logits, want_tokens = xla.logits(ids), xla.generate(ids, max_new_tokens=6, stop_tokens=())
    assert not calls, calls
    ker = gemma4_jax.load(progress=False, pp=pp, attn_impl="interpret")
    got = ker.logits(ids)
    assert np.max(np.abs(got - want_logits)) / np.max(np.abs(want_logits)) < bound
    assert ker.generate(ids, max_new_tokens=6, stop_tokens=()) == want_tokens
    assert calls == {("flash_attention", True), ("decode_attention", True)}, calls


def test_attention_path_refuses_what_it_cannot_run():
    with pytest.raises(gemma4_jax.Gemma4Error, match="attn_impl must be one of"):
        gemma4_jax.load(progress=False, attn_impl="flash")
    if jax.default_backend() == "cpu":
        with pytest.raises(gemma4_jax.Gemma4Error, match="needs a CUDA GPU"):
            gemma4_jax.load(progress=False, attn_impl="cudnn")
    else:  # a GPU runs it
        assert gemma4_jax.load(progress=False, attn_impl="cudnn").run.attn_impl == "cudnn"
