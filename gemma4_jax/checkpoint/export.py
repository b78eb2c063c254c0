"""Model parameters → a Hugging Face Gemma 4 checkpoint: the inverse of the converter table.

Owns writing `config.json` (the flat form the published checkpoints carry, text-only
`Gemma4ForCausalLM`), `model.safetensors` (prefix `model.`) and `generation_config.json`. The
tensor layouts are not written out a second time: every transform of `checkpoint.hf.converter_table`
is a pure re-indexing (transposes, reshapes, slices), so applying it to an array of HF element
indices tells where each of our elements sits in the HF tensor. Exporting therefore cannot drift
from loading.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from ..config import FULL, SLIDING, Gemma4Config
from ..errors import ConfigError
from ..model.text import iter_params
from .hf import Path, converter_table
from .safetensors_io import save_file


def module_params(module: nnx.Module) -> dict[Path, np.ndarray]:
    """{path: numpy array} of every parameter of a `Gemma4Text`."""
    return {path: np.asarray(var.get_value()) for path, var in iter_params(module)}


def params_to_hf(cfg: Gemma4Config, params: dict[Path, np.ndarray], prefix: str = "model.") -> dict[str, np.ndarray]:
    """{HF tensor name: array in HF layout}; KV weights of shared layers and the tied head are not written."""
    table, _ = converter_table(cfg)
    out = {}
    for name, entry in table.items():
        size = int(np.prod(entry.hf_shape))
        index = np.arange(size, dtype=np.int64).reshape(entry.hf_shape)
        dtype = np.result_type(*(params[t.path].dtype for t in entry.targets))
        flat = np.empty(size, dtype)
        covered = np.zeros(size, bool)
        for t in entry.targets:
            ours = params[t.path]
            where = np.asarray(t.transform(index))  # our layout, holding HF flat indices
            if where.shape != ours.shape:
                raise ConfigError(f"parameter {'/'.join(t.path)} has shape {ours.shape}, {name} needs {where.shape}")
            flat[where.ravel()] = ours.ravel()
            covered[where.ravel()] = True
        if not covered.all():
            raise ConfigError(f"the converter table leaves part of {name} unset")
        out[prefix + name] = flat.reshape(entry.hf_shape)
    return out


def hf_config_dict(cfg: Gemma4Config) -> dict:
    """The flat, published `config.json` form of `cfg` (text-only Gemma4ForCausalLM).

    Raises ConfigError when `cfg` needs more than that form can say (for example per-layer widths
    other than the double-wide MLP); the result is re-parsed and checked against `cfg`.
    """
    sliding = [s for s in cfg.layers if s.attn_type == SLIDING]
    full = [s for s in cfg.layers if s.attn_type == FULL]
    base = sliding[0] if sliding else full[0]
    out: dict = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "layer_types": [s.attn_type for s in cfg.layers],
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": base.num_kv_heads,
        "head_dim": base.head_dim,
        "global_head_dim": full[0].head_dim if full else base.head_dim,
        "attention_k_eq_v": any(s.k_eq_v for s in cfg.layers),
        "sliding_window": cfg.sliding_window,
        "hidden_size_per_layer_input": cfg.ple_dim,
        "vocab_size_per_layer_input": cfg.ple_vocab_size or cfg.vocab_size,
        "num_kv_shared_layers": cfg.num_kv_shared_layers,
        "use_double_wide_mlp": any(s.mlp_width == 2 * cfg.intermediate_size for s in cfg.layers if not s.owns_kv),
        "enable_moe_block": cfg.num_experts > 0,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_activation": cfg.hidden_activation,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "dtype": "float32",
    }
    if out["attention_k_eq_v"] and full:
        out["num_global_key_value_heads"] = full[0].num_kv_heads
    if cfg.num_experts:
        out.update(num_experts=cfg.num_experts, top_k_experts=cfg.top_k_experts,
                   moe_intermediate_size=cfg.moe_intermediate_size)
    rope = {}
    for kind, specs in ((SLIDING, sliding), (FULL, full)):
        if not specs:
            continue
        s = specs[0]
        if s.rope_fraction == 1.0 and s.rope_factor == 1.0 and kind == SLIDING:
            rope[kind] = {"rope_type": "default", "rope_theta": s.rope_theta}
        else:
            rope[kind] = {"rope_type": "proportional", "partial_rotary_factor": s.rope_fraction,
                          "rope_theta": s.rope_theta}
            if s.rope_factor != 1.0:
                rope[kind]["factor"] = s.rope_factor
    out["rope_parameters"] = rope

    back = Gemma4Config.from_hf_dict(json.loads(json.dumps(out)), name=cfg.name)
    if back.replace(architecture=cfg.architecture) != cfg:
        raise ConfigError("this configuration cannot be written in the flat config.json form")
    return out


def export_hf(out_dir: str, cfg: Gemma4Config, params: dict[Path, np.ndarray], *,
              generation_config: dict | None = None, dtype=None) -> str:
    """Write `config.json`, `model.safetensors` and `generation_config.json` into `out_dir`.

    `params` is {path: array} (see `module_params`); `dtype` (e.g. np.float32) casts every tensor.
    """
    config = hf_config_dict(cfg)
    tensors = params_to_hf(cfg, params)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
        config["dtype"] = np.dtype(dtype).name
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    gen = generation_config or {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
                                "eos_token_id": list(cfg.eos_token_ids)}
    for name, obj in (("config.json", config), ("generation_config.json", gen)):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(out_dir, name))
    return out_dir
