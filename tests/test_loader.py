"""Loading HF directories: layouts, ignorable tensors, and every kind of bad checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_fixtures import FAMILIES, hf_logits, rel_err, save_hf

import gemma4_jax
from gemma4_jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from gemma4_jax.checkpoint.staged import convert
from gemma4_jax.errors import CheckpointError, Gemma4Error
from gemma4_jax.testing.tiny import write_char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_malformed_side_files_fail_with_one_sentence(hf_dirs, tmp_path):
    """A generation_config.json or tokenizer_config.json that cannot be read: `load` raises CheckpointError naming
    the file; the generate command and the converter end with that sentence (exit 1, no traceback), the converter
    before writing anything. The processes run side by side."""
    cases = {  # name: (file, its text, what the sentence says)
        "gen": ("generation_config.json", "{x", "generation_config.json is not valid JSON"),
        "tok": ("tokenizer_config.json", "{x", "tokenizer_config.json is not valid JSON"),
        "eos": ("generation_config.json", '{"eos_token_id": "abc"}',
                'generation_config.json has eos_token_id "abc", which is neither a token id nor a list'),
    }
    for name, (file, text, _) in cases.items():
        d = _copy(hf_dirs["31b", "causal"], tmp_path / name)
        write_char_tokenizer(d)
        with open(os.path.join(d, file), "w") as f:
            f.write(text)
    before = sorted(os.listdir(tmp_path))
    env = dict(os.environ, PYTHONPATH=ROOT)
    runs = [(name, argv) for name in cases for argv in (
        ["-m", "gemma4_jax.generate", "--model", str(tmp_path / name), "--prompt", "hi"],
        [os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--hf-dir", str(tmp_path / name), "--out",
         str(tmp_path / f"{name}-out"), "--no-progress"])]
    procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _, argv in runs]
    for name, (_, _, msg) in cases.items():
        with pytest.raises(CheckpointError, match=msg) as info:
            gemma4_jax.load(str(tmp_path / name), progress=False)
        assert "\n" not in str(info.value)
    for p, (name, argv) in zip(procs, runs, strict=True):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 1 and cases[name][2] in err and "Traceback" not in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and out == "", err  # one sentence
    assert sorted(os.listdir(tmp_path)) == before  # no conversion, no temporary directory


def test_load_rejects_bad_options(hf_dirs):
    with pytest.raises(gemma4_jax.ConfigError, match="dtype"):
        gemma4_jax.load(hf_dirs["31b", "causal"], dtype="int8")
    with pytest.raises(gemma4_jax.CheckpointError, match="not a directory"):
        gemma4_jax.load("/nonexistent/dir")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """An E4B-family checkpoint whose head is its own tensor (`tie_word_embeddings` false), and transformers'
    model of it."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_jax.testing.tiny import perturb_scales

    torch.manual_seed(11)
    hf = Gemma4ForCausalLM(Gemma4TextConfig(**FAMILIES["e4b"], tie_word_embeddings=False)).eval()
    hf.config._attn_implementation = "eager"
    hf = perturb_scales(hf, 12)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("untied")))


@pytest.mark.parametrize("route", ["hf_pp1", pytest.param("converted_pp2", marks=pytest.mark.devices(2))])
def test_untied_head_gives_transformers_logits(untied, tmp_path, route):
    """The head is lm_head.weight, not the embedding: from the HF directory at pp = 1, and through the converter
    (which puts it on the last stage) at pp = 2."""
    hf, path = untied
    pp = int(route[-1])
    if route.startswith("converted"):
        out = str(tmp_path / "conv")
        convert(path, out, pp=pp, progress=False, log=lambda s: None)
        with open(os.path.join(out, "manifest.json")) as f:
            assert json.load(f)["head"].startswith("untied")
        path = out
    ids = np.random.default_rng(3).integers(3, 256, size=(2, 12))
    ours = gemma4_jax.load(path, dtype="float32", attn_impl="xla", pp=pp, progress=False).logits(ids)
    assert rel_err(ours, hf_logits(hf, ids)) <= 1e-4


def test_untied_config_without_its_head_is_refused(untied, tmp_path):
    _, src = untied
    d = _copy(src, tmp_path / "m")
    _rewrite(os.path.join(d, "model.safetensors"), lambda t: t.pop("lm_head.weight"))
    with pytest.raises(Gemma4Error, match="not tied to the embedding .* holds no lm_head.weight"):
        gemma4_jax.load(d, progress=False)


def test_tensors_in_memory_load_as_their_directory_does(hf_dirs):
    """`params_from_tensors` (HF-named arrays in memory, as the float64 references hand them over) gives
    `read_hf_params`' parameters of the same tensors bit for bit, and runs the directory's checks."""
    from gemma4_jax import checkpoint
    from gemma4_jax.checkpoint.hf import params_from_tensors, read_hf_params
    from gemma4_jax.checkpoint.safetensors_io import checkpoint_files

    d = hf_dirs["26b-a4b", "causal"]
    cfg = checkpoint.open(d).config
    tensors = {k: np.array(st.get(k)) for st in map(SafetensorsFile, checkpoint_files(d)) for k in st.keys()}
    want = read_hf_params(d, cfg)
    got = params_from_tensors(tensors, cfg)
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))
    name = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor"):
        params_from_tensors({k: v for k, v in tensors.items() if k != name}, cfg)
    with pytest.raises(CheckpointError, match="has shape"):
        params_from_tensors({**tensors, name: tensors[name][:1]}, cfg)
