"""Image, audio and prompt preprocessing for Gemma 4, with numpy and Pillow only (no torch).

Owns what transformers' `Gemma4ImageProcessorPil`, `Gemma4AudioFeatureExtractor` and `Gemma4Processor`
hand the model (docs/architecture.md §5), reproduced to the same numbers:

- images: aspect-preserving bicubic resize (Pillow) to the largest size whose sides are multiples of
  48 px (16-px patches pooled 3×3) within the soft-token budget, pixels scaled to [0, 1] (the model
  does `2x-1` itself), 16×16×3 patches, (x, y) patch positions, padding to the budget's patch count;
- audio: 16 kHz waveform → 128-bin log-mel (20 ms Hann frames, 10 ms hop, semicausal left padding,
  HTK mel 0–8 kHz), the validity mask per frame, the 30 s cap and the 128-sample batch padding;
- prompts: each `<|image|>` / `<|audio|>` placeholder becomes begin token + N soft-token
  placeholders + end token, and the token ids carry the processor's modality type ids.

Dimension legend: B items, P patches (budget·9), C = 16·16·3 = 768 patch values, T mel frames, F = 128.
Pillow is imported only by the image functions; audio and prompts need numpy alone.
"""

from __future__ import annotations

import math
import os
import re
import wave
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..errors import CheckpointError, ConfigError, Gemma4Error

# Placeholder strings and ids of the Gemma 4 vocabulary (docs/architecture.md §4; transformers' Gemma4Config).
BOI_TOKEN, BOI_TOKEN_ID = "<|image>", 255_999
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<|image|>", 258_880
EOI_TOKEN, EOI_TOKEN_ID = "<image|>", 258_882
BOA_TOKEN, BOA_TOKEN_ID = "<|audio>", 256_000
AUDIO_TOKEN, AUDIO_TOKEN_ID = "<|audio|>", 258_881
EOA_TOKEN, EOA_TOKEN_ID = "<audio|>", 258_883
VIDEO_TOKEN, VIDEO_TOKEN_ID = "<|video|>", 258_884
# `mm_token_type_ids` values of Gemma4Processor: only the placeholders are typed, not begin/end tokens.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE, AUDIO_TYPE = 0, 1, 2, 3

# Vision front end (Gemma4ImageProcessor defaults).
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
PATCH_SIZE, POOLING_KERNEL = 16, 3

# Audio front end (Gemma4AudioFeatureExtractor defaults).
SAMPLING_RATE = 16_000
FRAME_LENGTH, HOP_LENGTH, FFT_LENGTH = 320, 160, 512  # 20 ms, 10 ms, next power of two
NUM_MEL_BINS, MEL_FLOOR = 128, 1e-3
MAX_AUDIO_SAMPLES, AUDIO_PAD_MULTIPLE = 480_000, 128  # 30 s cap; batch length rounded up to 128 samples


# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageInput:
    """Vision inputs for B images, named and laid out as transformers' image processor returns them.

    pixel_values              (B, P, 768) float32 in [0, 1]; row p is patch p in raster order, its values
                              ordered (row in patch, column in patch, RGB). Padding rows are 0.
    image_position_ids        (B, P, 2) int64, (x, y) = (patch column, patch row); padding rows are -1.
    num_soft_tokens_per_image tuple of B ints: real patches / 9, the number of `<|image|>` placeholders.
    P = 9 · budget (2520 for the default 280 soft tokens).
    """

    pixel_values: np.ndarray
    image_position_ids: np.ndarray
    num_soft_tokens_per_image: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.num_soft_tokens_per_image)


def check_budget(max_soft_tokens: int) -> int:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ConfigError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}")
    return int(max_soft_tokens)


