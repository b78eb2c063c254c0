"""The audio tower and `embed_audio` against transformers' `Gemma4Model.get_audio_features` (float32).

Small random `Gemma4ForConditionalGeneration`s with an audio tower: chunks of 3–4 soft tokens so that
several blocks and their left (and right) context are exercised, every norm weight, `per_dim_scale`
and the output bias perturbed away from their init, and a batch whose second clip is shorter (its
padding frames hold garbage, which the masks must hide).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma4_jax import api  # noqa: E402
from gemma4_jax.errors import CheckpointError  # noqa: E402
from gemma4_jax.model.audio import (  # noqa: E402
    AudioConfig,
    audio_features,
    audio_soft_tokens,
    load_audio,
    merge_audio_tokens,
    num_soft_tokens,
)

N_MELS, FRAMES, SHORT = 16, 50, 29  # 16 mel bins fit channels (16, 8): ceil(ceil(16/2)/2) = 16 // 4

CASES = {
    # Real-model ratios (W//2 = max_past), plain linears.
    "plain": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 8],
                  attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
                  use_clipped_linears=False, output_proj_dims=40),
    # Right context, W//2 ≠ max_past, finite clip bounds, active gradient clamps, other eps/act/kernel/weight.
    "clipped": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, subsampling_conv_channels=[16, 8],
                    attention_chunk_size=3, attention_context_left=4, attention_context_right=2,
                    use_clipped_linears=True, gradient_clipping=2.5, rms_norm_eps=1e-4, conv_kernel_size=3,
                    residual_weight=0.7, hidden_act="gelu_pytorch_tanh", output_proj_dims=24),
}


def build_hf(case: str, seed: int = 0):
    """A float32 Gemma4ForConditionalGeneration (tiny text model, no vision) with the audio tower of `case`."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    text = Gemma4TextConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, global_head_dim=8, intermediate_size=16,
                            hidden_size_per_layer_input=0, layer_types=["full_attention"])
    audio = Gemma4AudioConfig(initializer_range=0.1, **CASES[case])
    model = Gemma4ForConditionalGeneration(
        Gemma4Config(text_config=text.to_dict(), audio_config=audio.to_dict(), vision_config=None)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    rand = lambda t, scale: scale * torch.randn(t.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for name, t in model.model.audio_tower.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight"):
                t.copy_(1.0 + rand(t, 0.1))
            elif name.endswith(("per_dim_scale", "output_proj.bias")):
                t.copy_(rand(t, 0.3))
            elif name.endswith(("input_min", "output_min")):  # bounds that clamp part of the values
                t.fill_(-(0.4 + 0.4 * float(torch.rand((), generator=g))))
            elif name.endswith(("input_max", "output_max")):
                t.fill_(0.4 + 0.4 * float(torch.rand((), generator=g)))
    return model


def inputs(seed: int = 0):
    """Log-mel-like features [2, T, F] and a mask whose second clip ends early (garbage after it)."""
    rng = np.random.default_rng(seed)
    feats = (rng.standard_normal((2, FRAMES, N_MELS)) * 2.0 - 4.0).astype(np.float32)
    mask = np.ones((2, FRAMES), bool)
    mask[1, SHORT:] = False
    return feats, mask


def hf_reference(model, feats, mask):
    with torch.no_grad():
        out = model.model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask), return_dict=True)
    return out.pooler_output.float().numpy(), out.attention_mask.numpy()


