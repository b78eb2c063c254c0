"""How a model is cut into pipeline stages: the split, what each stage holds, and what it weighs.

Owns the split itself (parsing and checking `--layer-split`, the default split balanced by
parameter bytes, and the split with the fewest bytes per device in the pipeline's stacked layout),
the one placement rule (`placements`: which model parameter goes to which stage, as which leaf) used
by the converter, the HF → pipeline path and the restore, and the one byte counter (`layer_bytes`,
`device_param_bytes`) used by the planners and `describe`. Layer ranges are half-open `[start, stop)`.

What a stage holds (the stage-local parameter tree, leaf paths as tuples):
  ("embed",)                     [V, D]  first stage only (token embedding)
  ("head",)                      [V, D]  last stage only (`holds_head`): the untied head, or, when there are
                                         ≥ 2 stages, a copy of the tied embedding, so the last stage needs
                                         nothing from the first
  ("final_norm",)                [D]     last stage
  ("ple_norm",)                  [P]     every stage (per-layer-input models)
  ("ple_table",)                 [Vp, n·P] the stage's n layers' columns of the per-layer embedding table
  ("layers", "<l>", *rest)               layer l's parameters, exactly as the model's ("layers", "<l>", *rest)
  ("layers", "<l>", "ple_model_proj") [D, P] layer l's slice of the per-layer model projection
Splitting the per-layer-input tables by layer puts each stage's share of E2B's 4.7 GB table on
that stage; a stage computes its own per-layer inputs from the token ids and the input embedding.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import Gemma4Config
from ..errors import ConfigError
from ..model.text import target_shapes

Path = tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: layers [start, stop) of `num_stages`."""

    index: int
    start: int
    stop: int
    num_stages: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


def stages_from_bounds(bounds: list[int] | tuple[int, ...], num_layers: int) -> tuple[Stage, ...]:
    """Stages from boundaries `0, a, b, ..., L`; raises ConfigError when they do not cover the layers."""
    b = [int(x) for x in bounds]
    if len(b) < 2 or b[0] != 0 or b[-1] != num_layers:
        raise ConfigError(f"a layer split must run from 0 to {num_layers} (the model's layer count), got {b}")
    if any(hi <= lo for lo, hi in zip(b, b[1:], strict=False)):
        raise ConfigError(f"a layer split must be strictly increasing (every stage needs a layer), got {b}")
    n = len(b) - 1
    return tuple(Stage(i, b[i], b[i + 1], n) for i in range(n))


def parse_layer_split(text: str, num_layers: int) -> tuple[Stage, ...]:
    try:
        bounds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"a layer split must be comma-separated integers like 0,21,42, got {text!r}") from None
    return stages_from_bounds(bounds, num_layers)


@functools.cache
def layer_param_shapes(cfg: Gemma4Config) -> tuple[dict[Path, tuple[int, ...]], ...]:
    """Per decoder layer: {path below ("layers", "<l>"): shape} of the model's parameters."""
    out: list[dict[Path, tuple[int, ...]]] = [{} for _ in range(cfg.num_layers)]
    for path, (shape, _) in target_shapes(cfg, np.float32).items():
        if path[0] == "layers":
            out[int(path[1])][path[2:]] = shape
    return tuple(out)


def layer_param_bytes(cfg: Gemma4Config, itemsize: int) -> np.ndarray:
    """Bytes of each decoder layer's own parameters [L] (without its per-layer-input table columns)."""
    return np.array([sum(math.prod(sh) for sh in layer.values()) * itemsize for layer in layer_param_shapes(cfg)],
                    np.int64)


def ple_layer_bytes(cfg: Gemma4Config, itemsize: int) -> int:
    """Bytes of one layer's columns of the per-layer-input table and projection (0 without PLE)."""
    return (cfg.ple_vocab_size + cfg.hidden_size) * cfg.ple_dim * itemsize


def layer_bytes(cfg: Gemma4Config, itemsize: int) -> np.ndarray:
    """Parameter bytes of each decoder layer [L], its per-layer-input table columns included."""
    return layer_param_bytes(cfg, itemsize) + ple_layer_bytes(cfg, itemsize)


def holds_head(cfg: Gemma4Config, num_stages: int) -> bool:
    """Whether the last stage holds a ("head",) table: the untied head always, the tied embedding's copy when
    there are ≥ 2 stages (one stage reads the embedding itself)."""
    return not cfg.tie_word_embeddings or num_stages > 1


def head_source(cfg: Gemma4Config) -> Path:
    """The model parameter the last stage's ("head",) table is: the embedding when tied, else `lm_head`."""
    return ("embed",) if cfg.tie_word_embeddings else ("lm_head",)


