"""Gemma 4 text-model configuration: one frozen dataclass, built once from `config.json`.

Owns the parsing of both `config.json` forms that exist (the published checkpoints' flat
`global_head_dim` / `num_global_key_value_heads`, and newer transformers' `per_layer_config`),
for both the multimodal wrapper (`text_config`) and text-only files, and derives every per-layer
fact exactly once (`LayerSpec`). Also holds the real-shape presets of the four released variants.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """Everything that differs between decoder layers, derived once from the config.

    `kv_source` is the index of the layer whose keys/values this layer attends to: itself for
    ordinary layers, an earlier layer of the same attention type for KV-shared layers.
    """

    index: int
    attn_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # values are the raw key projection (full layers of 26B/31B)
    kv_source: int
    mlp_width: int
    moe: bool
    ple: bool
    window: int | None  # sliding window incl. the current token; None on full layers
    rope_theta: float
    rope_fraction: float  # share of head_dim that rotates (proportional RoPE); 1.0 = all
    rope_factor: float

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index

    @property
    def kind(self) -> str:
        """Name of the group of layers with identical parameter shapes (one stacked array each)."""
        parts = ["sliding" if self.attn_type == SLIDING else "full", f"h{self.head_dim}", f"kv{self.num_kv_heads}"]
        if not self.owns_kv:
            parts.append("shared")
        elif self.k_eq_v:
            parts.append("keqv")
        parts.append(f"f{self.mlp_width}")
        if self.moe:
            parts.append("moe")
        return "_".join(parts)


@dataclass(frozen=True)
class Gemma4Config:
    """The parsed text-decoder configuration. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float | None = 30.0
    sliding_window: int = 512
    # Per-layer embeddings (PLE); 0 disables them.
    ple_dim: int = 0
    ple_vocab_size: int = 0
    # Mixture of experts.
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    num_kv_shared_layers: int = 0
    max_position_embeddings: int = 131072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    architecture: str = "Gemma4ForCausalLM"
    name: str = "custom"
    # Tokens of one image attend to each other on sliding layers (use_bidirectional_attention="vision").
    bidirectional_vision: bool = False

    # ----------------------------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Distinct layer kinds in first-appearance order."""
        return tuple(dict.fromkeys(spec.kind for spec in self.layers))

    @property
    def layer_plan(self) -> tuple[tuple[str, int], ...]:
        """(kind, index among the layers of that kind) for every layer, in order."""
        counters: dict[str, int] = {}
        plan = []
        for spec in self.layers:
            plan.append((spec.kind, counters.get(spec.kind, 0)))
            counters[spec.kind] = counters.get(spec.kind, 0) + 1
        return tuple(plan)

    def kind_spec(self, kind: str) -> LayerSpec:
        """A representative LayerSpec of a kind (all members share parameter shapes)."""
        return next(s for s in self.layers if s.kind == kind)

    def replace(self, **changes: Any) -> Gemma4Config:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], name: str = "custom") -> Gemma4Config:
        """Build from a parsed HF `config.json` (wrapper with `text_config`, or text-only)."""
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if "text_config" in raw:
            if model_type not in (None, "gemma4"):
                raise ConfigError(f"unsupported model_type {model_type!r}; expected 'gemma4' or 'gemma4_text'")
            text = dict(raw["text_config"])
            if "tie_word_embeddings" in raw:  # the wrapper's own setting decides, as in transformers
                text["tie_word_embeddings"] = raw["tie_word_embeddings"]
            architecture = "Gemma4ForConditionalGeneration"
        else:
            if model_type not in (None, "gemma4_text"):
                raise ConfigError(f"unsupported model_type {model_type!r}; expected 'gemma4' or 'gemma4_text'")
            text = dict(raw)
            architecture = architectures[0] if architectures else "Gemma4ForCausalLM"
        if architecture not in ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4TextModel"):
            raise ConfigError(f"unsupported architecture {architecture!r}")
        eos = raw.get("eos_token_id", text.get("eos_token_id", 1))
        return cls._from_text_dict(text, architecture=architecture, eos=eos, name=name)

    @classmethod
    def _from_text_dict(cls, t: dict[str, Any], *, architecture: str, eos: Any, name: str) -> Gemma4Config:
        try:
            num_layers = int(t["num_hidden_layers"])
            hidden = int(t["hidden_size"])
            num_heads = int(t["num_attention_heads"])
            vocab = int(t["vocab_size"])
            intermediate = int(t["intermediate_size"])
        except KeyError as err:
            raise ConfigError(f"config.json lacks the field {err.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ConfigError("config.json's num_hidden_layers, hidden_size, num_attention_heads, vocab_size and "
                              "intermediate_size must be integers") from None
        for field, value in (("num_hidden_layers", num_layers), ("hidden_size", hidden),
                             ("num_attention_heads", num_heads), ("vocab_size", vocab)):
            if value < 1:
                raise ConfigError(f"config.json's {field} must be at least 1, got {value}")
        head_dim = int(t.get("head_dim") or hidden // num_heads)
        num_kv = int(t.get("num_key_value_heads") or num_heads)
        window = int(t.get("sliding_window") or 512)
        k_eq_v = bool(t.get("attention_k_eq_v", False))

        layer_types = list(t.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)])
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        layer_types[-1] = FULL  # transformers forces the last layer to full attention
        unknown = set(layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}")

        # Per-layer overrides: either the newer explicit form or derived from the flat fields.
        if "per_layer_config" in t and t["per_layer_config"] is not None:
            overrides = {int(k): dict(v) for k, v in t["per_layer_config"].items()}
        else:
            full = {"head_dim": int(t.get("global_head_dim") or 512)}
            if k_eq_v and t.get("num_global_key_value_heads") is not None:
                full["num_key_value_heads"] = int(t["num_global_key_value_heads"])
            overrides = {i: full for i, lt in enumerate(layer_types) if lt == FULL}

        rope = t.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }

        # KV sharing: layers from `first_shared` on read the last earlier layer of their type.
        num_shared = int(t.get("num_kv_shared_layers") or 0)
        first_shared = num_layers - num_shared
        if num_shared and num_shared >= num_layers:
            raise ConfigError("num_kv_shared_layers must leave at least one layer that computes K/V")

        moe = bool(t.get("enable_moe_block", False))
        double_wide = bool(t.get("use_double_wide_mlp", False))
        ple_dim = int(t.get("hidden_size_per_layer_input") or 0)

        specs = []
        for i, lt in enumerate(layer_types):
            o = overrides.get(i, {})
            h = int(o.get("head_dim", head_dim))
            kv = int(o.get("num_key_value_heads", num_kv))
            if num_heads % kv:
                raise ConfigError(f"layer {i}: {num_heads} query heads are not a multiple of {kv} KV heads")
            if i >= first_shared:
                earlier = [j for j in range(first_shared) if layer_types[j] == lt]
                if not earlier:
                    raise ConfigError(f"layer {i} shares KV but no earlier {lt} layer computes it")
                src = earlier[-1]
            else:
                src = i
            rp = rope.get(lt) or {}
            rope_type = rp.get("rope_type", "default")
            if rope_type not in ("default", "proportional"):
                raise ConfigError(f"unsupported rope_type {rope_type!r} for {lt}")
            width = int(o.get("intermediate_size", intermediate))
            if double_wide and i >= first_shared:
                width *= 2
            specs.append(
                LayerSpec(
                    index=i,
                    attn_type=lt,
                    head_dim=h,
                    num_kv_heads=kv,
                    k_eq_v=k_eq_v and lt == FULL,
                    kv_source=src,
                    mlp_width=width,
                    moe=moe,
                    ple=ple_dim > 0,
                    window=window if lt == SLIDING else None,
                    rope_theta=float(rp.get("rope_theta", 10_000.0)),
                    rope_fraction=float(rp.get("partial_rotary_factor", 1.0)) if rope_type == "proportional" else 1.0,
                    rope_factor=float(rp.get("factor", 1.0)) if rope_type == "proportional" else 1.0,
                )
            )
        # A shared layer's geometry must equal its source's: it reads the source's K/V.
        for s in specs:
            src = specs[s.kv_source]
            if (s.head_dim, s.num_kv_heads) != (src.head_dim, src.num_kv_heads):
                raise ConfigError(f"layer {s.index} shares KV with layer {src.index} of another shape")

        if isinstance(eos, int):
            eos_ids: tuple[int, ...] = (eos,)
        elif eos is None:
            eos_ids = ()
        else:
            eos_ids = tuple(int(e) for e in eos)
        if t.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (encoder use) is not supported")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            layers=tuple(specs),
            intermediate_size=intermediate,
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            final_logit_softcap=t.get("final_logit_softcapping"),
            sliding_window=window,
            ple_dim=ple_dim,
            ple_vocab_size=int(t.get("vocab_size_per_layer_input") or vocab) if ple_dim else 0,
            num_experts=int(t.get("num_experts") or 0) if moe else 0,
            top_k_experts=int(t.get("top_k_experts") or 0) if moe else 0,
            moe_intermediate_size=int(t.get("moe_intermediate_size") or 0) if moe else 0,
            num_kv_shared_layers=num_shared,
            max_position_embeddings=int(t.get("max_position_embeddings", 131072)),
            pad_token_id=int(t.get("pad_token_id") if t.get("pad_token_id") is not None else 0),
            bos_token_id=int(t.get("bos_token_id") if t.get("bos_token_id") is not None else 2),
            eos_token_ids=eos_ids,
            hidden_activation=t.get("hidden_activation", "gelu_pytorch_tanh"),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", True)),
            architecture=architecture,
            name=name,
            bidirectional_vision=t.get("use_bidirectional_attention") == "vision",
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Gemma4Config:
        """Read `config.json` (a file, or the directory holding it)."""
        raw, path = read_config_json(path)
        return cls.from_hf_dict(raw, name=os.path.basename(os.path.dirname(os.path.abspath(path))))


