"""Soft tokens merged into the text model, against transformers' Gemma4ForConditionalGeneration.

transformers computes the image features (its own vision tower and `embed_vision`); our text model merges
them (placeholders embedded as pad, PLE's pad handling, row-major placement, bidirectional image blocks on
the sliding layers of 26B/31B-style models) and must give transformers' logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_fixtures import FAMILIES, rel_err

import gemma4_jax
from gemma4_jax.model.text import Multimodal, vision_blocks

pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")  # float32 products at full precision on a GPU too

IMAGE, BOI, EOI = 250, 251, 252
TOKENS = dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, audio_token_id=253, boa_token_id=254,
              eoa_token_index=255, video_token_id=249)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, patch_size=16, pooling_kernel_size=3, position_embedding_size=32)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 8],
             attention_chunk_size=4, attention_context_left=5, attention_context_right=0, output_proj_dims=40)
AUDIO_ID, BOA, EOA = 253, 254, 255
# Row 0: text, a 4-token image, text, a 2-token image, text. Row 1: text, a 4-token image, text.
ROWS = [[2, 10, 11, BOI, *[IMAGE] * 4, EOI, 12, BOI, *[IMAGE] * 2, EOI, 13],
        [2, 20, BOI, *[IMAGE] * 4, EOI, 21, 22, 23, 24, 25, 26, 27]]


def _images(seed: int):
    """Three images as the processor lays them out: [3, 36, 768] pixels in [0, 1], (x, y) patch positions
    [3, 36, 2] with (−1, −1) padding; 6×6, 3×6 (padded) and 6×6 patch grids -> 4, 2 and 4 soft tokens."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((3, 36, 768), dtype=np.float32)
    pos = np.full((3, 36, 2), -1, np.int64)
    for i, (rows, cols) in enumerate([(6, 6), (3, 6), (6, 6)]):
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        pos[i, : rows * cols] = np.stack([xx.ravel(), yy.ravel()], axis=-1)
        pixels[i, rows * cols:] = 0.0
    return pixels, pos


def _audio_attention_implementation() -> str:
    """The attention implementation under which this transformers' Gemma 4 audio layers read their mask the way it
    is made. 5.17 (the GPU machines') keeps where a boolean mask is True, sdpa's form: eager's additive mask comes
    out inverted there (1.02 relative error in the logits); 5.25 fills where the mask is non-zero, eager's additive
    form, and inverts sdpa's boolean one. Our tower agrees with transformers under the matching one, in both."""
    import inspect

    from transformers.models.gemma4 import modeling_gemma4

    return "sdpa" if "logical_not" in inspect.getsource(modeling_gemma4.Gemma4AudioAttention.forward) else "eager"


@pytest.fixture(scope="module", params=["e2b", "31b"])
def multimodal(request, tmp_path_factory):
    import torch
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    from gemma4_jax.testing.tiny import perturb_scales

    family = request.param
    text = dict(FAMILIES[family])
    if family == "31b":
        text["use_bidirectional_attention"] = "vision"
    torch.manual_seed(0)
    audio = Gemma4AudioConfig(**AUDIO) if family == "e2b" else None  # audio towers come with E2B/E4B only
    cfg = Gemma4Config(text_config=Gemma4TextConfig(**text), vision_config=Gemma4VisionConfig(**VISION),
                       audio_config=audio, **TOKENS)
    model = perturb_scales(Gemma4ForConditionalGeneration(cfg).eval(), 1)
    model.config._attn_implementation = "eager"
    if audio is not None:
        model.config.audio_config._attn_implementation = _audio_attention_implementation()
    path = str(tmp_path_factory.mktemp(f"mm_{family}"))
    model.save_pretrained(path)
    return family, model, path


def _hf(model, ids, pixels, pos):
    import torch

    with torch.no_grad():
        ids_t = torch.as_tensor(ids)
        logits = model(input_ids=ids_t, pixel_values=torch.as_tensor(pixels),
                       image_position_ids=torch.as_tensor(pos), mm_token_type_ids=(ids_t == IMAGE).long(),
                       use_cache=False).logits
        feats = model.model.get_image_features(torch.as_tensor(pixels), torch.as_tensor(pos)).pooler_output
    return logits.float().numpy(), torch.cat(list(feats), dim=0).float().numpy()


