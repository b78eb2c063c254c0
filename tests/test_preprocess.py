"""gemma4_jax.multimodal.preprocess (numpy + Pillow) equals transformers' Gemma 4 preprocessing: the PIL image
processor, the audio feature extractor and Gemma4Processor's placeholder expansion,
all built offline with default args."""

import math
import wave

import numpy as np
import pytest

pytest.importorskip("transformers")
try:  # Pillow is not a declared dependency of gemma4-jax: without it only the audio tests run
    from PIL import Image
except ImportError:
    Image = None

from transformers import Gemma4Config, PreTrainedTokenizerFast  # noqa: E402
from transformers.models.gemma4 import (  # noqa: E402
    Gemma4AudioFeatureExtractor,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
)
from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size  # noqa: E402

from gemma4_jax.demo import demo_path  # noqa: E402
from gemma4_jax.errors import CheckpointError, ConfigError, Gemma4Error  # noqa: E402
from gemma4_jax.multimodal import preprocess as pp  # noqa: E402
from gemma4_jax.tokenizer import Tokenizer  # noqa: E402

SR = 16_000
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


def _gradient(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + y) / 9)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _images():
    """name -> an image in one of the accepted forms (PIL in several modes, uint8 arrays)."""
    rgba = np.concatenate([_gradient(150, 260, 3), np.linspace(0, 255, 260, dtype=np.uint8)[None, :, None]
                           .repeat(150, 0)], -1)
    return {
        "pil_224x224": Image.fromarray(_gradient(224, 224, 0)),
        "np_noise_480x640": np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "pil_97x1203": Image.fromarray(_gradient(97, 1203, 2)),
        "pil_grey_300x200": Image.fromarray(_gradient(300, 200, 4)[..., 0], mode="L"),
        "pil_rgba_150x260": Image.fromarray(rgba, mode="RGBA"),
        "np_rgba_150x260": rgba,
        "np_sliver_10x1500": _gradient(10, 1500, 5),  # budget 70: the "one row of pooled patches" branch
    }


IMAGES = _images() if Image is not None else {}


@pytest.fixture(scope="module")
def image_processor():
    return Gemma4ImageProcessorPil()


def _check_image(ours, ref):
    assert ours.pixel_values.shape == ref["pixel_values"].shape and ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours.image_position_ids, ref["image_position_ids"])
    assert ours.image_position_ids.dtype == ref["image_position_ids"].dtype
    assert list(ours.num_soft_tokens_per_image) == list(ref["num_soft_tokens_per_image"])


def _transformers_composites_alpha() -> bool:
    """Whether this transformers composites transparency onto white (its `convert_to_rgb` with `return_numpy`;
    5.25 does, 5.17 on the GPU machines keeps the colour channels of a PIL image and cannot read an RGBA array)."""
    import inspect

    from transformers.image_transforms import convert_to_rgb

    return "return_numpy" in inspect.signature(convert_to_rgb).parameters


@needs_pillow
@pytest.mark.parametrize("budget", [70, 280])
@pytest.mark.parametrize("name", list(IMAGES))
def test_image_matches_transformers(image_processor, name, budget):
    if "rgba" in name and not _transformers_composites_alpha():
        pytest.skip("this transformers drops an image's alpha (or refuses an RGBA array); ours composites it onto "
                    "white as transformers' convert_to_rgb(return_numpy=...) does")
    ref = image_processor([IMAGES[name]], max_soft_tokens=budget, return_tensors="np")
    ours = pp.preprocess_image(IMAGES[name], max_soft_tokens=budget)
    _check_image(ours, ref)
    assert ours.pixel_values.shape == (1, 9 * budget, 768)
    assert 0 < ours.num_soft_tokens_per_image[0] <= budget


@needs_pillow
def test_image_batch_and_path(image_processor, tmp_path):
    names = ["pil_224x224", "np_noise_480x640", "pil_97x1203"]
    ref = image_processor([IMAGES[n] for n in names], max_soft_tokens=140, return_tensors="np")
    _check_image(pp.preprocess_images([IMAGES[n] for n in names], 140), ref)
    # A file goes through transformers' load_image: EXIF rotation and convert('RGB'), which drops alpha.
    path = tmp_path / "rgba.png"
    IMAGES["pil_rgba_150x260"].save(path)
    ref = image_processor(image_processor.fetch_images(str(path)), return_tensors="np")
    _check_image(pp.preprocess_image(path), ref)
    assert not np.array_equal(pp.preprocess_image(path).pixel_values,
                              pp.preprocess_image(IMAGES["pil_rgba_150x260"]).pixel_values)
    # Mixed budgets are padded to the longest with the processor's fill values.
    mixed = pp.stack_images([pp.preprocess_image(IMAGES["pil_224x224"], 70), pp.preprocess_image(path, 140)])
    assert mixed.pixel_values.shape == (2, 1260, 768) and mixed.num_soft_tokens_per_image == (64, 120)
    assert (mixed.image_position_ids[0, 630:] == -1).all() and (mixed.pixel_values[0, 630:] == 0).all()