def resized_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """(height, width) an image is resized to: the aspect-preserving scale to the budget's area, each side
    rounded down to a multiple of 48 px; a side that rounds to 0 becomes 48 px and the other side
    floor(aspect)·48 px, at most budget·48 px. Mirrors transformers' float arithmetic step by step,
    so that sides on a rounding boundary come out the same."""
    max_soft_tokens = check_budget(max_soft_tokens)
    side = POOLING_KERNEL * PATCH_SIZE
    target_area = max_soft_tokens * POOLING_KERNEL**2 * PATCH_SIZE**2
    scale = math.sqrt(target_area / (height * width))
    new_h = int(math.floor(scale * height / side)) * side
    new_w = int(math.floor(scale * width / side)) * side
    if new_h == 0 and new_w == 0:
        raise Gemma4Error(f"a {height}x{width} image cannot be resized to a multiple of {side} px")
    if new_h == 0:  # very wide: one row of pooled patches
        new_h, new_w = side, min(int(math.floor(width / height)) * side, max_soft_tokens * side)
    elif new_w == 0:  # very tall: one column
        new_h, new_w = min(int(math.floor(height / width)) * side, max_soft_tokens * side), side
    if new_h * new_w > target_area:
        raise Gemma4Error(f"resizing {height}x{width} to {new_h}x{new_w} exceeds {max_soft_tokens} soft tokens")
    return new_h, new_w