def _hf_text(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), use_cache=False).logits.float().numpy()


def soft_tokens(ids: np.ndarray, features: np.ndarray) -> Multimodal:
    is_image = ids == IMAGE
    slots = np.where(is_image, np.cumsum(is_image.ravel()).reshape(ids.shape) - 1, -1).astype(np.int32)
    return Multimodal(features, slots, vision_blocks(is_image))


def test_merged_images_give_transformers_logits(multimodal):
    import jax.numpy as jnp

    from gemma4_jax.api import _logits

    family, model, path = multimodal
    ids = np.asarray(ROWS, np.int64)
    pixels, pos = _images(0)
    want, features = _hf(model, ids, pixels, pos)
    assert features.shape[0] == int((ids == IMAGE).sum())
    m = gemma4_jax.load(path, dtype="float32", progress=False)
    assert m.config.bidirectional_vision == (family == "31b")
    mm = soft_tokens(ids, features)
    got = np.asarray(_logits(m.graphdef, m.state, jnp.asarray(ids, jnp.int32), "xla", mm))
    assert rel_err(got, want) <= 1e-4  # the float32 bound of test_parity.py
    # The merge matters: text-only logits at the image positions are far off.
    plain = m.logits(ids)
    assert rel_err(plain, want) > 1e-2
    if family == "31b":  # the image tokens see their block's later tokens on sliding layers
        causal = Multimodal(mm.features, mm.slots, np.full_like(mm.blocks, -1))
        m_causal = np.asarray(_logits(m.graphdef, m.state, jnp.asarray(ids, jnp.int32), "xla", causal))
        first = int(np.argmax(ids[0] == IMAGE))
        assert rel_err(m_causal[0, first], want[0, first]) > 1e-3