def test_resize_budget_logic_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (480, 640), (97, 1203), (1203, 97), (10, 1500), (1500, 10), (1, 1), (48, 48),
             (3000, 4000), (768, 1024)] + [tuple(s) for s in rng.integers(1, 2500, (150, 2))]
    for budget in pp.SOFT_TOKEN_BUDGETS:
        for h, w in sizes:
            ref = get_aspect_ratio_preserving_size(int(h), int(w), 16, budget * 9, 3)
            assert pp.resized_size(int(h), int(w), budget) == ref, (h, w, budget)
            assert pp.num_image_soft_tokens(int(h), int(w), budget) == (ref[0] // 16) * (ref[1] // 16) // 9


@needs_pillow
def test_image_errors():
    for bad in (0, 100, 281, 2240):
        with pytest.raises(ConfigError, match="max_soft_tokens must be one of"):
            pp.preprocess_image(IMAGES["pil_224x224"], bad)
    with pytest.raises(Gemma4Error, match="uint8"):
        pp.preprocess_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(Gemma4Error, match="does not exist"):
        pp.preprocess_image("/nonexistent/picture.png")


# ---------------------------------------------------------------------------------------------- audio


def _tone(seconds, freq=440.0, dtype=np.float32):
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(dtype)


def _long_clip():
    """31 s (past the 30 s cap) of a chirp plus noise, in float64 (the extractor casts to float32)."""
    t = np.arange(31 * SR) / SR
    return 0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t) + np.random.default_rng(0).normal(0, 0.05, t.shape)


@pytest.fixture(scope="module")
def feature_extractor():
    return Gemma4AudioFeatureExtractor()


def _check_audio(ours, ref):
    feats, mask = np.stack(ref["input_features"]), np.stack(ref["input_features_mask"])
    assert ours.input_features.shape == feats.shape and ours.input_features.dtype == np.float32
    np.testing.assert_allclose(ours.input_features, feats, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours.input_features_mask, mask)
    assert ours.input_features_mask.dtype == bool


@pytest.mark.parametrize("clip", ["tone_1.3s", "long_31s", "odd_12345"])
def test_audio_matches_transformers(feature_extractor, clip):
    wav = {"tone_1.3s": _tone(1.3), "long_31s": _long_clip(), "odd_12345": _tone(12345 / SR, 3000.0)}[clip]
    # A list: the processor's path (transformers 5.24 fails on a bare 1-D array).
    _check_audio(ours := pp.preprocess_audio(wav), feature_extractor([wav]))
    assert ours.num_soft_tokens_per_audio == (pp.num_audio_soft_tokens(len(wav)),)
    assert ours.num_soft_tokens_per_audio[0] == math.ceil(ours.input_features_mask[0].sum() / 4)