def placements(cfg: Gemma4Config, stages: tuple[Stage, ...], path: Path) -> list[tuple[int, Path, tuple]]:
    """Where the model parameter `path` lives in the stage layout: (stage, leaf path, numpy index into the
    parameter) for each place (a parameter may go to several stages, or be cut by layer)."""
    last, whole, p = stages[-1].index, (Ellipsis,), cfg.ple_dim
    out = []
    if path == head_source(cfg) and holds_head(cfg, len(stages)):
        out.append((last, ("head",), whole))  # the head table, so the last stage stands alone
    if path[0] == "layers":
        out.append((stage_of_layer(stages, int(path[1])).index, path, whole))
    elif path == ("embed",):
        out.append((0, path, whole))
    elif path == ("final_norm",):
        out.append((last, path, whole))
    elif path == ("ple_norm",):
        out += [(s.index, path, whole) for s in stages]
    elif path == ("ple_embed",):  # [Vp, L·P] -> each stage's columns [Vp, n·P]
        out += [(s.index, ("ple_table",), (slice(None), slice(s.start * p, s.stop * p))) for s in stages]
    elif path == ("ple_proj",):  # [D, L, P] -> per layer [D, P]
        out += [(stage_of_layer(stages, layer).index, ("layers", str(layer), "ple_model_proj"), (slice(None), layer))
                for layer in range(cfg.num_layers)]
    elif path != ("lm_head",):  # the untied head is only the ("head",) table, above
        raise AssertionError(f"no stage rule for {path}")
    return out


def split_params(cfg: Gemma4Config, stages: tuple[Stage, ...], params: Mapping[Path, np.ndarray]) -> list[dict]:
    """Model parameters {path: array} -> each stage's leaves {leaf path: array (a view where numpy can)}."""
    out: list[dict[Path, np.ndarray]] = [{} for _ in stages]
    for path, value in params.items():
        for k, leaf, index in placements(cfg, stages, path):
            out[k][leaf] = value[index]
    return out


def shape_at(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    """The shape of `array[index]` for an array of `shape` (no memory)."""
    return np.broadcast_to(np.zeros((), np.int8), shape)[index].shape


def stage_leaf_shapes(cfg: Gemma4Config, stages: tuple[Stage, ...]) -> list[dict[Path, tuple[int, ...]]]:
    """{leaf path: shape} of every stage, from the model's parameter shapes."""
    out: list[dict[Path, tuple[int, ...]]] = [{} for _ in stages]
    for path, (shape, _) in target_shapes(cfg, np.float32).items():
        for k, leaf, index in placements(cfg, stages, path):
            out[k][leaf] = shape_at(shape, index)
    return out


def stage_bytes(cfg: Gemma4Config, stages: tuple[Stage, ...], itemsize: int) -> list[int]:
    """Parameter bytes each stage holds (embedding on the first, the head on the last: `holds_head`)."""
    per_layer = layer_bytes(cfg, itemsize)
    emb = cfg.vocab_size * cfg.hidden_size * itemsize
    out = []
    for s in stages:
        b = int(per_layer[s.start:s.stop].sum())
        b += emb if s.first else 0
        b += emb if (s.last and holds_head(cfg, len(stages))) else 0
        out.append(b)
    return out


def balanced_stages(cfg: Gemma4Config, pp: int, itemsize: int = 2) -> tuple[Stage, ...]:
    """The contiguous split into `pp` stages that minimises the largest stage's parameter bytes.

    Balanced by bytes, not layer count: the first stage carries the embedding and the last its
    copy as the head, and layers differ in size (MoE, double-wide MLPs, head dims). Exact dynamic
    programme over split points (L ≤ a few hundred).
    """
    L = cfg.num_layers
    if pp < 1:
        raise ConfigError(f"pp must be at least 1, got {pp}")
    if pp > L:
        raise ConfigError(f"pp={pp} is more stages than the model's {L} layers")
    w = layer_bytes(cfg, itemsize).astype(np.float64)
    emb = float(cfg.vocab_size * cfg.hidden_size * itemsize)
    prefix = np.concatenate([[0.0], np.cumsum(w)])

    def cost(lo, hi, k):  # stage k holds layers [lo, hi)
        c = prefix[hi] - prefix[lo]
        if k == 0:
            c += emb
        if k == pp - 1 and holds_head(cfg, pp):
            c += emb
        return c

    inf = float("inf")
    best = np.full((pp + 1, L + 1), inf)  # best[k][j]: min over splits of layers [0,j) into k stages of max cost
    arg = np.zeros((pp + 1, L + 1), np.int64)
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, L - (pp - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], cost(i, j, k - 1))
                if v < best[k][j]:
                    best[k][j], arg[k][j] = v, i
    bounds = [L]
    for k in range(pp, 0, -1):
        bounds.append(int(arg[k][bounds[-1]]))
    return stages_from_bounds(bounds[::-1], L)


