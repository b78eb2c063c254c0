"""Per-stage orbax checkpoints: converting a Hugging Face checkpoint, and restoring stages onto devices.

Owns the on-disk format written by `tools/convert_checkpoint.py`:

  OUT/manifest.json      written last; the loader refuses a directory without it
  OUT/stage_<k>/         one orbax checkpoint per pipeline stage (the tree described in parallel/stages.py)
  OUT/config.json, tokenizer.json, chat_template.jinja, generation_config.json, ...  copied as-is

Conversion streams: tensors are read one at a time from memory-mapped safetensors, cut into their
stages' leaves, cast, and handed to orbax in small batches (orbax partial saves), so the resident
memory stays near one tensor however large the checkpoint is. Everything is written into a
temporary directory beside OUT and renamed into place at the end; `check_output` says which OUT are refused
(with overwrite, only an earlier conversion is replaced, and only once the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial
from tqdm.auto import tqdm

from ..cli import check_cwd, probe_write
from ..config import Gemma4Config
from ..errors import CheckpointError, ConfigError
from ..model.text import target_shapes
from ..parallel.stages import (
    Path,
    Stage,
    best_stages,
    describe,
    placements,
    shape_at,
    split_params,
    stage_bytes,
    stage_leaf_shapes,
    stages_from_bounds,
)
from ..tokenizer import Tokenizer, check_side_files
from .hf import HFCheckpoint, read_tower_tensors
from .safetensors_io import save_file

MANIFEST = "manifest.json"
FORMAT = "gemma4-jax-stages"
# v2 (2026-12-02): MoE expert weights kept in the checkpoint's [out, in] layout (v1 stored them transposed).
FORMAT_VERSION = 2
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Leaves are handed to orbax in batches of about this many bytes (one partial save each).
FLUSH_BYTES = 64 << 20
DTYPE_NAMES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def _quiet_orbax():
    logging.getLogger("absl").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# HF tensor -> stage leaves


TABLES = ("embed", "head", "ple_table")  # stored in row chunks so that no step holds a whole table
CHUNK_BYTES = 64 << 20


def table_chunk_rows(cfg: Gemma4Config, itemsize: int) -> dict[str, int]:
    """Rows per stored chunk of each table, from the width of the whole table (the same on every stage)."""
    widths = {"embed": cfg.hidden_size, "head": cfg.hidden_size, "ple_table": max(1, cfg.num_layers * cfg.ple_dim)}
    return {name: max(1, CHUNK_BYTES // (w * itemsize)) for name, w in widths.items()}


def stored_leaves(leaves: dict[Path, tuple[int, ...]], chunk_rows: dict[str, int]) -> dict[Path, tuple[int, ...]]:
    """The leaves as stored: tables cut into row chunks ("embed", "<c>"), everything else as is."""
    out = {}
    for path, shape in leaves.items():
        if path[0] in TABLES:
            rows = chunk_rows[path[0]]
            for c, lo in enumerate(range(0, shape[0], rows)):
                out[(path[0], str(c))] = (min(rows, shape[0] - lo), shape[1])
        else:
            out[path] = shape
    return out


class _StageWriter:
    """Collects leaves per stage and writes them with orbax partial saves; each leaf exactly once."""

    def __init__(self, root: str, stages: tuple[Stage, ...], expected, dtype, flush_bytes: int = FLUSH_BYTES):
        self.dirs = [os.path.join(root, f"stage_{s.index}") for s in stages]
        self.expected, self.dtype, self.flush_bytes = expected, np.dtype(dtype), flush_bytes
        self.pending: list[dict] = [{} for _ in stages]
        self.pending_bytes = 0
        self.written: list[set[Path]] = [set() for _ in stages]

    def add(self, stage: int, leaf: Path, value: np.ndarray, hf_name: str) -> None:
        want = self.expected[stage].get(leaf)
        if want is None or leaf in self.written[stage]:
            raise CheckpointError(f"tensor {hf_name} would set stage {stage}'s {'/'.join(leaf)} twice")
        if tuple(value.shape) != want:
            raise CheckpointError(f"tensor {hf_name} maps to shape {list(value.shape)}, expected {list(want)}")
        arr = np.ascontiguousarray(value, dtype=self.dtype)  # the one copy: cast (and transpose) of one tensor
        arr = arr.reshape(1) if arr.ndim == 0 else arr  # orbax stores scalars as [1]
        node = self.pending[stage]
        for key in leaf[:-1]:
            node = node.setdefault(key, {})
        node[leaf[-1]] = arr
        self.written[stage].add(leaf)
        self.pending_bytes += arr.nbytes
        if self.pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        for k, tree in enumerate(self.pending):
            if tree:
                partial.save(self.dirs[k], tree)
        self.pending = [{} for _ in self.pending]
        self.pending_bytes = 0

    def finish(self) -> None:
        self.flush()
        for k, d in enumerate(self.dirs):
            missing = sorted(set(self.expected[k]) - self.written[k])
            if missing:
                raise CheckpointError(f"stage {k} was not given {'/'.join(missing[0])}")
            partial.finalize(d)


def source_dtype(ckpt: HFCheckpoint) -> str:
    full, _, st = ckpt.items[0]
    name = np.dtype(st.get(full).dtype).name
    if name not in DTYPE_NAMES:
        raise ConfigError(f"the checkpoint's tensors are {name}; pass --dtype float32 or --dtype bfloat16")
    return name


def _is_conversion(path: str) -> bool:
    """Whether `path` is a directory written by the converter (it holds our manifest, of any format version)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def check_output(hf_dir: str, out: str, overwrite: bool = False) -> str:
    """The absolute path at which to write a conversion of `hf_dir`, once `out` is known to lose nothing;
    else ConfigError with one sentence. Refused: an empty `out`; the source, a folder inside it or one holding
    it; the current or the home directory, or a folder holding either; an existing file or non-empty directory
    without `overwrite`, and with it anything but an earlier conversion; a place that cannot take new entries.
    Paths are compared as real paths (symbolic links resolved). Writes nothing."""
    check_cwd()
    if not os.fspath(hf_dir).strip():
        raise ConfigError("--hf-dir is empty; name the Hugging Face checkpoint directory to convert")
    if not os.fspath(out).strip():
        raise ConfigError("--out is empty; name the directory to write the conversion to")
    if _is_conversion(hf_dir):
        raise ConfigError(f"--hf-dir {hf_dir} is already a conversion (it holds the converter's {MANIFEST}); load it "
                          f"as it is, or convert the Hugging Face checkpoint it came from")
    out = os.path.abspath(out)
    real, src = os.path.realpath(out), os.path.realpath(hf_dir)
    if _within(real, src) or _within(src, real):
        how = "is" if real == src else "lies inside" if _within(real, src) else "contains"
        raise ConfigError(f"--out {out} {how} the source checkpoint {hf_dir}; choose a directory outside it")
    for name, keep in (("the current directory", os.getcwd()), ("your home directory", os.path.expanduser("~"))):
        if _within(os.path.realpath(keep), real):
            how = "is" if real == os.path.realpath(keep) else "contains"
            raise ConfigError(f"--out {out} {how} {name}, which is never replaced; choose another --out")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
        if not _is_conversion(out):
            raise ConfigError(f"--overwrite replaces only an earlier conversion, and {out} is not one (it has no "
                              f"converter {MANIFEST}); remove it yourself or choose another --out")
    base = os.path.dirname(out)
    while not os.path.exists(base):  # the nearest existing folder above --out must take new entries
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ConfigError(f"cannot write {out}: {base} is a file, not a directory")
    try:
        probe_write(base)  # permissions alone miss read-only mounts and root squash
    except OSError:
        raise ConfigError(f"cannot write {out}: {base} is not writable") from None
    return out


