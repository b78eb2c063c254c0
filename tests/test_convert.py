"""The converter: HF checkpoint -> per-stage orbax checkpoints, restored bit for bit, and its bad inputs."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.checkpoint import staged as stage_checkpoint
from gemma4_jax.checkpoint.hf import read_hf_params
from gemma4_jax.checkpoint.safetensors_io import SafetensorsFile, checkpoint_files, save_file
from gemma4_jax.checkpoint.staged import convert, read_manifest, restore_leaves
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.parallel.stages import (
    balanced_stages,
    parse_layer_split,
    stage_bytes,
    stage_leaf_shapes,
    stages_from_bounds,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402

# (family, layout, split): pp=N means the balanced default. E2B-like: layers 6-9 read the K/V of
# layers 4 and 5, so "0,5,10" and "0,7,10" cut through the KV-sharing region; E4B-like: 8-11 read 6/7.
CASES = [
    ("e2b", "causal", "pp=1"), ("e2b", "wrapper", "pp=2"), ("e2b", "causal", "0,5,10"),
    ("e2b", "causal", "0,7,10"), ("e2b", "causal", "0,1,2,9,10"), ("e4b", "wrapper", "0,9,12"),
    ("e4b", "causal", "pp=3"), ("26b-a4b", "causal", "pp=2"), ("26b-a4b", "wrapper", "0,5,6"),
    ("31b", "causal", "pp=4"), ("31b", "wrapper", "0,1,12"),
]


def _stages(cfg, split):
    if split.startswith("pp="):
        return None, int(split[3:])
    return parse_layer_split(split, cfg.num_layers), None


def _raw(hf_dir, name_suffix):
    """A tensor straight from the safetensors files (no converter table involved)."""
    for path in checkpoint_files(hf_dir):
        st = SafetensorsFile(path)
        for k in st.keys():
            if k.endswith(name_suffix) and "per_layer" not in k:
                return np.array(st.get(k))
    raise KeyError(name_suffix)


def _assemble(cfg, stage_trees):
    """Stage leaves -> Gemma4Text parameter paths, written independently of the loader's assembly."""
    out, proj = {}, {}
    tables = [tree[("ple_table",)] for tree in stage_trees if ("ple_table",) in tree]
    if tables:  # each stage holds its layers' columns
        out[("ple_embed",)] = np.concatenate(tables, axis=1)
    for tree in stage_trees:
        for leaf, arr in tree.items():
            if leaf == ("ple_table",) or leaf == ("head",):
                continue
            if leaf[0] == "layers" and leaf[2] == "ple_model_proj":
                proj[int(leaf[1])] = arr
            else:  # the model's own paths, layers included
                out[leaf] = arr
    if proj:
        out[("ple_proj",)] = np.stack([proj[i] for i in sorted(proj)], axis=1)
    return out


@pytest.mark.parametrize("family,layout,split", CASES)
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, monkeypatch, family, layout, split):
    hf_dir = hf_dirs[family, layout]
    if layout == "causal":  # cut the tables into many row chunks (uneven last chunk) as on real sizes
        monkeypatch.setattr(stage_checkpoint, "CHUNK_BYTES", 30 * 64 * 4)
    cfg = Gemma4Config.from_json(hf_dir)
    stages, pp = _stages(cfg, split)
    out = str(tmp_path / "conv")
    m = convert(hf_dir, out, stages, pp=pp, progress=False, log=lambda s: None)
    assert os.listdir(tmp_path) == ["conv"]  # no temporary directory left beside it
    assert read_manifest(out) == m and m["dtype"] == "float32"
    if layout == "causal":
        assert os.path.isdir(os.path.join(out, "stage_0", "state")) and m["table_chunk_rows"]["embed"] == 30
    bounds = m["layer_split"]
    stages = stages_from_bounds(bounds, cfg.num_layers)
    if pp is not None:
        assert len(stages) == pp
    trees = []
    for s, leaves in zip(stages, stage_leaf_shapes(cfg, stages), strict=True):
        tree = restore_leaves(out, s.index, leaves, np.float32, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        tree = {p: np.asarray(a) for p, a in tree.items()}
        layers = {int(p[1]) for p in tree if p[0] == "layers"}
        assert layers == set(range(s.start, s.stop)), "a stage holds exactly its own layers"
        assert (("embed",) in tree) == s.first
        assert (("final_norm",) in tree) == s.last
        assert (("head",) in tree) == (s.last and not s.first)
        if ("head",) in tree:  # the tied head equals the checkpoint's embedding, bit for bit
            np.testing.assert_array_equal(tree[("head",)], _raw(hf_dir, "embed_tokens.weight"))
        trees.append(tree)
    # Every parameter, put back together, equals what the (transformers-verified) HF loader reads.
    ref = read_hf_params(hf_dir, cfg)
    got = _assemble(cfg, trees)
    assert set(got) == set(ref)
    for path in ref:
        np.testing.assert_array_equal(got[path], ref[path], err_msg="/".join(path))
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert os.path.exists(os.path.join(out, name)) == os.path.exists(os.path.join(hf_dir, name))


@pytest.mark.parametrize("family", ["e2b", "e4b", "26b-a4b", "31b"])
def test_loading_a_conversion_gives_the_hf_logits(hf_dirs, tmp_path, family):
    hf_dir = hf_dirs[family, "wrapper"]
    out = str(tmp_path / "conv")
    convert(hf_dir, out, progress=False, log=lambda s: None)
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 13))
    a = gemma4_jax.load(out, progress=False).logits(ids)
    b = gemma4_jax.load(hf_dir, progress=False).logits(ids)
    np.testing.assert_array_equal(a, b)


