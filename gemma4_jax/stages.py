"""How a model is cut into pipeline stages: contiguous layer ranges and what each stage holds.

Owns the split itself (parsing and checking `--layer-split`, the default split balanced by
parameter bytes), and the per-stage parameter layout that the converter writes and the loaders
read. Layer ranges are half-open `[start, stop)` over the decoder layers.

What a stage holds (the stage-local parameter tree, leaf paths as tuples):
  ("embed",)                     [V, D]  first stage only (token embedding)
  ("head",)                      [V, D]  last stage only (`holds_head`): the untied head, or, when there are
                                         ≥ 2 stages, a copy of the tied embedding, so the last stage needs
                                         nothing from the first
  ("final_norm",)                [D]     last stage
  ("ple_norm",)                  [P]     every stage (per-layer-input models)
  ("layers", "<l>", *rest)               layer l's parameters, `rest` as in `DecoderLayer`
  ("layers", "<l>", "ple_table") [Vp, P] layer l's columns of the per-layer embedding table
  ("layers", "<l>", "ple_model_proj") [D, P] layer l's slice of the per-layer model projection
Splitting the per-layer-input tables by layer puts each stage's share of E2B's 4.7 GB table on
that stage; a stage computes its own per-layer inputs from the token ids and the input embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Gemma4Config
from .errors import ConfigError
from .hf_checkpoint import target_shapes

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
        raise ConfigError(f"--layer-split must be comma-separated integers like 0,21,42, got {text!r}") from None
    return stages_from_bounds(bounds, num_layers)


def layer_bytes(cfg: Gemma4Config, itemsize: int) -> np.ndarray:
    """Parameter bytes of each decoder layer [L], its per-layer-input table columns included."""
    out = np.zeros(cfg.num_layers, np.int64)
    shapes = target_shapes(cfg, np.float32)
    for layer, (kind, _) in enumerate(cfg.layer_plan):
        n = cfg.kind_count(kind)
        for path, (shape, _) in shapes.items():
            if path[:2] == ("stacks", kind):
                out[layer] += int(np.prod(shape)) // n * itemsize
    if cfg.ple_dim:
        out += (cfg.ple_vocab_size + cfg.hidden_size) * cfg.ple_dim * itemsize
    return out


def holds_head(cfg: Gemma4Config, num_stages: int) -> bool:
    """Whether the last stage holds a ("head",) table: the untied head always, the tied embedding's copy when
    there are ≥ 2 stages (one stage reads the embedding itself)."""
    return not cfg.tie_word_embeddings or num_stages > 1


def head_source(cfg: Gemma4Config) -> Path:
    """The model parameter the last stage's ("head",) table is: the embedding when tied, else `lm_head`."""
    return ("embed",) if cfg.tie_word_embeddings else ("lm_head",)


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
