"""Loading HF directories: layouts, ignorable tensors, and every kind of bad checkpoint."""

import json
import os
import shutil

import numpy as np
import pytest
from hf_fixtures import rel_err

import gemma4_jax
from gemma4_jax.safetensors_io import SafetensorsFile, save_file


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path, edit):
    st = SafetensorsFile(path)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    save_file(tensors, path)


def test_stray_kv_of_shared_layers_and_tied_head_are_ignored(hf_dirs, tmp_path):
    """Published E2B files carry k/v weights for the KV-shared layers and may carry lm_head."""
    d = _copy(hf_dirs["e2b", "causal"], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")

    def add(t):
        for i in range(6, 10):  # the fixture's shared layers
            t[f"model.layers.{i}.self_attn.k_proj.weight"] = np.full((64, 64), 7.0, np.float32)
            t[f"model.layers.{i}.self_attn.v_proj.weight"] = np.full((64, 64), 7.0, np.float32)
            t[f"model.layers.{i}.self_attn.k_norm.weight"] = np.full((64,), 7.0, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _rewrite(path, add)
    ids = np.arange(3, 19)[None]
    a = gemma4_jax.load(d, progress=False).logits(ids)
    b = gemma4_jax.load(hf_dirs["e2b", "causal"], progress=False).logits(ids)
    assert rel_err(a, b) == 0.0


@pytest.mark.parametrize("problem,match", [
    ("missing", "lacks tensor model.layers.3.mlp.up_proj.weight"),
    ("misshaped", "has shape"),
    ("unexpected", "unexpected tensor"),
    ("truncated", "truncated"),
    ("no_weights", "neither model.safetensors"),
    ("unknown_arch", "unsupported model_type"),
])
def test_bad_checkpoints_fail_with_one_sentence(problem, match, hf_dirs, tmp_path):
    d = _copy(hf_dirs["31b", "causal"], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    if problem == "missing":
        _rewrite(path, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    elif problem == "misshaped":
        _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    elif problem == "unexpected":
        _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}))
    elif problem == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif problem == "no_weights":
        os.remove(path)
    elif problem == "unknown_arch":
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["model_type"] = "gemma3_text"
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(gemma4_jax.Gemma4Error, match=match) as info:
        gemma4_jax.load(d, progress=False)
    assert "\n" not in str(info.value)


def test_load_rejects_bad_options(hf_dirs):
    with pytest.raises(gemma4_jax.ConfigError, match="dtype"):
        gemma4_jax.load(hf_dirs["31b", "causal"], dtype="int8")
    with pytest.raises(gemma4_jax.CheckpointError, match="not a directory"):
        gemma4_jax.load("/nonexistent/dir")
