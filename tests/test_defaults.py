"""The embedded demo model is the default of load() and the CLI; the attention path is selectable."""

import os
import subprocess
import sys

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


@pytest.mark.devices(2)
def test_attention_path_is_selectable_and_agrees():
    """'interpret' runs the Pallas kernels (interpret mode) inside the model, at pp = 1 and through the pipeline's
    stages at pp = 2; both must give XLA's logits and greedy tokens."""
    ids = np.array([[2, 105, 30, 31, 32, 33, 34, 35, 36], [2, 105, 40, 41, 42, 43, 44, 45, 46]])
    xla = gemma4_jax.load(progress=False, attn_impl="xla")
    want_logits, want_tokens = xla.logits(ids), xla.generate(ids, max_new_tokens=6, stop_tokens=())
    for pp, bound in ((1, 1e-5), (2, 3e-5)):
        ker = gemma4_jax.load(progress=False, pp=pp, attn_impl="interpret")
        got = ker.logits(ids)
        assert np.max(np.abs(got - want_logits)) / np.max(np.abs(want_logits)) < bound, pp
        assert ker.generate(ids, max_new_tokens=6, stop_tokens=()) == want_tokens, pp
    with pytest.raises(gemma4_jax.Gemma4Error, match="attn_impl must be one of"):
        gemma4_jax.load(progress=False, attn_impl="flash")
    with pytest.raises(gemma4_jax.Gemma4Error, match="needs a CUDA GPU"):  # this is a CPU
        gemma4_jax.load(progress=False, attn_impl="cudnn")