def test_bfloat16_conversion_loads_like_bfloat16_hf(hf_dirs, tmp_path):
    hf_dir = hf_dirs["e2b", "causal"]
    out = str(tmp_path / "conv")
    m = convert(hf_dir, out, dtype="bfloat16", progress=False, log=lambda s: None)
    assert m["dtype"] == "bfloat16"
    ids = np.arange(3, 20)[None]
    a = gemma4_jax.load(out, dtype="bfloat16", progress=False).logits(ids)
    b = gemma4_jax.load(hf_dir, dtype="bfloat16", progress=False).logits(ids)
    np.testing.assert_array_equal(a, b)


@pytest.mark.devices(2)
def test_stages_restore_onto_their_own_devices(hf_dirs, tmp_path):
    hf_dir = hf_dirs["e4b", "causal"]
    cfg = Gemma4Config.from_json(hf_dir)
    out = str(tmp_path / "conv")
    convert(hf_dir, out, pp=2, progress=False, log=lambda s: None)
    stages = stages_from_bounds(read_manifest(out)["layer_split"], cfg.num_layers)
    for s, leaves in zip(stages, stage_leaf_shapes(cfg, stages), strict=True):
        dev = jax.devices()[s.index]
        tree = restore_leaves(out, s.index, leaves, np.float32, jax.sharding.SingleDeviceSharding(dev))
        assert all(a.devices() == {dev} for a in tree.values())


def test_balanced_split_is_optimal_and_counts_bytes_not_layers(hf_dirs):
    cfg = Gemma4Config.from_json(hf_dirs["e2b", "causal"])
    for pp in (2, 3, 4):
        got = balanced_stages(cfg, pp, 4)
        best = min(max(stage_bytes(cfg, stages_from_bounds([0, *cut, cfg.num_layers], cfg.num_layers), 4))
                   for cut in itertools.combinations(range(1, cfg.num_layers), pp - 1))
        assert max(stage_bytes(cfg, got, 4)) == best