def _add_media_tokens(path: str) -> None:
    """A character tokenizer whose ids 249-255 are the multimodal specials of TOKENS."""
    import json
    import os

    from gemma4_jax.testing.tiny import write_char_tokenizer

    write_char_tokenizer(path)
    names = {IMAGE: "<|image|>", BOI: "<|image>", EOI: "<image|>", 253: "<|audio|>", 254: "<|audio>",
             255: "<audio|>", 249: "<|video|>"}
    f = os.path.join(path, "tokenizer.json")
    with open(f) as fh:
        tok = json.load(fh)
    vocab = tok["model"]["vocab"]
    for i, name in names.items():
        old = next(k for k, v in vocab.items() if v == i)
        del vocab[old]
        vocab[name] = i
        tok["added_tokens"].append({"id": i, "content": name, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    with open(f, "w") as fh:
        json.dump(tok, fh)


def test_towers_and_generate_text_with_an_image(multimodal, tmp_path):
    """Our vision tower + merge give transformers' logits; generate_text runs an image prompt end to end,
    and its greedy tokens equal transformers' greedy generation on the same expanded prompt."""
    import jax.numpy as jnp
    import torch

    from gemma4_jax.api import _logits
    from gemma4_jax.multimodal.preprocess import preprocess_images
    from gemma4_jax.multimodal.towers import soft_tokens as place

    family, model, path = multimodal
    m = gemma4_jax.load(path, dtype="float32", progress=False)
    assert m.towers is not None and m.towers.vision is not None and m.towers.ids.image == IMAGE
    rng = np.random.default_rng(1)
    picture = (rng.random((61, 90, 3)) * 255).astype(np.uint8)
    feats, counts = m.towers.image_features([picture], max_soft_tokens=70)
    inp = preprocess_images([picture], 70)
    ids = np.asarray([[2, 10, BOI, *[IMAGE] * counts[0], EOI, 11, 12]], np.int64)
    with torch.no_grad():
        ids_t = torch.as_tensor(ids)
        want = model(input_ids=ids_t, pixel_values=torch.as_tensor(inp.pixel_values),
                     image_position_ids=torch.as_tensor(inp.image_position_ids),
                     mm_token_type_ids=(ids_t == IMAGE).long(), use_cache=False).logits.float().numpy()
    got = np.asarray(_logits(m.graphdef, m.state, jnp.asarray(ids, jnp.int32), "xla",
                             place(ids, feats, None, m.towers.ids)))
    assert rel_err(got, want) <= 1e-4

    _add_media_tokens(path)
    m = gemma4_jax.load(path, dtype="float32", progress=False)
    text = m.generate_text("What is in <|image|>?", images=[picture], max_soft_tokens=70, chat=False,
                           max_new_tokens=6, stop_tokens=())
    assert isinstance(text[0], str)
    prompt = [*m.tokenizer.encode("What is in "), BOI, *[IMAGE] * counts[0], EOI,
              *m.tokenizer.encode("?", add_bos=False)]
    with torch.no_grad():
        ids_t = torch.as_tensor([prompt])
        ref = model.generate(input_ids=ids_t, pixel_values=torch.as_tensor(inp.pixel_values),
                             image_position_ids=torch.as_tensor(inp.image_position_ids),
                             mm_token_type_ids=(ids_t == IMAGE).long(), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False)[0, len(prompt):].tolist()
    assert m.tokenizer.decode(ref) == text[0]
    if family == "e2b":  # messages with an image part: the chat format places the marker (one family is enough)
        parts = [{"role": "user", "content": [{"type": "text", "text": "What is in"}, {"type": "image"},
                                              {"type": "text", "text": "?"}]}]
        kw = dict(images=[picture], max_soft_tokens=70, max_new_tokens=4, stop_tokens=())
        assert m.generate_text([parts], **kw) == m.generate_text("What is in<|image|>?", **kw)
        with pytest.raises(gemma4_jax.ConfigError, match="render 1 image and 0 audio markers for 2 image"):
            m.generate_text([parts], **dict(kw, images=[picture, picture]))


def test_cli_answers_about_an_image(multimodal, tmp_path):
    """`python -m gemma4_jax.generate --image` end to end on the small random checkpoint (a real PNG file),
    equal to `generate_text`; a missing image is one sentence and exit status 1."""
    import os
    import subprocess
    import sys

    from PIL import Image

    family, _, path = multimodal
    if family != "e2b":
        pytest.skip("one family is enough for the command line")
    _add_media_tokens(path)
    png = str(tmp_path / "picture.png")
    Image.fromarray((np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8)).save(png)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "gemma4_jax.generate", "--model", path, "--image", png, "--image-tokens", "70",
           "--prompt", "What is in this picture?", "--max-new-tokens", "5", "--dtype", "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr
    m = gemma4_jax.load(path, dtype="float32", progress=False)
    want = m.generate_text("What is in this picture?", images=[png], max_soft_tokens=70, max_new_tokens=5)[0]
    assert run.stdout.rstrip("\n") == want and want
    bad = subprocess.run(cmd[:6] + [str(tmp_path / "missing.png")] + cmd[7:], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr


def test_audio_tower_and_merge_give_transformers_logits(multimodal):
    """A synthetic tone through our feature extractor, audio tower and merge equals transformers' forward."""
    import jax.numpy as jnp
    import torch

    from gemma4_jax.api import _logits
    from gemma4_jax.multimodal.preprocess import preprocess_audio
    from gemma4_jax.multimodal.towers import soft_tokens as place

    family, model, path = multimodal
    if family != "e2b":
        pytest.skip("audio towers belong to E2B/E4B")
    m = gemma4_jax.load(path, dtype="float32", progress=False)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(9000) / 16000)).astype(np.float32)
    feats, counts = m.towers.audio_features([tone])
    inp = preprocess_audio(tone)
    ids = np.asarray([[2, 10, BOA, *[AUDIO_ID] * counts[0], EOA, 11, 12]], np.int64)
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(ids), input_features=torch.as_tensor(inp.input_features),
                     input_features_mask=torch.as_tensor(inp.input_features_mask), use_cache=False).logits.numpy()
    got = np.asarray(_logits(m.graphdef, m.state, jnp.asarray(ids, jnp.int32), "xla",
                             place(ids, None, feats, m.towers.ids)))
    assert rel_err(got, want) <= 1e-4
    assert rel_err(m.logits(ids), want) > 1e-2  # the audio matters


