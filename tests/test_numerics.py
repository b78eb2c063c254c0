"""float32 means float32: every program a float32 model runs is traced at full matmul precision (a GPU would
otherwise run its float32 matmuls in TF32), and bf16 programs are left at JAX's default; and at real widths our
float32 is as close to exact (float64) as transformers' float32."""

import os
import sys

import jax
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import api
from gemma4_jax.generation import loop as generation
from gemma4_jax.parallel import pipeline


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

    for mod, name in ((api, "_logits"), (generation, "prefill"), (generation, "decode_chunk")):
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


# Real widths, one full-attention layer (head_dim 512: the longest contractions), the vocabulary shrunk so that CI's
# memory holds the float64 reference; ≥ 700 positions. One layer, not two: a second layer's own float32 noise, on
# both sides, hid the excess of a sequential sum (without blocks, E4B's token p99 was 1.03× transformers' with a
# sliding and a full layer, 1.56× with the full layer alone; 26B-A4B's 1.14× and 1.54×; E2B's 1.66×; 31B's 1.67×).
# 31B's MLP is cut to 4096 of its 21504 columns (2.1 GB of float32 weights to 1.0 GB, half the test's time): its
# output projection's 16384-term sums still break the bound without blocks (1.61× at the full width), while fewer
# heads (16 with that MLP: 1.47×) would hide it. With blocks every case is at 0.74–0.91× (2026-12-05, this CPU).
EXACT_CASES = {"e2b": {}, "e4b": {}, "26b-a4b": dict(experts=16), "31b": dict(intermediate_size=4096)}
EXACT_TOKENS, EXACT_VOCAB = 704, 2048


