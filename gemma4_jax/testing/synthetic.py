"""Random-weight Hugging Face checkpoints at any size, written tensor by tensor.

For measuring the converter and the loaders at real shapes when no real weights are at hand: the
tensor names, shapes and sharded layout (`model-0000i-of-0000n.safetensors` + index) are exactly
those of a published Gemma 4 checkpoint of the given config; the values are random. Memory stays
at one tensor whatever the checkpoint's size.
"""

from __future__ import annotations

import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..checkpoint.hf import converter_table
from ..config import Gemma4Config
from ..model.text import abstract_model, iter_params

PREFIX = "model.language_model."


def write_random_checkpoint(path: str, raw_config: dict, *, seed: int = 0, shard_bytes: int = 2 << 30,
                            scale: float = 0.02) -> int:
    """Write a random bf16 checkpoint of `raw_config` (a config.json dict) to `path`; returns its bytes."""
    cfg = Gemma4Config.from_hf_dict(raw_config)
    table, _ = converter_table(cfg)
    names = sorted(table)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = int(np.prod(table[name].hf_shape)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 22) * scale).astype(ml_dtypes.bfloat16)  # tiled: fast, not constant
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            n = int(np.prod(table[name].hf_shape)) * 2
            header[PREFIX + name] = {"dtype": "BF16", "shape": list(table[name].hf_shape),
                                     "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[PREFIX + name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in shard:
                count = int(np.prod(table[name].hf_shape))
                start = int(rng.integers(0, block.size))
                rolled = np.roll(block, -start)
                for lo in range(0, count, block.size):
                    f.write(rolled[: min(block.size, count - lo)].tobytes())
        total += offset
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    wrapper = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
               "eos_token_id": raw_config.get("eos_token_id"), "text_config": raw_config,
               "vision_config": None, "audio_config": None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(wrapper, f, indent=1)
    return total


def random_model(cfg: Gemma4Config, dtype, seed: int = 0):
    """A `Gemma4Text` with random weights at `cfg`'s shapes, made on the device parameter by parameter (one small
    compiled program per distinct shape: one program for all ~700 parameters of a real variant compiles for
    minutes): N(0, 0.02) for matrices, 1 + N(0, 0.1) for norms, scales and layer scalars."""
    model = abstract_model(cfg, dtype)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(iter_params(model)):
        near_one = path[-1].endswith(("norm", "scale", "scalar", "norm_1", "norm_2"))
        var.set_value(_random(jax.random.fold_in(key, i), tuple(var.get_value().shape), jnp.dtype(dtype), near_one))
    return model


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random(key, shape: tuple[int, ...], dtype, near_one: bool) -> jax.Array:
    value = (1.0 if near_one else 0.0) + jax.random.normal(key, shape, dtype) * (0.1 if near_one else 0.02)
    return value.astype(dtype)