@pytest.mark.parametrize("pp", [2, 3])
def test_pipelined_soft_tokens_give_transformers_logits(multimodal, pp):
    """The towers run on the first device, the features enter on the first stage (every split), and the
    pipeline gives transformers' logits (text+image; bidirectional blocks on 31B-like stages) and pp=1's
    greedy tokens."""
    from gemma4_jax.multimodal.towers import soft_tokens as place

    family, model, path = multimodal
    if (family, pp) not in (("e2b", 2), ("31b", 3)):
        pytest.skip("two splits keep the test short: E2B-like in two stages, 31B-like in three")
    ids = np.asarray(ROWS, np.int64)
    pixels, pos = _images(0)
    want, features = _hf(model, ids, pixels, pos)
    one = gemma4_jax.load(path, dtype="float32", progress=False)
    m = gemma4_jax.load(path, pp=pp, dtype="float32", progress=False)
    assert m.towers is not None and m.pipeline is not None
    mm = place(ids, features, None, m.towers.ids)
    assert rel_err(m.logits(ids, mm), want) <= 1e-4
    text_ids = np.asarray([[2, 30, 31, 32, 33, 34, 35]], np.int64)  # text only, same checkpoint
    assert rel_err(m.logits(text_ids), _hf_text(model, text_ids)) <= 1e-4
    if m.towers.audio is not None:  # text + audio through the stages
        import torch

        from gemma4_jax.multimodal.preprocess import preprocess_audio

        tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(7000) / 16000)).astype(np.float32)
        feats, counts = m.towers.audio_features([tone])
        inp = preprocess_audio(tone)
        aids = np.asarray([[2, 10, BOA, *[AUDIO_ID] * counts[0], EOA, 11]], np.int64)
        with torch.no_grad():
            awant = model(input_ids=torch.as_tensor(aids), input_features=torch.as_tensor(inp.input_features),
                          input_features_mask=torch.as_tensor(inp.input_features_mask)).logits.numpy()
        assert rel_err(m.logits(aids, place(aids, None, feats, m.towers.ids)), awant) <= 1e-4

    def soft(t):
        padded = np.zeros((len(ROWS), t), np.int64)
        padded[:, :ids.shape[1]] = ids
        return place(padded, features, None, m.towers.ids)

    prompts = [list(r) for r in ROWS]
    assert m.generate(prompts, max_new_tokens=6, stop_tokens=(), soft_tokens=soft) == \
        one.generate(prompts, max_new_tokens=6, stop_tokens=(), soft_tokens=soft)


@pytest.mark.devices(2)
def test_converter_keeps_the_towers_on_the_first_stage(multimodal, tmp_path):
    """A converted multimodal checkpoint: the towers sit beside stage 0 only (not in any stage's leaves),
    load with the stages, and give the HF directory's features and logits exactly."""
    import json
    import os

    from gemma4_jax.checkpoint.staged import convert
    from gemma4_jax.multimodal.towers import soft_tokens as place

    family, _, path = multimodal
    if family != "31b":
        pytest.skip("one family is enough for the converter")
    out = str(tmp_path / "stages")
    convert(path, out, pp=2, dtype="float32", progress=False)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["towers"]["stage"] == 0 and os.path.isfile(os.path.join(out, manifest["towers"]["file"]))
    hf = gemma4_jax.load(path, pp=2, dtype="float32", progress=False)
    conv = gemma4_jax.load(out, pp=2, dtype="float32", progress=False)
    pixels = (np.random.default_rng(3).random((40, 40, 3)) * 255).astype(np.uint8)
    f_hf, n_hf = hf.towers.image_features([pixels], 70)
    f_conv, n_conv = conv.towers.image_features([pixels], 70)
    assert n_hf == n_conv and np.array_equal(np.asarray(f_hf), np.asarray(f_conv))
    ids = np.asarray([[2, 10, BOI, *[IMAGE] * n_hf[0], EOI, 11]], np.int64)
    mm = place(ids, f_hf, None, hf.towers.ids)
    assert np.array_equal(hf.logits(ids, mm), conv.logits(ids, mm))