@pytest.mark.xdist_group("float64")  # one float64 reference in memory at a time (each holds up to ~8 GB)
@pytest.mark.parametrize("preset", list(EXACT_CASES))
def test_float32_is_as_close_to_exact_as_transformers(preset):
    """At a variant's real widths (one full layer, 31B's MLP cut: above), our float32 logits are no further from
    transformers' float64 ones than 1.5× transformers' own float32 logits (on the same device), on the mean and on
    the per-token p99 — the bound the CPU's sequential float32 matmul broke (1.5–1.7× here, and 9–23× in an MoE
    whose near-tied routing flips experts) before `kernels.numerics` summed long contractions in blocks."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_jax.checkpoint.hf import model_from_params, params_from_tensors
    from gemma4_jax.config import PRESETS, Gemma4Config
    from gemma4_jax.testing.tiny import perturb_scales

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from bench_numerics import cut_config, errors

    case = EXACT_CASES[preset]
    raw = cut_config(PRESETS[preset], 1, EXACT_VOCAB, case.get("experts", 0))  # no KV-shared layer is left
    raw["layer_types"] = ["full_attention"]
    raw["intermediate_size"] = case.get("intermediate_size", raw["intermediate_size"])
    torch.manual_seed(0)
    hf = perturb_scales(Gemma4ForCausalLM(Gemma4TextConfig(**raw)).eval(), 1)
    hf.config._attn_implementation = "eager"
    hf.config._experts_implementation = "eager"  # torch's grouped_mm has no float64
    # Our weights through the loader's own name table and checks, from memory: writing and reading the 1 GB
    # checkpoint cost 25 s of the 31B case on CI's CPU (the loader's file path is tested with small checkpoints).
    cfg = Gemma4Config.from_hf_dict(hf.config.to_dict())
    params = params_from_tensors({k: v.numpy() for k, v in hf.state_dict().items()}, cfg, np.float32)
    model = api.Gemma4Model(model_from_params(cfg, params, np.float32), api.RunConfig(dtype="float32"))
    del params
    ids = np.random.default_rng(0).integers(3, EXACT_VOCAB, size=(1, EXACT_TOKENS))
    # transformers' float32 on the device ours runs on (a GPU's cuBLAS sums differ from the CPU's), TF32 off
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    from bench_common import torch_full_float32

    with torch.no_grad(), torch_full_float32():
        theirs = hf.to(device)(torch.as_tensor(ids, device=device)).logits.cpu().numpy()
        exact = hf.cpu().double()(torch.as_tensor(ids)).logits.numpy()  # float64 holds the float32 weights exactly
    del hf
    ours = np.asarray(model.logits(ids))
    t, o = errors(exact, theirs), errors(exact, ours)
    assert o["mean_rel"] <= 1.5 * t["mean_rel"] and o["token_p99"] <= 1.5 * t["token_p99"], (preset, o, t)
    assert o["top1"] == 1.0, (preset, o)


@pytest.mark.parametrize("preset", ["e2b", "31b"])
def test_rope_frequencies_are_transformers_to_the_bit(preset):
    """The RoPE inverse frequencies equal transformers' float32 buffers in all but at most one entry a layer type
    (one ulp), on any CPU: an angle error grows with the position (docs/architecture.md §8). NumPy's float32 `**`
    missed them in 19 of 128 entries on one machine."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    from gemma4_jax.config import PRESETS, Gemma4Config
    from gemma4_jax.model.text import rope_inv_freq

    cfg = Gemma4Config.from_hf_dict(PRESETS[preset])
    theirs = Gemma4TextRotaryEmbedding(Gemma4TextConfig(**PRESETS[preset]))
    for spec in {layer.attn_type: layer for layer in cfg.layers}.values():
        ref = getattr(theirs, f"{spec.attn_type}_inv_freq").numpy()
        ours = rope_inv_freq(spec)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert int((ours != ref).sum()) <= 1, (spec.attn_type, int((ours != ref).sum()))
        np.testing.assert_allclose(ours, ref, rtol=2e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_projections_of_one_input_stay_apart_on_a_gpu(monkeypatch, dtype):
    """On a GPU, XLA's dot merger would join the q/k/v (or gate/up) products of one normalised input into one wider
    cuBLAS product whose float32 sums are 2.5× further from exact than torch's (docs/performance.md, "The dot
    merger"): `norm_linears` hands a float32 model's products their input through one optimization barrier, so
    each has its own operand; 16-bit models keep XLA's merge. Each product is still rms_norm(x) @ w."""
    import jax.numpy as jnp

    from gemma4_jax.kernels import numerics
    from gemma4_jax.model.text import norm_linears

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    g = (1 + 0.2 * rng.standard_normal(64)).astype(np.float32)
    ws = [rng.standard_normal((64, n)).astype(np.float32) for n in (48, 32, 16)]
    args = [jnp.asarray(a, dtype) for a in (x, g, *ws)]

    def run(x, g, *ws):
        return norm_linears(x, g, 1e-6, list(ws), "xla")

    monkeypatch.setattr(numerics.jax, "default_backend", lambda: "cpu")  # whatever runs the test
    on_cpu = jax.make_jaxpr(run)(*args)
    monkeypatch.setattr(numerics.jax, "default_backend", lambda: "gpu")
    on_gpu = jax.make_jaxpr(lambda *a: run(*a))(*args)  # a new function: not the trace kept for the first

    barriers = [e for e in on_gpu.jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert "optimization_barrier" not in str(on_cpu)
    if dtype == "bfloat16":
        assert not barriers
        return
    assert len(barriers) == 1 and len(barriers[0].outvars) == len(ws)
    outs = [str(v) for v in barriers[0].outvars]
    assert len(set(outs)) == len(ws)  # each product its own operand (that they reach the dots: the GPU measured it)
    monkeypatch.setattr(numerics, "FLOAT32_APART", False)  # the bench's --float32-merged: XLA may merge them
    assert "optimization_barrier" not in str(jax.make_jaxpr(lambda *a: run(*a))(*args))
    normed = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * g
    with api.precision_scope("float32"):  # float32 at full precision on a GPU too, as a model's programs run it
        outs = jax.jit(run)(*args)
    for got, w in zip(outs, ws, strict=True):
        want = normed @ w
        assert np.abs(np.asarray(got, np.float64) - want).max() < 1e-5 * np.abs(want).max()


# The towers at their real widths, one or two layers, small inputs (a 70-token image, a 3 s clip); every
# projection's contraction is 768–4304 terms long. Without blocked sums on the CPU, ours was 1.5–1.9× transformers'
# float32 error on the max here (2.1× / 1.6× at the E2B vision tower's full 16 layers); with them 0.69–0.95× on the
# max and 0.85–0.88× on the mean (2026-12-07).
TOWER_CASES = {"vision-e2b": ("e2b", "vision", 1), "vision-31b": ("31b", "vision", 1), "audio-e2b": ("e2b", "audio", 2)}
# On a GPU the vision towers run whole, on three images of 280 tokens (`bench.py towers`' defaults): there only
# the attention's sum over keys is blocked, and one layer's projections, summed whole by the GPU, were 1.48× (E2B)
# and 1.95× (31B) transformers' max error on an H100, while the whole towers were 0.89× and 1.07× (docs/multimodal.md).
GPU_VISION = {"vision_layers": 0, "images": 3, "image_tokens": 280}


@pytest.mark.xdist_group("float64")
@pytest.mark.parametrize("case", list(TOWER_CASES))
def test_towers_float32_are_as_close_to_exact_as_transformers(case):
    """The vision and audio towers' float32 soft tokens are no further from transformers' float64 ones than 1.2×
    transformers' own float32, on the max and the mean (`bench.py towers`: perturbed norms, clip bounds that bite);
    on a GPU the vision towers whole (GPU_VISION)."""
    import argparse

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import bench_towers

    preset, tower, layers = TOWER_CASES[case]
    args = argparse.Namespace(preset=preset, towers=tower, vision_layers=layers, audio_layers=layers, images=1,
                              image_tokens=70, audio_seconds=3.0, tiny=False, seed=0, json=None)
    if tower == "vision" and jax.default_backend() == "gpu":
        vars(args).update(GPU_VISION)
    res = bench_towers.run(args)["towers"][tower]
    ratio = res["ours_over_transformers"]["f32"]
    assert ratio["max_rel"] <= 1.2 and ratio["mean_rel"] <= 1.2, (case, res["runs"])


@pytest.mark.parametrize("backends,blocked", [(("cpu",), False), (("cpu", "gpu"), True)])
def test_contractions_are_blocked_on_the_backends_named(monkeypatch, backends, blocked):
    """`numerics.contract` sums a long float32 contraction in blocks (a loop of ACC_BLOCK-term products) on the
    backends in BLOCKED_BACKENDS, and hands it whole to XLA elsewhere: on a GPU only when the bench asks for it
    (`bench.py towers --blocked-sums-on-gpu`). Either way the value is the product's; the knob keys the programs
    (`dispatch.settings`)."""
    from gemma4_jax.kernels import dispatch, numerics

    before = dispatch.settings()
    monkeypatch.setattr(numerics, "BLOCKED_BACKENDS", backends)
    assert (dispatch.settings() != before) == blocked  # a program traced under the knob is another program
    monkeypatch.setattr(numerics.jax, "default_backend", lambda: "gpu")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4 * numerics.ACC_BLOCK + 5)).astype(np.float32)
    b = rng.normal(size=(a.shape[1], 6)).astype(np.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, y: numerics.matmul(x, y))(a, b))  # a new function: no cached trace
    assert ("scan" in jaxpr or "while" in jaxpr) == blocked, jaxpr  # fori_loop: a scan at a static trip count
    with jax.default_matmul_precision("highest"):  # on a real GPU the default would be TF32
        got = np.asarray(numerics.matmul(a, b))
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,blocked", [(np.float32, True), ("bfloat16", False)])
def test_vision_attention_blocks_its_key_sum_on_a_gpu(monkeypatch, dtype, blocked):
    """On a GPU the vision attention's float32 sum over keys is blocked (`numerics.KEY_SUM_BACKENDS`; XLA's one
    product there carried the vision tower's whole float32 excess on an H100) while the other float32 contractions
    are not (BLOCKED_BACKENDS); bf16 is never blocked. The output is softmax(q·k) @ v all the same."""
    from gemma4_jax.kernels import numerics
    from gemma4_jax.model.vision import bidirectional_attention

    monkeypatch.setattr(numerics.jax, "default_backend", lambda: "gpu")
    rng = np.random.default_rng(1)
    b, p, n, s, h = 1, 5, 2, 3 * numerics.ACC_BLOCK + 7, 8
    q, k, v = (jax.numpy.asarray(rng.normal(size=shape), dtype) for shape in ((b, p, n, h), (b, s, 1, h), (b, s, 1, h)))
    valid = jax.numpy.asarray(np.arange(s)[None] < s - 3)
    with jax.default_matmul_precision("highest"):  # on a real GPU the default would be TF32
        jaxpr = str(jax.make_jaxpr(bidirectional_attention)(q, k, v, valid))
        got = np.asarray(bidirectional_attention(q, k, v, valid), np.float64)
    assert ("scan" in jaxpr or "while" in jaxpr) == blocked, jaxpr
    kt, vf = (x[0, :, 0].astype(np.float32) for x in (k, v))  # another float32 sum over the keys: left whole
    assert "scan" not in str(jax.make_jaxpr(numerics.matmul)(kt.T, vf))
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bpnh,bsh->bnps", q64, k64[:, :, 0])
    scores = np.where(np.asarray(valid)[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bnps,bsh->bpnh", probs / probs.sum(-1, keepdims=True), v64[:, :, 0])
    tol = 1e-5 if blocked else 3e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