def read_config_json(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the JSON object of `config.json`, its path) for a file or the directory holding it; ConfigError with one
    sentence when it is missing or not a JSON object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return raw, path


# ---------------------------------------------------------------------------------------------
# Presets: the released variants' real shapes (docs/architecture.md §1), in the published flat form.

def _preset_dict(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "gemma4_text",
        "vocab_size": 262144,
        "head_dim": 256,
        "global_head_dim": 512,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "vocab_size_per_layer_input": 262144,
        "eos_token_id": [1, 106],
        "tie_word_embeddings": True,
    }
    base.update(kw)
    return base


def _pattern(n_layers: int, period: int) -> list[str]:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]


PRESETS: dict[str, dict[str, Any]] = {
    "e2b": _preset_dict(
        hidden_size=1536, num_hidden_layers=35, layer_types=_pattern(35, 5), num_attention_heads=8,
        num_key_value_heads=1, intermediate_size=6144, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=20, use_double_wide_mlp=True, max_position_embeddings=131072,
    ),
    "e4b": _preset_dict(
        hidden_size=2560, num_hidden_layers=42, layer_types=_pattern(42, 6), num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=10240, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=18, max_position_embeddings=131072,
    ),
    "26b-a4b": _preset_dict(
        hidden_size=2816, num_hidden_layers=30, layer_types=_pattern(30, 6), num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=2112,
        sliding_window=1024, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144,
    ),
    "31b": _preset_dict(
        hidden_size=5376, num_hidden_layers=60, layer_types=_pattern(60, 6), num_attention_heads=32,
        num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504,
        sliding_window=1024, hidden_size_per_layer_input=0, max_position_embeddings=262144,
    ),
}

# Published parameter totals (billions), text decoder incl. embeddings and PLE tables.
PUBLISHED_PARAMS_B = {"e2b": 4.65, "e4b": 7.52, "26b-a4b": 25.2, "31b": 30.7}


def preset(name: str) -> Gemma4Config:
    """The real-shape config of a released variant: 'e2b', 'e4b', '26b-a4b' or '31b'."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Gemma4Config.from_hf_dict(PRESETS[key], name=key)


__all__ = ["SLIDING", "FULL", "ConfigError", "LayerSpec", "Gemma4Config", "PRESETS", "preset"]