def test_cli_converts_and_prints_the_split(hf_dirs, tmp_path, capsys):
    out = str(tmp_path / "conv")
    rc = convert_checkpoint.main(["--hf-dir", hf_dirs["e2b", "causal"], "--out", out, "--layer-split", "0,4,10",
                                  "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "stage 0: layers 0-3" in err and "stage 1: layers 4-9" in err and "GiB" in err
    assert read_manifest(out)["layer_split"] == [0, 4, 10]
    with pytest.raises(Gemma4Error, match="converted for pp=2 but pp=1 was asked; load it with pp=2 .--pp 2."):
        gemma4_jax.load(out)


def _bad_checkpoint(kind, src, dst):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
        return "truncated"
    if kind == "unknown-arch":
        cfg = json.load(open(os.path.join(dst, "config.json")))
        cfg["model_type"] = "llama"
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
        return "model_type"
    st = SafetensorsFile(path)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    if kind == "missing":
        del tensors["model.layers.3.mlp.up_proj.weight"]
        msg = "lacks tensor model.layers.3.mlp.up_proj.weight"
    else:
        tensors["model.layers.2.self_attn.q_proj.weight"] = np.zeros((5, 64), np.float32)
        msg = "model.layers.2.self_attn.q_proj.weight has shape [5, 64]"
    save_file(tensors, path)
    return msg


@pytest.mark.parametrize("kind", ["truncated", "missing", "misshaped", "unknown-arch"])
def test_bad_checkpoints_end_cleanly(hf_dirs, tmp_path, capsys, kind):
    bad = str(tmp_path / "bad")
    msg = _bad_checkpoint(kind, hf_dirs["e2b", "causal"], bad)
    out = tmp_path / "out"
    rc = convert_checkpoint.main(["--hf-dir", bad, "--out", str(out), "--pp", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # neither the output nor a temporary directory


@pytest.mark.parametrize("args,msg", [
    (["--layer-split", "0,5,9"], "must run from 0 to 10"),
    (["--layer-split", "0,5,5,10"], "strictly increasing"),
    (["--layer-split", "0,a,10"], "comma-separated integers"),
    (["--pp", "11"], "pp=11 is more stages than the model's 10 layers"),
    (["--pp", "0"], "pp must be at least 1"),
])
def test_bad_splits_end_cleanly(hf_dirs, tmp_path, capsys, args, msg):
    rc = convert_checkpoint.main(["--hf-dir", hf_dirs["e2b", "causal"], "--out", str(tmp_path / "o"), *args,
                                  "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err, err
    assert os.listdir(tmp_path) == []


def _tree(root):
    """{path under `root`: file size, or None for a folder}, hidden entries included."""
    out = {}
    for d, dirs, files in os.walk(root):
        out.update({os.path.relpath(os.path.join(d, n), root): None for n in dirs})
        out.update({os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n)) for n in files})
    return out


def test_overwrite_replaces_an_earlier_conversion_once_the_new_one_is_written(hf_dirs, tmp_path, capsys,
                                                                               monkeypatch):
    hf_dir = hf_dirs["31b", "causal"]
    out = tmp_path / "conv"
    convert(hf_dir, str(out), progress=False, log=lambda s: None)
    (out / "keep.txt").write_text("x")
    old = _tree(out)
    rc = convert_checkpoint.main(["--hf-dir", hf_dir, "--out", str(out), "--no-progress"])
    assert rc == 1 and "already exists" in capsys.readouterr().err
    assert _tree(out) == old

    # A failure half-way leaves the old directory untouched and no temporary directory behind.
    calls = {"n": 0}
    real_add = stage_checkpoint._StageWriter.add

    def failing_add(self, *a):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(stage_checkpoint._StageWriter, "add", failing_add)
    rc = convert_checkpoint.main(["--hf-dir", hf_dir, "--out", str(out), "--overwrite", "--no-progress"])
    assert rc == 130
    assert os.listdir(tmp_path) == ["conv"] and _tree(out) == old

    # The last step failing (the new conversion cannot take the old one's place) puts the old one back.
    with pytest.raises(FileNotFoundError):
        stage_checkpoint._replace_dir(str(tmp_path / "missing"), str(out))
    assert os.listdir(tmp_path) == ["conv"] and _tree(out) == old

    monkeypatch.undo()
    rc = convert_checkpoint.main(["--hf-dir", hf_dir, "--out", str(out), "--overwrite", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert os.listdir(tmp_path) == ["conv"] and not (out / "keep.txt").exists() and read_manifest(str(out))


def test_a_directory_made_at_out_while_converting_is_kept(hf_dirs, tmp_path, monkeypatch):
    """--out is checked again before the conversion takes its place: what appeared there meanwhile stays."""
    out = tmp_path / "conv"
    real_finish = stage_checkpoint._StageWriter.finish

    def finish_and_make_out(self):
        real_finish(self)
        out.mkdir()
        (out / "keep.txt").write_text("x")

    monkeypatch.setattr(stage_checkpoint._StageWriter, "finish", finish_and_make_out)
    with pytest.raises(Gemma4Error, match="already exists"):
        convert(hf_dirs["31b", "causal"], str(out), progress=False, log=lambda s: None)
    assert os.listdir(tmp_path) == ["conv"] and os.listdir(out) == ["keep.txt"]


def test_bad_out_ends_cleanly_in_a_fresh_process(hf_dirs, tmp_path):
    """An --out that would lose data (empty, the source or a folder around it, the current or home directory,
    with --overwrite a directory that is not an earlier conversion), a blank or missing --hf-dir: exit 1 with one
    sentence, no traceback, and not a file added or removed anywhere. The processes run side by side."""
    src = str(shutil.copytree(hf_dirs["31b", "causal"], tmp_path / "models" / "src"))
    for d in ("cwd", "empty", "home", "other"):
        (tmp_path / d).mkdir()
    (tmp_path / "cwd" / "keep.txt").write_text("x")
    (tmp_path / "other" / "keep.txt").write_text("x")
    home = dict(os.environ, HOME=str(tmp_path / "home"))
    cases = [  # (arguments, working directory, environment, what the sentence says)
        (["--hf-dir", src, "--out", "", "--overwrite"], "cwd", None, "error: --out is empty"),
        (["--hf-dir", " ", "--out", str(tmp_path / "o")], "cwd", None, "error: --hf-dir is empty"),
        (["--hf-dir", src, "--out", src, "--overwrite"], "cwd", None, "is the source checkpoint"),
        (["--hf-dir", src, "--out", str(tmp_path / "models"), "--overwrite"], "cwd", None,
         "contains the source checkpoint"),
        (["--hf-dir", src, "--out", str(tmp_path / "other"), "--overwrite"], "cwd", None,
         "--overwrite replaces only an earlier conversion, and"),
        (["--hf-dir", src, "--out", "."], "empty", None, "is the current directory, which is never replaced"),
        (["--hf-dir", src, "--out", str(tmp_path / "home"), "--overwrite"], "cwd", home,
         "is your home directory, which is never replaced"),
        (["--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "cwd", None, "is not a directory"),
    ]
    before = _tree(tmp_path)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args,
                               "--no-progress"], cwd=tmp_path / cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, cwd, env, _ in cases]
    for p, (args, _, _, msg) in zip(procs, cases, strict=True):
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 1 and msg in err and "Traceback" not in err, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one sentence
    assert _tree(tmp_path) == before


def test_a_failed_conversion_is_removed_while_writes_are_still_in_flight(hf_dirs, tmp_path, monkeypatch):
    """A failed orbax save can return while tensorstore's threads still write its other files; they recreate
    folders inside the temporary directory after a first removal. Here a thread keeps writing into it for
    0.3 s after the failure; nothing may be left once convert has raised."""
    import threading
    import time

    def failing_finish(self):
        tmp = os.path.dirname(self.dirs[0])

        def in_flight():
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                try:  # a folder can go away between any two of these calls
                    os.makedirs(os.path.join(tmp, "stage_0.partial_save", "d"), exist_ok=True)
                    with open(os.path.join(tmp, "stage_0.partial_save", "d", "chunk"), "w") as f:
                        f.write("x")
                except OSError:
                    pass
                time.sleep(0.005)

        threading.Thread(target=in_flight, daemon=True).start()
        time.sleep(0.05)
        raise OSError(27, "File too large")

    monkeypatch.setattr(stage_checkpoint._StageWriter, "finish", failing_finish)
    with pytest.raises(OSError, match="File too large"):
        convert(hf_dirs["e2b", "causal"], str(tmp_path / "conv"), progress=False, log=lambda s: None)
    time.sleep(0.4)  # the writer has stopped by now; whatever it made after convert returned would show
    assert os.listdir(tmp_path) == []


def test_loader_refuses_a_conversion_without_manifest(hf_dirs, tmp_path):
    out = str(tmp_path / "conv")
    convert(hf_dirs["31b", "causal"], out, progress=False, log=lambda s: None)
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(Gemma4Error, match="has no manifest.json: the conversion did not finish"):
        gemma4_jax.load(out)


def test_loader_refuses_a_conversion_of_another_format_version(hf_dirs, tmp_path):
    """v1 conversions stored the MoE experts transposed: loading one must ask for a new conversion, not fail on
    shapes (or, worse, load a square expert the wrong way round)."""
    out = str(tmp_path / "conv")
    convert(hf_dirs["26b-a4b", "causal"], out, progress=False, log=lambda s: None)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["format_version"] = 1
    with open(path, "w") as f:
        json.dump(m, f)
    with pytest.raises(Gemma4Error, match="format v1, this one reads v2.*convert it again"):
        gemma4_jax.load(out)
