"""float32 means float32: every program a float32 model runs is traced at full matmul precision (a GPU would
otherwise run its float32 matmuls in TF32), and bf16 programs are left at JAX's default."""

import jax
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import api, generation, pipeline


def _dot_precisions(lowered_text: str) -> set[str]:
    return {line.split("precision = [")[1].split("]")[0] for line in lowered_text.splitlines()
            if "stablehlo.dot_general" in line and "precision = [" in line}


def test_precision_scope_sets_every_dot_of_a_forward(hf_dirs):
    """Inside `precision_scope('float32')` every dot of the whole forward lowers at HIGHEST; under the bf16 scope
    the model's own dots stay at DEFAULT (only the float32 MoE XLA path asks for HIGHEST itself) — so the scope is
    what decides."""
    model = gemma4_jax.load(hf_dirs["26b-a4b", "causal"], dtype="float32", attn_impl="xla", progress=False)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    with api.precision_scope("float32"):
        hi = _dot_precisions(api._logits.lower(model.graphdef, model.state, ids, "xla").as_text())
    with api.precision_scope("bfloat16"):
        lo = _dot_precisions(api._logits.lower(model.graphdef, model.state, ids, "xla").as_text())
    assert hi == {"HIGHEST, HIGHEST"}, hi
    assert "DEFAULT, DEFAULT" in lo, lo


@pytest.mark.parametrize("pp,dtypes", [(1, ("float32", "bfloat16")), (2, ("float32",))])
def test_float32_model_runs_every_program_at_highest(hf_dirs, monkeypatch, pp, dtypes):
    """The programs the API calls (forward, prefill, decode loop, pipeline stages) see `highest` as the default
    matmul precision for a float32 model, and JAX's default for bf16, even when the user set `bfloat16`
    globally."""
    seen = []

    def spy(fn):
        def wrapped(*a, **k):
            seen.append(jax.config.jax_default_matmul_precision)
            return fn(*a, **k)
        return wrapped

    for mod, name in ((api, "_logits"), (generation, "prefill"), (generation, "decode_loop")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    monkeypatch.setattr(pipeline.Pipeline, "logits", spy(pipeline.Pipeline.logits))
    monkeypatch.setattr(pipeline.Pipeline, "generate", spy(pipeline.Pipeline.generate))
    path = hf_dirs["e2b", "causal"]
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 6))
    with jax.default_matmul_precision("bfloat16"):
        for dtype in dtypes:
            want = "highest" if dtype == "float32" else "bfloat16"
            model = gemma4_jax.load(path, dtype=dtype, attn_impl="xla", pp=pp, progress=False)
            seen.clear()
            model.logits(ids)
            model.generate(ids, max_new_tokens=2, stop_tokens=())
            assert len(seen) >= 2 and set(seen) == {want}, (dtype, seen)
