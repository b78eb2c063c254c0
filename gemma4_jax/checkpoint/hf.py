"""Hugging Face Gemma 4 checkpoints → model parameters: the one strict converter table.

Owns the mapping from every HF tensor name to its place in `Gemma4Text` (path, layout transform), the
prefix detection (`model.language_model.` for Gemma4ForConditionalGeneration,
`model.` for Gemma4ForCausalLM), the list of tensors that may be ignored (KV weights of KV-shared
layers, the tied `lm_head`, non-text towers), and a streaming reader that fills each parameter
tensor by tensor and checks that every expected tensor is set exactly once with the
expected shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import Gemma4Config
from ..model.text import abstract_model, iter_params, target_shapes
from .safetensors_io import CheckpointError, SafetensorsFile, checkpoint_files

Path = tuple[str, ...]
# Prefixes of the non-text parts of a Gemma4ForConditionalGeneration checkpoint.
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor (or one part of it) goes."""

    path: Path  # parameter path in Gemma4Text: ("layers", "<i>", ...) for a layer's own
    transform: Callable[[np.ndarray], np.ndarray]  # HF layout -> our layout
    layer: int | None = None  # the decoder layer it belongs to; None for the embeddings and final norm


@dataclass(frozen=True)
class Entry:
    hf_shape: tuple[int, ...]
    targets: tuple[Target, ...]


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _same(a: np.ndarray) -> np.ndarray:
    return a


# The untied head's tensor, outside the text model's prefix in every layout. Tied checkpoints may carry it too
# (a copy of the embedding); transformers then ignores it, and so do we.
LM_HEAD = "lm_head.weight"


def converter_table(cfg: Gemma4Config) -> tuple[dict[str, Entry], set[str]]:
    """{HF name without prefix: Entry} for every tensor the model needs, and the ignorable names."""
    d, n, L, p = cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.ple_dim
    table: dict[str, Entry] = {}
    ignorable: set[str] = set() if not cfg.tie_word_embeddings else {LM_HEAD}

    def put(name, shape, *targets):
        table[name] = Entry(tuple(shape), tuple(targets))

    put("embed_tokens.weight", (cfg.vocab_size, d), Target(("embed",), _same))
    put("norm.weight", (d,), Target(("final_norm",), _same))
    if not cfg.tie_word_embeddings:  # an untied head (a fine-tune); its name has no model prefix
        put(LM_HEAD, (cfg.vocab_size, d), Target(("lm_head",), _same))
    if p:
        put("embed_tokens_per_layer.weight", (cfg.ple_vocab_size, L * p), Target(("ple_embed",), _same))
        put("per_layer_model_projection.weight", (L * p, d),
            Target(("ple_proj",), lambda a: a.T.reshape(d, L, p)))
        put("per_layer_projection_norm.weight", (p,), Target(("ple_norm",), _same))

    for spec in cfg.layers:
        pre, st = f"layers.{spec.index}.", ("layers", str(spec.index))
        h, k, f = spec.head_dim, spec.num_kv_heads, spec.mlp_width

        def tgt(*path, fn=_same, st=st, layer=spec.index):
            return Target(st + path, fn, layer)

        for hf, ours in (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attn_norm"),
                         ("pre_feedforward_layernorm", "pre_ffw_norm"),
                         ("post_feedforward_layernorm", "post_ffw_norm")):
            put(pre + hf + ".weight", (d,), tgt(ours))
        put(pre + "layer_scalar", (1,), tgt("layer_scalar", fn=lambda a: a.reshape(())))
        put(pre + "self_attn.q_proj.weight", (n * h, d), tgt("attn", "q_proj", fn=lambda a, h=h: a.T.reshape(d, n, h)))
        put(pre + "self_attn.q_norm.weight", (h,), tgt("attn", "q_norm"))
        put(pre + "self_attn.o_proj.weight", (d, n * h), tgt("attn", "o_proj", fn=lambda a, h=h: a.T.reshape(n, h, d)))
        kv_names = [pre + "self_attn." + x for x in ("k_proj.weight", "v_proj.weight", "k_norm.weight")]
        if spec.owns_kv:
            kv_fn = lambda a, h=h, k=k: a.T.reshape(d, k, h)  # noqa: E731
            put(kv_names[0], (k * h, d), tgt("attn", "k_proj", fn=kv_fn))
            put(kv_names[2], (h,), tgt("attn", "k_norm"))
            if not spec.k_eq_v:
                put(kv_names[1], (k * h, d), tgt("attn", "v_proj", fn=kv_fn))
        else:
            ignorable.update(kv_names)  # stale K/V weights of shared layers: never used
        put(pre + "mlp.gate_proj.weight", (f, d), tgt("mlp", "gate", fn=_t))
        put(pre + "mlp.up_proj.weight", (f, d), tgt("mlp", "up", fn=_t))
        put(pre + "mlp.down_proj.weight", (d, f), tgt("mlp", "down", fn=_t))
        if spec.moe:
            e, fe = cfg.num_experts, cfg.moe_intermediate_size
            put(pre + "router.proj.weight", (e, d), tgt("moe", "router_proj", fn=_t))
            put(pre + "router.scale", (d,), tgt("moe", "router_scale"))
            put(pre + "router.per_expert_scale", (e,), tgt("moe", "per_expert_scale"))
            # gate_up_proj[e] is [2F, D]: gate rows first, then up rows. The experts keep the checkpoint's
            # [out, in] layout (the MoE kernels read it in place).
            put(pre + "experts.gate_up_proj", (e, 2 * fe, d),
                tgt("moe", "gate", fn=lambda a, fe=fe: a[:, :fe, :]),
                tgt("moe", "up", fn=lambda a, fe=fe: a[:, fe:, :]))
            put(pre + "experts.down_proj", (e, d, fe), tgt("moe", "down"))
            put(pre + "pre_feedforward_layernorm_2.weight", (d,), tgt("pre_ffw_norm_2"))
            put(pre + "post_feedforward_layernorm_1.weight", (d,), tgt("post_ffw_norm_1"))
            put(pre + "post_feedforward_layernorm_2.weight", (d,), tgt("post_ffw_norm_2"))
        if spec.ple:
            put(pre + "per_layer_input_gate.weight", (p, d), tgt("ple_gate", fn=_t))
            put(pre + "per_layer_projection.weight", (d, p), tgt("ple_proj", fn=_t))
            put(pre + "post_per_layer_input_norm.weight", (d,), tgt("ple_post_norm"))
    return table, ignorable