def convert(hf_dir: str, out: str, stages: tuple[Stage, ...] | None = None, *, pp: int | None = None,
            dtype: str | None = None, overwrite: bool = False, progress: bool = True,
            log: Callable[[str], None] = print, progress_file=None) -> dict:
    """Convert an HF Gemma 4 directory into per-stage orbax checkpoints at `out`; returns the manifest.
    The progress bar goes to `progress_file` (default: stderr).

    `stages` (explicit split) or `pp` (the split with the fewest parameter bytes per device, see
    `stages.best_stages`); `dtype` defaults to the checkpoint's own.
    Raises Gemma4Error subclasses with one sentence (`check_output` says which `out` are refused; a malformed
    tokenizer or generation config is refused too) before anything is written; never leaves a partial `out`,
    and an earlier conversion at `out` (with `overwrite`) is deleted only after the new one is in its place.
    """
    _quiet_orbax()
    out = check_output(hf_dir, out, overwrite)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir} is not a directory")
    check_side_files(hf_dir)  # the side files are copied as-is: refuse now what `load` would refuse later,
    Tokenizer.maybe_load(hf_dir)  # tokenizer.json included
    cfg = Gemma4Config.from_json(hf_dir)
    ckpt = HFCheckpoint(hf_dir, cfg)  # validates every name and shape before anything is written
    dtype = dtype or source_dtype(ckpt)
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
    itemsize = np.dtype(DTYPE_NAMES[dtype]).itemsize
    if stages is None:
        stages = best_stages(cfg, 1 if pp is None else pp, itemsize)
    else:
        stages = stages_from_bounds([s.start for s in stages] + [stages[-1].stop], cfg.num_layers)
    log(f"{cfg.num_layers} layers in {len(stages)} stage(s), {dtype}:\n" + describe(cfg, stages, itemsize))

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.converting-", dir=parent)
    try:
        chunk_rows = table_chunk_rows(cfg, itemsize)
        expected = [stored_leaves(lv, chunk_rows) for lv in stage_leaf_shapes(cfg, stages)]
        writer = _StageWriter(tmp, stages, expected, DTYPE_NAMES[dtype])
        bar = None
        if progress:
            bar = tqdm(total=ckpt.nbytes, desc="converting", unit="B", unit_scale=True, unit_divisor=1024,
                       file=progress_file)
        t0 = time.perf_counter()
        for full, entry, st in ckpt:
            value = st.get(full)
            for t in entry.targets:
                trees = split_params(cfg, stages, {t.path: t.transform(value)})
                leaves = [(k, leaf, arr) for k, tree in enumerate(trees) for leaf, arr in tree.items()]
                if leaves[0][1][0] not in TABLES:
                    for k, leaf, arr in leaves:
                        writer.add(k, leaf, arr, full)
                    continue
                # A table: chunk by chunk, dropping each chunk's mapped pages once it is handed over.
                rows = chunk_rows[leaves[0][1][0]]
                row_bytes = st.nbytes(full) // value.shape[0]
                for c, lo in enumerate(range(0, value.shape[0], rows)):
                    for k, leaf, arr in leaves:
                        writer.add(k, (leaf[0], str(c)), arr[lo:lo + rows], full)
                    st.release(full, lo * row_bytes, (lo + rows) * row_bytes)
            del value
            st.release(full)
            if bar is not None:
                bar.update(st.nbytes(full))
        writer.finish()
        if bar is not None:
            bar.close()
        towers = _write_towers(hf_dir, tmp, dtype)
        for name in COPIED_FILES:
            src = os.path.join(hf_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
        with open(os.path.join(hf_dir, "config.json")) as f:
            raw_config = json.load(f)
        sizes = _stage_sizes(tmp, len(stages))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_stages": len(stages),
            "layer_split": [s.start for s in stages] + [stages[-1].stop],
            "dtype": dtype,
            "table_chunk_rows": chunk_rows,
            "head": ("untied: lm_head.weight as 'head' on the last stage" if not cfg.tie_word_embeddings
                     else "tied: embedding on stage 0; copied as 'head' onto the last stage" if len(stages) > 1
                     else "tied: embedding on stage 0 serves as the head"),
            "stages": [{"dir": f"stage_{s.index}", "layers": [s.start, s.stop], "param_bytes": pb,
                        "bytes_on_disk": b, "leaves": len(writer.written[s.index])}
                       for s, pb, b in zip(stages, stage_bytes(cfg, stages, itemsize), sizes, strict=True)],
            "source": {"hf_dir": os.path.abspath(hf_dir), "prefix": ckpt.prefix, "files": ckpt.source_files()},
            "config": raw_config,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if towers:
            manifest["towers"] = towers
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # the last file written
            json.dump(manifest, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary directory
        check_output(hf_dir, out, overwrite)  # again: something may have appeared at `out` while converting
        _replace_dir(tmp, out)
    except BaseException:
        remove_for_good(tmp)
        raise
    return manifest


def remove_for_good(path: str, quiet_s: float = 0.5, timeout_s: float = 30.0) -> None:
    """Remove the directory `path`, and again whenever it reappears, until it has stayed away `quiet_s`
    seconds: a failed orbax save returns while tensorstore's threads may still be writing its other files,
    which can recreate them (and their folders) after a first removal."""
    end = time.monotonic() + timeout_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        gone = time.monotonic()
        while not os.path.exists(path) and time.monotonic() - gone < quiet_s:
            time.sleep(0.02)
        if not os.path.exists(path) or time.monotonic() > end:
            return


TOWERS_FILE = "stage_0_towers.safetensors"


def _write_towers(hf_dir: str, root: str, dtype: str) -> dict | None:
    """The vision/audio towers and their embedders, for the first stage only: one safetensors file of
    their HF-named tensors (cast to `dtype`) beside stage 0's checkpoint; None when there are none."""
    tensors = read_tower_tensors(hf_dir)
    if not tensors:
        return None
    target = np.dtype(jnp.dtype(dtype))
    tensors = {k: (v.astype(target) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v)
               for k, v in tensors.items()}
    save_file(tensors, os.path.join(root, TOWERS_FILE))
    return {"file": TOWERS_FILE, "stage": 0, "tensors": len(tensors),
            "bytes": os.path.getsize(os.path.join(root, TOWERS_FILE))}


def _stage_sizes(root: str, n: int) -> list[int]:
    out = []
    for k in range(n):
        total = 0
        for dirpath, _, files in os.walk(os.path.join(root, f"stage_{k}")):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        out.append(total)
    return out


def _replace_dir(tmp: str, out: str) -> None:
    """Move the finished conversion `tmp` to `out`. An earlier `out` is moved aside first and deleted only once
    `tmp` has taken its place; if that fails, it is put back."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    aside = os.path.join(old, "x")
    try:
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
    except BaseException:
        with contextlib.suppress(OSError):  # empty, unless the earlier conversion could not be put back
            os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Restoring


def is_stage_dir(path: str) -> bool:
    """A converter output (finished or not), as opposed to a Hugging Face directory."""
    return os.path.exists(os.path.join(path, MANIFEST)) or any(n.startswith("stage_") for n in os.listdir(path))


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path} has no {MANIFEST}: the conversion did not finish; convert again")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError:
        raise CheckpointError(f"{mpath} is not valid JSON") from None
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a {FORMAT} v{FORMAT_VERSION} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} was converted by another version of gemma4-jax "
                              f"(format v{m.get('format_version')}, this one reads v{FORMAT_VERSION}); "
                              "convert it again")
    return m


def manifest_stages(m: dict, cfg: Gemma4Config) -> tuple[Stage, ...]:
    return stages_from_bounds(m["layer_split"], cfg.num_layers)


def _restore_stored(stage_dir: str, leaves: dict[Path, tuple[tuple[int, ...], object]], sharding) -> dict:
    """Restore stored leaves {path: (shape, dtype)} of one stage checkpoint onto `sharding`, cast to dtype."""
    _quiet_orbax()
    item, args = {}, {}
    for path, (shape, dtype) in leaves.items():
        shape = shape or (1,)  # scalars are stored as [1]
        node_i, node_a = item, args
        for key in path[:-1]:
            node_i, node_a = node_i.setdefault(key, {}), node_a.setdefault(key, {})
        node_i[path[-1]] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        node_a[path[-1]] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=shape)
    state = os.path.join(os.path.abspath(stage_dir), "state")
    if not os.path.isdir(state):
        raise CheckpointError(f"{stage_dir} is missing or incomplete")
    tree = ocp.PyTreeCheckpointer().restore(
        state, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    out = {}
    for path in leaves:
        node = tree
        for key in path:
            node = node[key]
        out[path] = node.reshape(()) if leaves[path][0] == () else node
    return out


def restore_leaves(root: str, stage: int, leaves: dict[Path, tuple[int, ...]], dtype, sharding) -> dict:
    """Restore logical leaves {path: shape} of stage `stage` of the conversion at `root`, as `dtype`
    arrays placed with `sharding`; tables are put back together from their row chunks on the device."""
    chunk = read_manifest(root)["table_chunk_rows"]
    stage_dir = os.path.join(root, f"stage_{stage}")
    stored = {}
    for path, shape in leaves.items():
        if path[0] in TABLES:
            stored.update(stored_leaves({path: shape}, chunk))
        else:
            stored[path] = shape
    got = _restore_stored(stage_dir, {p: (sh, dtype) for p, sh in stored.items()}, sharding)
    concat = jax.jit(lambda xs: jnp.concatenate(xs, axis=0), out_shardings=sharding)
    out = {}
    for path, shape in leaves.items():
        if path[0] in TABLES:
            chunks = [got.pop(c) for c in stored_leaves({path: shape}, chunk)]
            out[path] = chunks[0] if len(chunks) == 1 else concat(chunks)
            del chunks
        else:
            out[path] = got.pop(path)
    return out


def load_single_stage(path: str, cfg: Gemma4Config, dtype, device=None) -> dict[Path, jax.Array]:
    """A one-stage conversion as `Gemma4Text` parameters {path: array on `device`} (the stage layout's inverse,
    from `stages.placements`): every leaf is restored in one orbax call; a parameter stored whole is used as it
    is, one stored in pieces (the per-layer-input projection, by layer) is put together on the device."""
    m = read_manifest(path)
    stages = manifest_stages(m, cfg)
    if len(stages) != 1:
        raise ConfigError(f"{path} holds {len(stages)} stages; load it with pp={len(stages)}")
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    got = restore_leaves(path, 0, stage_leaf_shapes(cfg, stages)[0], dtype, sharding)
    out: dict[Path, jax.Array] = {}
    for target, (shape, _) in target_shapes(cfg, np.float32).items():
        places = placements(cfg, stages, target)
        if len(places) == 1 and shape_at(shape, places[0][2]) == shape:
            out[target] = got.pop(places[0][1])
            continue

        def join(pieces, shape=shape, places=places):
            whole = jnp.zeros(shape, pieces[0].dtype)
            for (_, _, index), piece in zip(places, pieces, strict=True):
                whole = whole.at[index].set(piece)
            return whole

        out[target] = jax.jit(join, out_shardings=sharding)([got.pop(leaf) for _, leaf, _ in places])
    return out