def num_image_soft_tokens(height: int, width: int, max_soft_tokens: int = 280) -> int:
    """Soft tokens an image of this size yields, without touching its pixels."""
    new_h, new_w = resized_size(height, width, max_soft_tokens)
    return (new_h // PATCH_SIZE) * (new_w // PATCH_SIZE) // POOLING_KERNEL**2


def _to_rgb_pixels(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an (H, W[, 1|3|4]) uint8 array, converted the way
    transformers does for that input type: a file is opened, EXIF-rotated and `convert('RGB')`-ed (alpha
    dropped, as `load_image` does); a PIL image with alpha is composited onto white with Pillow; an RGBA
    array is blended onto white in floating point and rounded; grey arrays are repeated to 3 channels."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise Gemma4Error(f"image file {os.fspath(image)!r} does not exist")
        try:
            with Image.open(image) as f:
                return np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
        except OSError as err:
            raise Gemma4Error(f"{os.fspath(image)!r} is not an image Pillow can read ({err})") from None
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise Gemma4Error(f"an image array must be uint8 (H, W, 3), got dtype {image.dtype}")
        pixels = image[..., None] if image.ndim == 2 else image
        if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
            raise Gemma4Error(f"an image array must be (H, W, 3) uint8, got shape {image.shape}")
        if pixels.shape[-1] == 1:
            return np.repeat(pixels, 3, axis=-1)
        if pixels.shape[-1] == 4:
            alpha = pixels[..., 3:] / 255
            return np.round(alpha * pixels[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return pixels
    raise Gemma4Error(f"an image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")


def preprocess_image(image, max_soft_tokens: int = 280) -> ImageInput:
    """One image → ImageInput with B = 1 (see the class for fields and shapes)."""
    max_soft_tokens = check_budget(max_soft_tokens)
    pixels = _to_rgb_pixels(image)
    height, width = pixels.shape[:2]
    new_h, new_w = resized_size(height, width, max_soft_tokens)
    if (new_h, new_w) != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    # Scale in float64 then store float32, as transformers' rescale does (bit-identical values).
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)

    rows, cols = new_h // PATCH_SIZE, new_w // PATCH_SIZE
    patches = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(rows * cols, PATCH_SIZE * PATCH_SIZE * 3)  # (n, 768)
    col_ids, row_ids = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([col_ids.ravel(), row_ids.ravel()], axis=-1).astype(np.int64)  # (n, 2) as (x, y)

    num_patches = max_soft_tokens * POOLING_KERNEL**2
    pixel_values = np.zeros((1, num_patches, patches.shape[1]), np.float32)
    position_ids = np.full((1, num_patches, 2), -1, np.int64)
    pixel_values[0, : len(patches)] = patches
    position_ids[0, : len(patches)] = positions
    return ImageInput(pixel_values, position_ids, (rows * cols // POOLING_KERNEL**2,))


def stack_images(inputs: Sequence[ImageInput]) -> ImageInput:
    """Concatenate ImageInputs along B. Each is already padded to its budget's patch count, as the processor
    pads every image; inputs of different budgets are padded further (pixels 0, positions -1)."""
    if not inputs:
        raise Gemma4Error("stack_images needs at least one ImageInput")
    num_patches = max(x.pixel_values.shape[1] for x in inputs)

    def pad(a, value):
        return np.pad(a, [(0, 0), (0, num_patches - a.shape[1]), (0, 0)], constant_values=value)

    return ImageInput(np.concatenate([pad(x.pixel_values, 0) for x in inputs]),
                      np.concatenate([pad(x.image_position_ids, -1) for x in inputs]),
                      tuple(n for x in inputs for n in x.num_soft_tokens_per_image))


def preprocess_images(images: Sequence, max_soft_tokens: int = 280) -> ImageInput:
    """Several images at one budget → one ImageInput, as the image processor batches them."""
    return stack_images([preprocess_image(im, max_soft_tokens) for im in images])


# ---------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class AudioInput:
    """Audio inputs for B clips, named and laid out as transformers' feature extractor returns them.

    input_features            (B, T, 128) float32 log-mel; frames past a clip's end are 0.
    input_features_mask       (B, T) bool, True where the frame's whole 20 ms window is real audio.
    num_soft_tokens_per_audio tuple of B ints: valid frames after the encoder's two stride-2 convs
                              (ceil(valid / 4)), the number of `<|audio|>` placeholders.
    T = (L + 160 - 321) // 160 + 1 for L = the longest clip (cut to 480000 samples) rounded up to 128.
    """

    input_features: np.ndarray
    input_features_mask: np.ndarray
    num_soft_tokens_per_audio: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.num_soft_tokens_per_audio)


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 waveform in [-1, 1), sampling rate) of a mono 16-bit PCM .wav (samples / 32768)."""
    try:
        with wave.open(os.fspath(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (OSError, EOFError, wave.Error) as err:
        raise Gemma4Error(f"{os.fspath(path)!r} is not a readable PCM .wav file ({err})") from None
    if channels != 1 or width != 2:
        raise Gemma4Error(f"{os.fspath(path)!r} has {channels} channel(s) of {8 * width}-bit samples; "
                          "only mono 16-bit PCM .wav is read")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, rate


def _mel_filters() -> np.ndarray:
    """(257, 128) float64 triangular HTK-mel filters over 0–8 kHz, unnormalised, on the linear FFT bins."""
    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), NUM_MEL_BINS + 2)
    edges_hz = 700.0 * (np.power(10, mels / 2595.0) - 1.0)  # (130,) filter corners
    bins_hz = np.linspace(0, SAMPLING_RATE // 2, FFT_LENGTH // 2 + 1)  # (257,)
    offset = edges_hz[None, :] - bins_hz[:, None]  # (257, 130)
    width = np.diff(edges_hz)
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(np.zeros(1), np.minimum(rising, falling))


# Periodic Hann window of 320 samples; the top filter lies between FFT bins and stays all-zero (harmless).
_WINDOW = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)
_MEL_FILTERS = _mel_filters()


def _as_waveform(audio, sampling_rate: int) -> np.ndarray:
    if isinstance(audio, (str, os.PathLike)):
        audio, sampling_rate = load_wav(audio)
    if sampling_rate != SAMPLING_RATE:
        raise ConfigError(f"audio must be sampled at {SAMPLING_RATE} Hz, got {sampling_rate} Hz; resample it first")
    wav = np.asarray(audio)
    if wav.ndim != 1 or not (np.issubdtype(wav.dtype, np.floating) or np.issubdtype(wav.dtype, np.integer)):
        raise Gemma4Error(f"a waveform must be a 1-D array of samples, got shape {wav.shape} dtype {wav.dtype}")
    # float32 as the extractor computes (it casts float64 after padding; integer samples are not rescaled).
    return wav[:MAX_AUDIO_SAMPLES].astype(np.float32)


def _log_mel(padded: np.ndarray) -> np.ndarray:
    """(L,) float32 waveform → (T, 128) float32 log-mel."""
    signal = np.pad(padded, (FRAME_LENGTH // 2, 0))  # semicausal: first frame centred at t = 0
    if len(signal) < FRAME_LENGTH + 1:
        return np.zeros((0, NUM_MEL_BINS), np.float32)
    # Windows of 321 samples every 160 (the extra sample is for pre-emphasis, 0 here), first 320 used.
    frames = np.lib.stride_tricks.sliding_window_view(signal, FRAME_LENGTH + 1)[::HOP_LENGTH, :FRAME_LENGTH]
    spectrum = np.abs(np.fft.rfft(frames * _WINDOW, n=FFT_LENGTH, axis=-1))  # float32 (T, 257)
    return np.log(spectrum @ _MEL_FILTERS + MEL_FLOOR).astype(np.float32)  # mel and log in float64


def preprocess_audio_batch(waveforms: Sequence, sampling_rate: int = SAMPLING_RATE) -> AudioInput:
    """Several clips (1-D arrays or .wav paths) → AudioInput, padded to the longest as the extractor does."""
    if not waveforms:
        raise Gemma4Error("preprocess_audio_batch needs at least one clip")
    clips = [_as_waveform(w, sampling_rate) for w in waveforms]
    length = max(len(c) for c in clips)
    length = -(-length // AUDIO_PAD_MULTIPLE) * AUDIO_PAD_MULTIPLE
    num_frames = max(0, (length + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)
    features = np.zeros((len(clips), num_frames, NUM_MEL_BINS), np.float32)
    mask = np.zeros((len(clips), num_frames), bool)
    for i, clip in enumerate(clips):
        # A frame is valid when its last sample (index t·160 + 320 after the 160-sample left pad) is real.
        mask[i] = np.arange(num_frames) * HOP_LENGTH + FRAME_LENGTH < FRAME_LENGTH // 2 + len(clip)
        features[i] = _log_mel(np.pad(clip, (0, length - len(clip)))) * mask[i][:, None]
    # Gemma4Processor keeps every 2nd mask entry twice (the two stride-2 subsampling convs) and counts.
    soft = tuple(int(m[::2][::2].sum()) for m in mask)
    return AudioInput(features, mask, soft)


def preprocess_audio(waveform, sampling_rate: int = SAMPLING_RATE) -> AudioInput:
    """One clip (a 1-D array at 16 kHz or a mono 16-bit .wav path) → AudioInput with B = 1."""
    return preprocess_audio_batch([waveform], sampling_rate)


def num_audio_soft_tokens(num_samples: int) -> int:
    """Soft tokens of a clip of this many 16 kHz samples (30 s → 750)."""
    valid = max(0, (min(num_samples, MAX_AUDIO_SAMPLES) - FRAME_LENGTH // 2 - 1) // HOP_LENGTH + 1)
    return -(-valid // 4)


# -------------------------------------------------------------------------------------------- prompts

_PLACEHOLDER_RE = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)}")


def _check_counts(found_images: int, found_audio: int, images: Sequence[int], audio: Sequence[int]) -> None:
    if found_images != len(images):
        raise Gemma4Error(f"the prompt has {found_images} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")
    if found_audio != len(audio):
        raise Gemma4Error(f"the prompt has {found_audio} {AUDIO_TOKEN} placeholder(s) for {len(audio)} clip(s)")


def expand_placeholders(text: str, image_soft_tokens: Sequence[int] = (), audio_soft_tokens: Sequence[int] = ()) -> str:
    """Replace the i-th `<|image|>` by `<|image>` + n_i × `<|image|>` + `<image|>`, and likewise the i-th
    `<|audio|>` with `<|audio>` … `<audio|>`; the counts of placeholders and items must agree."""
    _check_counts(text.count(IMAGE_TOKEN), text.count(AUDIO_TOKEN), image_soft_tokens, audio_soft_tokens)
    images, audio = iter(image_soft_tokens), iter(audio_soft_tokens)

    def expand(match: re.Match) -> str:
        if match.group() == IMAGE_TOKEN:
            return BOI_TOKEN + IMAGE_TOKEN * int(next(images)) + EOI_TOKEN
        return BOA_TOKEN + AUDIO_TOKEN * int(next(audio)) + EOA_TOKEN

    return _PLACEHOLDER_RE.sub(expand, text)


def expand_placeholder_ids(ids: Sequence[int], image_soft_tokens: Sequence[int] = (),
                           audio_soft_tokens: Sequence[int] = ()) -> list[int]:
    """`expand_placeholders` on token ids: equal to encoding the expanded text, since the six tokens are
    special (never merged with neighbouring text)."""
    ids = [int(i) for i in ids]
    _check_counts(ids.count(IMAGE_TOKEN_ID), ids.count(AUDIO_TOKEN_ID), image_soft_tokens, audio_soft_tokens)
    images, audio, out = iter(image_soft_tokens), iter(audio_soft_tokens), []
    for i in ids:
        if i == IMAGE_TOKEN_ID:
            out += [BOI_TOKEN_ID, *[IMAGE_TOKEN_ID] * int(next(images)), EOI_TOKEN_ID]
        elif i == AUDIO_TOKEN_ID:
            out += [BOA_TOKEN_ID, *[AUDIO_TOKEN_ID] * int(next(audio)), EOA_TOKEN_ID]
        else:
            out.append(i)
    return out


def mm_token_type_ids(ids: Sequence[int]) -> np.ndarray:
    """(T,) int64: 1 at `<|image|>`, 2 at `<|video|>`, 3 at `<|audio|>`, 0 elsewhere (Gemma4Processor's)."""
    ids = np.asarray(ids, dtype=np.int64)
    types = np.zeros_like(ids)
    types[ids == IMAGE_TOKEN_ID] = IMAGE_TYPE
    types[ids == VIDEO_TOKEN_ID] = VIDEO_TYPE
    types[ids == AUDIO_TOKEN_ID] = AUDIO_TYPE
    return types


@dataclass(frozen=True)
class MultimodalInput:
    """One prompt's model inputs: input_ids (T,) and mm_token_type_ids (T,) int64, plus the ImageInput
    and AudioInput of its images and clips in prompt order (None when it has none)."""

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    images: ImageInput | None
    audio: AudioInput | None


def prepare_multimodal(tokenizer, text: str, images: Sequence = (), audio: Sequence = (),
                       max_soft_tokens: int = 280, add_bos: bool = False) -> MultimodalInput:
    """What `Gemma4Processor(text=[text], images=[images], audio=audio)` gives for one prompt.

    `tokenizer` is a `gemma4_jax.tokenizer.Tokenizer` whose vocabulary has Gemma 4's placeholder tokens.
    `text` holds one `<|image|>` per image and one `<|audio|>` per clip, typically a chat prompt, which
    starts with `<bos>` itself: the processor adds no BOS (add_bos_token=False), hence `add_bos=False`.
    """
    needed = ([(BOI_TOKEN_ID, BOI_TOKEN), (IMAGE_TOKEN_ID, IMAGE_TOKEN), (EOI_TOKEN_ID, EOI_TOKEN)] if images else [])
    needed += [(BOA_TOKEN_ID, BOA_TOKEN), (AUDIO_TOKEN_ID, AUDIO_TOKEN), (EOA_TOKEN_ID, EOA_TOKEN)] if audio else []
    for token_id, token in needed:
        if tokenizer.id_to_token(token_id) != token:
            raise CheckpointError(f"the tokenizer at {tokenizer.path} has no {token} at id {token_id}")
    image_input = preprocess_images(images, max_soft_tokens) if images else None
    audio_input = preprocess_audio_batch(audio) if audio else None
    expanded = expand_placeholders(text, image_input.num_soft_tokens_per_image if images else (),
                                   audio_input.num_soft_tokens_per_audio if audio else ())
    ids = np.asarray(tokenizer.encode(expanded, add_bos=add_bos), dtype=np.int64)
    return MultimodalInput(ids, mm_token_type_ids(ids), image_input, audio_input)