def text_prefix(names: Iterable[str]) -> str:
    """`model.language_model.` (multimodal wrapper) or `model.` (text-only save)."""
    names = list(names)
    if any(nm.startswith("model.language_model.") for nm in names):
        return "model.language_model."
    if any(nm.startswith("model.") for nm in names):
        return "model."
    raise CheckpointError("the checkpoint holds no Gemma 4 text weights (no 'model.' tensors)")


class _Filler:
    """Numpy buffers filled tensor by tensor; each parameter must be set exactly once."""

    def __init__(self, shapes: dict[Path, tuple[tuple[int, ...], np.dtype]], wanted: Callable[[Path], bool]):
        self.shapes = {p: s for p, s in shapes.items() if wanted(p)}
        self.buffers: dict[Path, np.ndarray] = {}

    def set(self, target: Target, value: np.ndarray, hf_name: str) -> None:
        if target.path not in self.shapes:
            return
        if target.path in self.buffers:
            raise CheckpointError(f"tensor {hf_name} appears twice in the checkpoint")
        shape, dtype = self.shapes[target.path]
        value = target.transform(value)
        if value.shape != shape:  # the table checked the HF shape; this guards the transform
            raise CheckpointError(f"tensor {hf_name} maps to shape {value.shape}, expected {shape}")
        self.buffers[target.path] = np.array(value, dtype, copy=True)

    def missing(self) -> list[Path]:
        return [p for p in self.shapes if p not in self.buffers]