def ours(model, dtype=jnp.float32):
    cfg = AudioConfig.from_hf(model.config.to_dict())
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return load_audio(cfg, sd, dtype)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_models():
    return {case: build_hf(case, seed=i) for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_audio_features_match_transformers(hf_models, case):
    model = hf_models[case]
    feats, mask = inputs()
    ref, ref_mask = hf_reference(model, feats, mask)
    np.testing.assert_array_equal(ref_mask, mask[:, ::4])  # output frame t' is valid iff input frame 4t' is
    assert ref.shape == (2, -(-FRAMES // 4), 24)

    with api.precision_scope("float32"):  # full float32 on a GPU too (JAX's default there is TF32), as the API runs it
        audio = ours(model)
        got, got_mask = audio_features(audio, feats, mask)
        np.testing.assert_array_equal(np.asarray(got_mask), ref_mask)
        assert rel_err(got, ref) <= 1e-5, rel_err(got, ref)  # every row, padding rows included

        # What Gemma4Model.forward scatters: the valid rows, clip by clip.
        tokens = audio_soft_tokens(audio, feats, mask)
        assert tokens.shape == (int(num_soft_tokens(mask).sum()), 24)
        assert rel_err(tokens, ref[ref_mask]) <= 1e-5

        # More padding frames (a bigger jit bucket) leave the valid rows unchanged.
        pad = 14
        feats2 = np.concatenate([feats, np.full((2, pad, N_MELS), 7.0, np.float32)], axis=1)
        mask2 = np.concatenate([mask, np.zeros((2, pad), bool)], axis=1)
        assert rel_err(audio_soft_tokens(audio, feats2, mask2), ref[ref_mask]) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_projections_of_one_input_stay_apart_on_a_gpu(hf_models, monkeypatch, dtype):
    """Each layer's q/k/v take their input through `numerics.unmerged` (float32 on a GPU: XLA would merge them into
    one wider, less exact product; tests/test_numerics.py has the text model's): barriers on a GPU for float32,
    none for bf16 and none on the CPU."""
    from hf_fixtures import barriers_by_backend

    from gemma4_jax.model import audio as audio_module

    audio = ours(hf_models[list(CASES)[0]], dtype)
    feats, mask = inputs()
    counts = barriers_by_backend(
        monkeypatch, lambda: str(jax.make_jaxpr(lambda f, m: audio_features(audio, f, m))(feats, mask)),
        audio_module._features)
    assert counts["cpu"] == 0 and (counts["gpu"] > 0) == (dtype == jnp.float32), counts


def test_clip_bounds_are_active(hf_models):
    """The finite bounds of the 'clipped' case change transformers' output (so the parity test covers them)."""
    model = hf_models["clipped"]
    feats, mask = inputs()
    ref, _ = hf_reference(model, feats, mask)
    with torch.no_grad():
        saved = {}
        for name, t in model.named_buffers():
            if name.endswith(("_min", "_max")):
                saved[name] = t.clone()
                t.fill_(float("-inf") if name.endswith("_min") else float("inf"))
        unclipped, _ = hf_reference(model, feats, mask)
        for name, t in model.named_buffers():
            if name in saved:
                t.copy_(saved[name])
    assert rel_err(unclipped, ref) > 1e-2


def test_bfloat16_close_to_transformers(hf_models):
    """bf16 parameters and activations (attention internals float32 on both sides): loose agreement."""
    import copy

    model = copy.deepcopy(hf_models["plain"]).to(torch.bfloat16)
    feats, mask = inputs()
    with torch.no_grad():
        out = model.model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask), return_dict=True)
    ref = out.pooler_output.float().numpy()
    cfg = AudioConfig.from_hf(model.config.to_dict())
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    got, got_mask = audio_features(load_audio(cfg, sd, jnp.bfloat16), feats, mask)
    assert got.dtype == jnp.bfloat16
    valid = np.asarray(got_mask)
    err = rel_err(np.asarray(got, np.float32)[valid], ref[valid])
    assert err < 3e-2, err


def test_merge_matches_masked_scatter():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((2, 5, 3)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    embeds = rng.standard_normal((2, 6, 3)).astype(np.float32)
    place = np.zeros((2, 6), bool)
    place[0, 1:4] = place[1, 0:4] = True  # 7 placeholders for 7 valid tokens, split across rows
    want = torch.from_numpy(embeds).masked_scatter(torch.from_numpy(place)[..., None].expand(2, 6, 3),
                                                   torch.from_numpy(audio[valid])).numpy()
    got = jax.jit(merge_audio_tokens)(embeds, place, audio, valid)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_missing_or_misshaped_tensor_is_a_clear_error(hf_models):
    model = hf_models["clipped"]
    cfg = AudioConfig.from_hf(model.config.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    gone = "model.audio_tower.layers.1.self_attn.relative_k_proj.weight"
    with pytest.raises(CheckpointError, match=f"lacks audio tensor {gone}"):
        load_audio(cfg, {k: v for k, v in sd.items() if k != gone})
    bound = "model.audio_tower.layers.0.lconv1d.linear_end.output_max"
    with pytest.raises(CheckpointError, match=f"lacks audio tensor {bound}"):
        load_audio(cfg, {k: v for k, v in sd.items() if k != bound})
    bad = "model.embed_audio.embedding_projection.weight"
    with pytest.raises(CheckpointError, match=rf"{bad} has shape \[24, 23\], expected \[24, 24\]"):
        load_audio(cfg, {**sd, bad: sd[bad][:, :-1]})
    with pytest.raises(CheckpointError, match="unexpected audio tensor model.audio_tower.extra"):
        load_audio(cfg, {**sd, "model.audio_tower.extra": np.zeros(1)})


def test_config_from_hf_forms(hf_models):
    full = hf_models["plain"].config.to_dict()
    cfg = AudioConfig.from_hf(full)
    assert cfg == AudioConfig.from_hf(full["audio_config"], text_hidden_size=24)
    assert (cfg.text_hidden_size, cfg.context_size, cfg.num_rel_positions, cfg.proj_in) == (24, 8, 5, 32)
    assert hash(cfg) == hash(AudioConfig.from_hf(full))


def test_real_config_shapes_and_parameter_count():
    """The default (E2B/E4B) audio config: same parameter count as transformers, 30 s → 750 soft tokens."""
    from flax import nnx
    from transformers import Gemma4AudioConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    from gemma4_jax.model.audio import Gemma4Audio

    hf_cfg = Gemma4AudioConfig()
    with torch.device("meta"):
        n_hf = sum(v.numel() for v in Gemma4AudioModel(hf_cfg).state_dict().values())
    cfg = AudioConfig.from_hf(hf_cfg.to_dict(), text_hidden_size=1536)  # E2B's text width
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma4Audio(cfg, jnp.bfloat16, nnx.Rngs(0))))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert n_ours == n_hf + 1536 * 1536  # + embed_audio's projection
    out, valid = jax.eval_shape(lambda s, f, m: nnx.merge(graphdef, s)(f, m), state,
                                jax.ShapeDtypeStruct((2, 3000, 128), jnp.float32),
                                jax.ShapeDtypeStruct((2, 3000), bool))
    assert (out.shape, out.dtype, valid.shape) == ((2, 750, 1536), jnp.bfloat16, (2, 750))