def storage_kinds(cfg: Gemma4Config) -> dict[str, str]:
    """{layer kind: the kind whose stack stores it in the pipeline's stage layout}. A KV-shared kind whose
    parameters are a subset of a KV-owning kind's (same head dims, same MLP) shares that kind's stack:
    otherwise a split that puts the owners on one stage and the readers on another would pad both stacks to
    the full count on every stage (E4B at pp=2: 1.5× the weights). Shared layers leave their K/V at zero."""
    shapes = {}
    for spec, layer in zip(cfg.layers, layer_param_shapes(cfg), strict=True):
        shapes.setdefault(spec.kind, (spec, layer))
    out = {}
    for k, (spec, own) in shapes.items():
        out[k] = k
        if not spec.owns_kv:
            for o, (ospec, other) in shapes.items():
                if ospec.owns_kv and all(other.get(p) == sh for p, sh in own.items()):
                    out[k] = o
                    break
    return out


def _stacked_cost(cfg: Gemma4Config, itemsize: int):
    """bounds -> the bytes of the layers' part of the stage-stacked layout on each device: every stage holds
    as many slots of each stack as the fullest stage (padding included), and PLE columns for its longest."""
    storage = storage_kinds(cfg)
    kinds = tuple(dict.fromkeys(storage.values()))
    own = layer_param_bytes(cfg, itemsize)
    slot = {k: int(own[next(s.index for s in cfg.layers if s.kind == k)]) for k in kinds}
    prefix = {k: np.concatenate([[0], np.cumsum([storage[s.kind] == k for s in cfg.layers])]) for k in kinds}
    ple = ple_layer_bytes(cfg, itemsize)

    def cost(bounds) -> int:
        pairs = list(itertools.pairwise(bounds))
        n = ple * max(b - a for a, b in pairs)
        for k, pre in prefix.items():
            n += slot[k] * max(1, max(int(pre[b] - pre[a]) for a, b in pairs))
        return n

    return cost


def device_param_bytes(cfg: Gemma4Config, stages: tuple[Stage, ...], itemsize: int) -> int:
    """Bytes of stage-stacked parameters on each device (every device holds one block of the same shape:
    the table, final norm, PLE norm and the padded layer stacks): exact, from the layout's shapes."""
    fixed = cfg.vocab_size * cfg.hidden_size + cfg.hidden_size + cfg.ple_dim
    return fixed * itemsize + _stacked_cost(cfg, itemsize)([s.start for s in stages] + [stages[-1].stop])


def best_stages(cfg: Gemma4Config, pp: int, itemsize: int = 2) -> tuple[Stage, ...]:
    """The contiguous split whose per-device parameter bytes in the stacked layout (padding included) are
    smallest. Exhaustive over split points when there are at most 20 000 candidates (pp ≤ 4 for every
    Gemma 4), else the split balanced by logical bytes (`balanced_stages`), which it always starts from."""
    best = balanced_stages(cfg, pp, itemsize)
    if pp == 1 or math.comb(cfg.num_layers - 1, pp - 1) > 20_000:
        return best
    cost = _stacked_cost(cfg, itemsize)
    best_bounds = [s.start for s in best] + [cfg.num_layers]
    best_cost = cost(best_bounds)
    for cut in itertools.combinations(range(1, cfg.num_layers), pp - 1):
        bounds = [0, *cut, cfg.num_layers]
        c = cost(bounds)
        if c < best_cost:
            best_bounds, best_cost = bounds, c
    return stages_from_bounds(best_bounds, cfg.num_layers)


def stage_of_layer(stages: tuple[Stage, ...], layer: int) -> Stage:
    for s in stages:
        if s.start <= layer < s.stop:
            return s
    raise AssertionError(layer)


def describe(cfg: Gemma4Config, stages: tuple[Stage, ...], itemsize: int) -> str:
    """One line per stage: its layers and parameter bytes."""
    sizes = stage_bytes(cfg, stages, itemsize)
    lines = []
    for s, b in zip(stages, sizes, strict=True):
        extra = [x for x, on in (("embedding", s.first), ("head", s.last)) if on]
        lines.append(f"stage {s.index}: layers {s.start}-{s.stop - 1} ({s.stop - s.start} layers"
                     f"{', ' + ' + '.join(extra) if extra else ''}), {b / 2**30:.2f} GiB")
    return "\n".join(lines)