class HFCheckpoint:
    """The text tensors of an HF directory, validated against the converter table before any is read.

    Iterating yields (full name, Entry, file) for every tensor the model needs, in file order;
    names, shapes and duplicates of *all* tensors are checked up front, so a bad checkpoint fails
    before anything is written or allocated.
    """

    def __init__(self, hf_dir: str, cfg: Gemma4Config, files: list | None = None):
        self.hf_dir = hf_dir
        self.files = files if files is not None else [SafetensorsFile(f) for f in checkpoint_files(hf_dir)]
        names = [nm for st in self.files for nm in st.keys()]
        self.prefix = prefix = text_prefix(names)
        table, ignorable = converter_table(cfg)
        self.items: list[tuple[str, Entry, SafetensorsFile]] = []
        seen: set[str] = set()
        for st in self.files:
            for full in st.keys():
                if full.startswith(NON_TEXT_PREFIXES):
                    continue
                if full == LM_HEAD:  # the one text tensor outside the prefix
                    name = full
                elif full.startswith(prefix):
                    name = full[len(prefix):]
                else:
                    raise CheckpointError(f"unexpected tensor {full} (outside the text model prefix {prefix!r})")
                if name in ignorable:
                    continue
                entry = table.get(name)
                if entry is None:
                    raise CheckpointError(f"unexpected tensor {full} for this config")
                if st.shape(full) != entry.hf_shape:
                    got, want = list(st.shape(full)), list(entry.hf_shape)
                    raise CheckpointError(f"tensor {full} has shape {got}, expected {want}")
                if name in seen:
                    raise CheckpointError(f"tensor {full} appears twice in the checkpoint")
                seen.add(name)
                self.items.append((full, entry, st))
        absent = sorted(set(table) - seen, key=_natural)
        if LM_HEAD in absent:
            raise CheckpointError(f"checkpoint {hf_dir} says its head is not tied to the embedding "
                                  f"(tie_word_embeddings false) but holds no {LM_HEAD}")
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(f"checkpoint {hf_dir} lacks tensor {prefix}{absent[0]}{more}")

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return sum(st.nbytes(full) for full, _, st in self.items)

    def source_files(self) -> list[dict]:
        return [{"name": os.path.basename(st.path), "bytes": os.path.getsize(st.path)} for st in self.files]


class InMemoryTensors:
    """HF-named arrays already in memory (e.g. a torch model's `state_dict()` as numpy), read as one
    checkpoint file would be: `params_from_tensors` validates and converts them exactly as `read_hf_params`
    does a directory, without writing and reading a file. (Only what `HFCheckpoint` reads: the converter, which
    also asks a file's path and bytes, takes directories.)"""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name])


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: Gemma4Config,
                        dtype=jnp.float32) -> dict[Path, np.ndarray]:
    """`read_hf_params` for HF-named arrays in memory (`InMemoryTensors`): the same checks, the same params."""
    return _fill(HFCheckpoint("<in memory>", cfg, files=[InMemoryTensors(tensors)]), cfg, dtype, None, False)


def read_hf_params(hf_dir: str, cfg: Gemma4Config, dtype=jnp.float32, wanted: Callable[[Path], bool] | None = None,
                   progress: bool = False) -> dict[Path, np.ndarray]:
    """Read an HF directory into {path: numpy array in `dtype`}, tensor by tensor.

    `wanted(path)` restricts which parameters are materialised (a pipeline stage's share); the
    whole checkpoint is still validated. Raises CheckpointError with one clear sentence on a
    missing, unexpected, duplicated or misshaped tensor.
    """
    return _fill(HFCheckpoint(hf_dir, cfg), cfg, dtype, wanted, progress)


def _fill(ckpt: HFCheckpoint, cfg: Gemma4Config, dtype, wanted, progress: bool) -> dict[Path, np.ndarray]:
    filler = _Filler(target_shapes(cfg, dtype), wanted or (lambda p: True))
    items = iter(ckpt)
    if progress:
        items = tqdm(items, total=len(ckpt), desc="loading tensors", unit="tensor", leave=False)
    for full, entry, st in items:
        if any(t.path in filler.shapes for t in entry.targets):
            value = st.get(full)
            for t in entry.targets:
                filler.set(t, value, full)
    assert not filler.missing(), filler.missing()  # the table covers every parameter
    return filler.buffers


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def read_tower_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every `model.vision_tower.` / `model.embed_vision.` / `model.audio_tower.` / `model.embed_audio.`
    tensor of an HF directory, as numpy arrays."""
    out = {}
    for path in checkpoint_files(hf_dir):
        st = SafetensorsFile(path)
        for name in st.keys():
            if name.startswith(NON_TEXT_PREFIXES):
                out[name] = np.array(st.get(name))
    return out


def model_from_params(cfg: Gemma4Config, params: dict[Path, np.ndarray], dtype, put=jnp.asarray):
    """An NNX model whose parameters are `params` (placed with `put`, e.g. a sharded device_put)."""
    model = abstract_model(cfg, dtype)
    for path, var in iter_params(model):
        if path not in params:
            raise CheckpointError(f"no value for parameter {'/'.join(path)}")
        var.set_value(put(params[path]))
    return model