def test_audio_batch_and_wav(feature_extractor, tmp_path):
    clips = [_tone(1.3), _tone(5000 / SR, 1000.0), _tone(7.77, 220.0, np.float64)]
    _check_audio(ours := pp.preprocess_audio_batch(clips), feature_extractor(clips))
    assert ours.input_features.shape == (3, 777, 128)  # 7.77 s -> 124416 samples (128-multiple)
    assert ours.num_soft_tokens_per_audio == (33, 8, 194)
    assert pp.num_audio_soft_tokens(30 * SR) == pp.num_audio_soft_tokens(40 * SR) == 750

    pcm = np.round(_tone(2.05) * 32767).astype("<i2")
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(SR), f.writeframes(pcm.tobytes())
    _check_audio(pp.preprocess_audio(path), feature_extractor([pcm.astype(np.float32) / 32768.0]))

    with wave.open(str(tmp_path / "cd.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(44_100), f.writeframes(pcm.tobytes())
    with pytest.raises(ConfigError, match="16000 Hz"):
        pp.preprocess_audio(tmp_path / "cd.wav")
    with pytest.raises(ConfigError, match="16000 Hz"):
        pp.preprocess_audio(clips[0], sampling_rate=8000)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(SR), f.writeframes(pcm.tobytes())
    with pytest.raises(Gemma4Error, match="mono 16-bit"):
        pp.preprocess_audio(tmp_path / "stereo.wav")


# -------------------------------------------------------------------------------------------- prompts

MM_TOKENS = {"image_token": pp.IMAGE_TOKEN, "boi_token": pp.BOI_TOKEN, "eoi_token": pp.EOI_TOKEN,
             "audio_token": pp.AUDIO_TOKEN, "boa_token": pp.BOA_TOKEN, "eoa_token": pp.EOA_TOKEN}


def _write_tokenizer(path):
    """A character tokenizer.json with Gemma 4's special and multimodal tokens at their real ids."""
    from tokenizers import AddedToken, decoders
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<|turn>", 106: "<turn|>",
                pp.BOI_TOKEN_ID: pp.BOI_TOKEN, pp.IMAGE_TOKEN_ID: pp.IMAGE_TOKEN, pp.EOI_TOKEN_ID: pp.EOI_TOKEN,
                pp.BOA_TOKEN_ID: pp.BOA_TOKEN, pp.AUDIO_TOKEN_ID: pp.AUDIO_TOKEN, pp.EOA_TOKEN_ID: pp.EOA_TOKEN,
                pp.VIDEO_TOKEN_ID: pp.VIDEO_TOKEN}
    vocab = {tok: i for i, tok in specials.items()}
    vocab.update({ch: 200 + k for k, ch in enumerate(["\n"] + [chr(c) for c in range(32, 127)])})
    tok = HFTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return str(path)


class _OfflineProcessor(Gemma4Processor):
    """Gemma4Processor without a video processor class check (the video processor needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def processor_and_tokenizer(tmp_path_factory):
    from transformers.video_processing_utils import BaseVideoProcessor

    path = _write_tokenizer(tmp_path_factory.mktemp("mm_tok") / "tok")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json", bos_token="<bos>", eos_token="<eos>",
                                     pad_token="<pad>", unk_token="<unk>", extra_special_tokens=MM_TOKENS)
    proc = _OfflineProcessor(feature_extractor=Gemma4AudioFeatureExtractor(),
                             image_processor=Gemma4ImageProcessorPil(), tokenizer=hf_tok,
                             video_processor=BaseVideoProcessor())
    return proc, Tokenizer(path)


@needs_pillow
def test_constants_match_transformers(processor_and_tokenizer):
    proc, _ = processor_and_tokenizer
    cfg = Gemma4Config()
    assert (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id) == (pp.BOI_TOKEN_ID, pp.EOI_TOKEN_ID,
                                                                         pp.IMAGE_TOKEN_ID)
    assert (cfg.boa_token_id, cfg.eoa_token_index, cfg.audio_token_id, cfg.video_token_id) == (
        pp.BOA_TOKEN_ID, pp.EOA_TOKEN_ID, pp.AUDIO_TOKEN_ID, pp.VIDEO_TOKEN_ID)
    assert (proc.image_token_id, proc.audio_token_id, proc.video_token_id) == (
        pp.IMAGE_TOKEN_ID, pp.AUDIO_TOKEN_ID, pp.VIDEO_TOKEN_ID)
    assert (proc.video_token, proc.image_seq_length, proc.audio_seq_length) == (pp.VIDEO_TOKEN, 280, 750)


@needs_pillow
def test_prompt_matches_gemma4_processor(processor_and_tokenizer):
    proc, tok = processor_and_tokenizer
    text = tok.chat_prompt(f"Compare {pp.IMAGE_TOKEN} with{pp.IMAGE_TOKEN}, then hear {pp.AUDIO_TOKEN}.")
    images, clips = [IMAGES["pil_97x1203"], IMAGES["np_noise_480x640"]], [_tone(1.3)]
    ref = proc(text=[text], images=[images], audio=clips, images_kwargs={"max_soft_tokens": 140})
    ours = pp.prepare_multimodal(tok, text, images=images, audio=clips, max_soft_tokens=140)

    assert ours.input_ids.tolist() == ref["input_ids"][0]
    assert ours.mm_token_type_ids.tolist() == ref["mm_token_type_ids"][0]
    _check_image(ours.images, {**ref, "num_soft_tokens_per_image": ours.images.num_soft_tokens_per_image})
    _check_audio(ours.audio, ref)
    n_img, n_aud = ours.images.num_soft_tokens_per_image, ours.audio.num_soft_tokens_per_audio
    assert n_img == (123, 130) and n_aud == (33,)
    assert proc._compute_audio_num_tokens(clips[0], SR) == n_aud[0]
    # The id-level expansion and the string expansion agree with the processor too.
    ids = tok.encode(text, add_bos=False)
    assert pp.expand_placeholder_ids(ids, n_img, n_aud) == ref["input_ids"][0]
    expanded = pp.expand_placeholders(text, n_img, n_aud)
    assert expanded == proc.get_text_with_replacements(
        [text], [proc.replace_image_token({"num_soft_tokens_per_image": n_img}, i) for i in range(2)], [],
        [proc.replace_audio_token(ref, 0)])[0][0]
    assert expanded.count(pp.BOI_TOKEN + pp.IMAGE_TOKEN * 123 + pp.EOI_TOKEN) == 1


@needs_pillow
def test_prompt_errors(processor_and_tokenizer):
    _, tok = processor_and_tokenizer
    with pytest.raises(Gemma4Error, match=r"1 <\|image\|> placeholder\(s\) for 2 image"):
        pp.expand_placeholders(f"a {pp.IMAGE_TOKEN}", (3, 4))
    with pytest.raises(Gemma4Error, match=r"0 <\|audio\|> placeholder\(s\) for 1 clip"):
        pp.expand_placeholder_ids([2, 5], (), (7,))
    demo = Tokenizer(demo_path())  # text-only vocabulary
    with pytest.raises(CheckpointError, match="no <\\|image> at id 255999"):
        pp.prepare_multimodal(demo, f"<bos>{pp.IMAGE_TOKEN}", images=[IMAGES["pil_224x224"]])
