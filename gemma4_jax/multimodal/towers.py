"""Images and audio in a prompt: the towers of a Gemma4ForConditionalGeneration checkpoint, prompt
expansion with the checkpoint's special ids, and the soft tokens' placement (`model.Multimodal`).

A prompt names its media with `<|image|>` / `<|audio|>` markers (one per item, in order); without
markers, the images and then the clips go first in the user turn. Each marker becomes
`<|image>` + N × `<|image|>` + `<image|>` (or the audio equivalents), N the item's soft-token count, and
the towers' outputs overwrite the N placeholders in the text model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ..checkpoint import Opened
from ..checkpoint.hf import read_tower_tensors
from ..checkpoint.safetensors_io import SafetensorsFile
from ..errors import CheckpointError, ConfigError
from ..model.audio import AudioConfig, audio_soft_tokens, load_audio
from ..model.text import Multimodal, vision_blocks
from ..model.vision import VisionConfig, image_features, load_vision
from ..tokenizer import AUDIO_MARK as AUDIO_TEXT
from ..tokenizer import IMAGE_MARK as IMAGE_TEXT
from .preprocess import preprocess_audio_batch, preprocess_images


@dataclass(frozen=True)
class SpecialIds:
    """The multimodal token ids of a checkpoint (config.json's top level; defaults are Gemma 4's)."""

    image: int = 258_880
    boi: int = 255_999
    eoi: int = 258_882
    audio: int = 258_881
    boa: int = 256_000
    eoa: int = 258_883

    @classmethod
    def from_config(cls, raw: dict) -> SpecialIds:
        d = cls()
        return cls(image=int(raw.get("image_token_id", d.image)), boi=int(raw.get("boi_token_id", d.boi)),
                   eoi=int(raw.get("eoi_token_id", d.eoi)), audio=int(raw.get("audio_token_id", d.audio)),
                   boa=int(raw.get("boa_token_id", d.boa)),
                   eoa=int(raw.get("eoa_token_id", raw.get("eoa_token_index", d.eoa))))


class Towers:
    """The vision and audio towers (with their embedders) of a checkpoint; either may be None."""

    def __init__(self, vision, audio, ids: SpecialIds):
        self.vision, self.audio, self.ids = vision, audio, ids

    @classmethod
    def load(cls, ckpt: Opened, text_hidden_size: int, dtype) -> Towers | None:
        """The towers of an HF or converted directory (whose first stage keeps them), placed on the first
        device; None when its config has neither a vision nor an audio config."""
        path, raw = ckpt.path, ckpt.raw_config
        vision_cfg, audio_cfg = raw.get("vision_config"), raw.get("audio_config")
        if not vision_cfg and not audio_cfg:
            return None
        if ckpt.converted:
            towers = ckpt.manifest.get("towers")
            if not towers:
                raise CheckpointError(f"{path} was converted without its vision/audio towers; re-convert it")
            st = SafetensorsFile(os.path.join(path, towers["file"]))
            tensors = {name: np.array(st.get(name)) for name in st.keys()}
        else:
            tensors = read_tower_tensors(path)
        vision = audio = None
        if vision_cfg:
            vision = load_vision(tensors, VisionConfig.from_hf(vision_cfg, text_hidden_size), dtype)
        if audio_cfg:
            audio = load_audio(AudioConfig.from_hf(audio_cfg, text_hidden_size), tensors, dtype)
        return cls(vision, audio, SpecialIds.from_config(raw))

    def image_features(self, images, max_soft_tokens: int = 280):
        """(features [N, D], soft tokens per image) for a list of images (paths, PIL images or arrays)."""
        if self.vision is None:
            raise ConfigError("this checkpoint has no vision tower")

        inp = preprocess_images(list(images), max_soft_tokens)
        feats = image_features(self.vision, inp.pixel_values, inp.image_position_ids,
                               sum(inp.num_soft_tokens_per_image))
        return feats, list(inp.num_soft_tokens_per_image)

    def audio_features(self, clips):
        """(features [N, D], soft tokens per clip) for a list of clips (16 kHz arrays or .wav paths)."""
        if self.audio is None:
            raise ConfigError("this checkpoint has no audio tower")

        inp = preprocess_audio_batch(list(clips))
        feats = audio_soft_tokens(self.audio, inp.input_features, inp.input_features_mask)
        if feats.shape[0] != sum(inp.num_soft_tokens_per_audio):
            raise CheckpointError("the audio tower's soft-token count differs from the feature extractor's")
        return feats, list(inp.num_soft_tokens_per_audio)


def with_markers(text: str, n_images: int, n_audio: int) -> str:
    """`text` with one marker per item: its own markers if it has any, else the items first."""
    if IMAGE_TEXT in text or AUDIO_TEXT in text:
        if text.count(IMAGE_TEXT) != n_images or text.count(AUDIO_TEXT) != n_audio:
            raise ConfigError(f"the prompt has {text.count(IMAGE_TEXT)} {IMAGE_TEXT} and {text.count(AUDIO_TEXT)} "
                              f"{AUDIO_TEXT} markers for {n_images} image(s) and {n_audio} audio clip(s)")
        return text
    return IMAGE_TEXT * n_images + AUDIO_TEXT * n_audio + text


def expand(ids: list[int], image_tokens: list[int], audio_tokens: list[int], sp: SpecialIds) -> list[int]:
    """Each image marker id -> boi + n × image + eoi (in order); each audio marker likewise."""
    if ids.count(sp.image) != len(image_tokens) or ids.count(sp.audio) != len(audio_tokens):
        raise ConfigError(f"the tokenizer did not turn the {IMAGE_TEXT} / {AUDIO_TEXT} markers into the checkpoint's "
                          f"ids {sp.image} / {sp.audio}; does its tokenizer.json define them?")
    images, audio, out = iter(image_tokens), iter(audio_tokens), []
    for i in ids:
        if i == sp.image:
            out += [sp.boi, *[sp.image] * next(images), sp.eoi]
        elif i == sp.audio:
            out += [sp.boa, *[sp.audio] * next(audio), sp.eoa]
        else:
            out.append(i)
    return out


def soft_tokens(ids_bt: np.ndarray, image_features, audio_features, sp: SpecialIds) -> Multimodal:
    """Place the features: the k-th image placeholder (row-major over the batch) takes image row k, the
    k-th audio placeholder audio row k (as transformers' masked_scatter does, per modality)."""
    ids = np.asarray(ids_bt)
    is_image, is_audio = ids == sp.image, ids == sp.audio
    n_img = int(is_image.sum())
    feats = [f for f in (image_features, audio_features) if f is not None]
    rows = sum(int(f.shape[0]) for f in feats)
    if n_img != (0 if image_features is None else image_features.shape[0]) or \
            int(is_audio.sum()) != (0 if audio_features is None else audio_features.shape[0]):
        raise CheckpointError("the soft-token count of the towers does not match the prompt's placeholders")
    slots = np.full(ids.shape, -1, np.int32)
    slots[is_image] = np.arange(n_img)
    slots[is_audio] = n_img + np.arange(int(is_audio.sum()))
    features = jnp.concatenate([jnp.asarray(f) for f in feats]) if rows else jnp.zeros((0, 1))
    return Multimodal(features, jnp.asarray(slots), jnp.asarray(vision_blocks(is_image)))
