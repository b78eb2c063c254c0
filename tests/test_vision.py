"""The vision tower + embed_vision against transformers' Gemma4Model.get_image_features, in float32 and bf16."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma4_jax import api
from gemma4_jax.errors import CheckpointError, ConfigError
from gemma4_jax.model.vision import VisionConfig, image_features, load_vision, num_soft_tokens

F32_BOUND = 1e-5

TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0,
            layer_types=["full_attention"])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
              patch_size=16, pooling_kernel_size=3, position_embedding_size=128)
CASES = {
    # Plain tower (E2B-like minus the clipping), MHA, transformers' default SDPA attention.
    "plain": dict(VISION, num_key_value_heads=4),
    # Clipped linears with finite bounds that bite, standardisation, GQA, eager attention.
    "clipped_std": dict(VISION, num_key_value_heads=2, use_clipped_linears=True, standardize=True),
}
# (height, width) of the synthetic images; all pad to the 70-soft-token budget (630 patches).
IMAGE_SIZES = {"plain": [(90, 130), (40, 220)], "clipped_std": [(90, 130), (20, 300), (200, 200)]}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_model(case: str, seed: int):
    """A float32 Gemma4ForConditionalGeneration with every norm, position table and std buffer perturbed."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma4Config(text_config=TEXT, vision_config=CASES[case], audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    if case == "clipped_std":
        model.model.vision_tower.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name and ("norm" in name or "position_embedding" in name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("std_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(1 + 0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith(("input_min", "input_max", "output_min", "output_max")):
                # Finite bounds that clip roughly a tenth of the inputs/outputs of every linear.
                sign = -1 if name.endswith("min") else 1
                b.fill_(sign * (1.5 if "input" in name else 0.2) * (1 + 0.1 * torch.rand((), generator=g).item()))
    return model


def _images(case: str):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES[case]]
    out = Gemma4ImageProcessorPil(max_soft_tokens=70)(imgs, return_tensors="np")
    pad = np.all(out["image_position_ids"] == -1, axis=-1).sum(-1)
    assert (pad > 0).all(), "every image should carry padding patches"
    return out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"]


def _hf_features(model, pv, pos) -> np.ndarray:
    """What Gemma4Model.forward scatters into the text: the per-image pooler outputs, concatenated."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(pos))
        return torch.cat(out.pooler_output).float().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    model = _hf_model(name, seed=len(name))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = VisionConfig.from_hf(model.config.to_dict())
    return name, model, state, cfg, _images(name)


def test_float32_matches_transformers(case):
    name, hf, state, cfg, (pv, pos, per_image) = case
    ref = _hf_features(hf, pv, pos)
    assert ref.shape == (per_image.sum(), TEXT["hidden_size"])
    with api.precision_scope("float32"):  # full float32 on a GPU too (JAX's default there is TF32), as the API runs it
        ours = image_features(load_vision(state, cfg), pv, pos)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    err = rel_err(ours, ref)
    assert err <= F32_BOUND, f"{name}: max|Δ|/max|ref| = {err:.2e}"
    if cfg.use_clipped_linears:  # the bounds must actually change the result, or the case tests nothing
        unclipped = copy.deepcopy(hf)
        with torch.no_grad():
            for n, b in unclipped.named_buffers():
                if n.endswith(("_min", "_max")):
                    b.fill_(float("inf") if n.endswith("max") else -float("inf"))
        assert rel_err(_hf_features(unclipped, pv, pos), ref) > 1e-2


def test_bfloat16_close_to_transformers_bfloat16(case):
    name, hf, state, cfg, (pv, pos, _) = case
    ref32 = _hf_features(hf, pv, pos)
    ref16 = _hf_features(copy.deepcopy(hf).to(torch.bfloat16), pv, pos)
    ours = image_features(load_vision(state, cfg, jnp.bfloat16), pv, pos)
    assert ours.dtype == jnp.bfloat16
    # Within a bf16 rounding or two of transformers' own bf16 result, and no worse against float32.
    assert rel_err(ours, ref16) <= 2e-2
    assert rel_err(ours, ref32) <= 1.5 * rel_err(ref16, ref32) + 5e-3


def test_traceable_with_static_token_count_and_padded_form(case):
    _, _, state, cfg, (pv, pos, per_image) = case
    model = load_vision(state, cfg)
    n = num_soft_tokens(pos, cfg.pooling_kernel_size)
    assert n == per_image.sum()
    eager = image_features(model, pv, pos)
    jitted = jax.jit(lambda p, q: image_features(model, p, q, num_tokens=n))(pv, pos)
    # Closing over the weights lets XLA fold constants, so agreement is to float32 rounding, not bitwise.
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=1e-6)
    padded, valid = model(jnp.asarray(pv), jnp.asarray(pos))
    assert padded.shape == (len(pv), pv.shape[1] // 9, TEXT["hidden_size"])
    np.testing.assert_array_equal(np.asarray(valid).sum(-1), per_image)
    np.testing.assert_allclose(np.asarray(padded)[np.asarray(valid)], np.asarray(eager), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_projections_of_one_input_stay_apart_on_a_gpu(case, monkeypatch, dtype):
    """Each layer's q/k/v and gate/up take their input through `numerics.unmerged` (float32 on a GPU: XLA would merge
    them into one wider, less exact product; tests/test_numerics.py has the text model's): a barrier a group a
    layer on a GPU for float32, none for bf16 and none on the CPU."""
    from hf_fixtures import barriers_by_backend

    from gemma4_jax.model import vision

    _, _, state, cfg, (pv, pos, _) = case
    model = load_vision(state, cfg, dtype)
    n = num_soft_tokens(pos, cfg.pooling_kernel_size)
    counts = barriers_by_backend(
        monkeypatch, lambda: str(jax.make_jaxpr(lambda p, q: image_features(model, p, q, num_tokens=n))(pv, pos)),
        vision._image_features)
    assert counts == {"cpu": 0, "gpu": 2 if dtype == jnp.float32 else 0}, counts  # layers are scanned


def test_missing_or_misshaped_tensor_is_one_clear_error(case):
    _, _, state, cfg, _ = case
    name = "model.vision_tower.encoder.layers.1.self_attn.k_norm.weight"
    with pytest.raises(CheckpointError, match=r"lacks vision tensor .*layers\.1\.self_attn\.k_norm\.weight$"):
        load_vision({k: v for k, v in state.items() if k != name}, cfg)
    bad = dict(state, **{name: np.ones(cfg.head_dim + 1, np.float32)})
    with pytest.raises(CheckpointError, match=r"k_norm\.weight has shape \[17\], expected \[16\]"):
        load_vision(bad, cfg)
    extra = dict(state, **{"model.vision_tower.encoder.layers.9.mlp.up_proj.linear.weight": state[name]})
    with pytest.raises(CheckpointError, match="unexpected vision tensor"):
        load_vision(extra, cfg)


def test_config_needs_the_text_width():
    with pytest.raises(ConfigError, match="text_hidden_size"):
        VisionConfig.from_hf(CASES["plain"])
    cfg = VisionConfig.from_hf(CASES["plain"], text_hidden_size=48)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.use_clipped_linears, cfg.text_hidden_size) == (4, 100.0, False, 48)
