"""Small random transformers Gemma 4 models, one per family, saved as real HF checkpoints.

Every family keeps the features of its real counterpart (docs/architecture.md §1) at toy sizes, and
every norm weight, `layer_scalar` and router scale is perturbed away from its init so that no
feature can hide behind a 1.0.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np

S, F = "sliding_attention", "full_attention"

# The test processes compile hundreds of small programs on a 2-core CPU, where LLVM's optimisation passes cost more
# than they save: tests/test_generate.py took 121 s at XLA's default level and 88 s at 0; test_numerics' 704-token
# float32 runs at real widths 122 s and 118 s (2026-12-03, this machine, one process each). XLA's older CPU fusion
# emitters compile faster still: test_pipeline.py's splits took 80 s with the new ones and 71 s without, the suite
# 977-1,038 s and 830 s (2026-12-07). jaxlib 0.11 has only the new ones, and XLA stops at a flag it does not know.
CPU_TEST_FLAGS = "--xla_backend_optimization_level=0"
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    CPU_TEST_FLAGS += " --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (this one or a subprocess) with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {CPU_TEST_FLAGS}"


def _pattern(n: int, period: int) -> list[str]:
    return [F if (i + 1) % period == 0 else S for i in range(n)]


COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, head_dim=32, global_head_dim=64,
              final_logit_softcapping=30.0, initializer_range=0.05, sliding_window=8,
              vocab_size_per_layer_input=256, max_position_embeddings=4096,
              pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106])

FAMILIES: dict[str, dict] = {
    # PLE, KV sharing across both attention types, double-wide MLP on shared layers, 4:1 pattern.
    "e2b": dict(COMMON, num_hidden_layers=10, layer_types=_pattern(10, 5), num_key_value_heads=1,
                intermediate_size=96, hidden_size_per_layer_input=16, num_kv_shared_layers=4,
                use_double_wide_mlp=True),
    # PLE, KV sharing, 5:1 pattern, two KV heads.
    "e4b": dict(COMMON, num_hidden_layers=12, layer_types=_pattern(12, 6), num_key_value_heads=2,
                intermediate_size=128, hidden_size_per_layer_input=16, num_kv_shared_layers=4),
    # MoE (8 experts, top 2) beside the dense branch, k_eq_v and fewer KV heads on full layers.
    "26b-a4b": dict(COMMON, num_hidden_layers=6, layer_types=_pattern(6, 6), num_key_value_heads=2,
                    num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=48,
                    hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
                    moe_intermediate_size=32),
    # Dense, k_eq_v, fewer KV heads on full layers.
    "31b": dict(COMMON, num_hidden_layers=12, layer_types=_pattern(12, 6), num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=128,
                hidden_size_per_layer_input=0),
}


def build_hf_model(family: str, seed: int = 0):
    """A float32 `Gemma4ForCausalLM` with perturbed norms, scalars and router scales (eager attention)."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_jax.testing.tiny import perturb_scales

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**FAMILIES[family])).eval()
    model.config._attn_implementation = "eager"
    return perturb_scales(model, seed + 1)


def save_hf(model, out_dir: str, *, form: str = "per_layer", wrapper: bool = False,
            max_shard_size: str | None = None) -> str:
    """Save `model` as an HF directory.

    form: 'per_layer' keeps the `per_layer_config` transformers writes; 'flat' rewrites config.json
    the way the published checkpoints carry it (global_head_dim, num_global_key_value_heads).
    wrapper: store the text weights under `model.language_model.` with a Gemma4ForConditionalGeneration
    config (`text_config`), as the official multimodal checkpoints are laid out.
    """
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if form == "flat":
        plc = cfg.pop("per_layer_config", {}) or {}
        full = next(iter(plc.values()), {})
        cfg["global_head_dim"] = full.get("head_dim", cfg["head_dim"])
        cfg["num_global_key_value_heads"] = full.get("num_key_value_heads")
    if wrapper:
        _rewrite_as_wrapper(out_dir)
        cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
               "eos_token_id": cfg.get("eos_token_id"), "text_config": dict(cfg, model_type="gemma4_text"),
               "vision_config": None, "audio_config": None}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    return out_dir


def _rewrite_as_wrapper(out_dir: str) -> None:
    """Rename every `model.` tensor to `model.language_model.` in place (all shards and the index)."""
    from gemma4_jax.checkpoint.safetensors_io import SafetensorsFile, checkpoint_files, save_file

    for path in checkpoint_files(out_dir):
        st = SafetensorsFile(path)
        tensors = {k.replace("model.", "model.language_model.", 1): np.array(st.get(k)) for k in st.keys()}
        del st
        save_file(tensors, path)
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        idx["weight_map"] = {k.replace("model.", "model.language_model.", 1): v for k, v in idx["weight_map"].items()}
        with open(index, "w") as f:
            json.dump(idx, f)


def hf_logits(model, ids: np.ndarray, dtype=None) -> np.ndarray:
    """transformers' logits [B,T,V] as float32 numpy (optionally running the model in `dtype`)."""
    import copy

    import torch

    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        out = m(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits
    return out.float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside its equations (jit, scan, cond, custom calls)."""
    from jax.extend.core import jaxprs_in_params

    for e in jaxpr.eqns:
        yield e
        for sub in jaxprs_in_params(e.params):
            yield from all_eqns(sub)


def barriers_by_backend(monkeypatch, trace, program) -> dict[str, int]:
    """{"cpu": n, "gpu": n}: optimization barriers in the jaxpr text `trace()` returns, with the backend that
    `numerics.unmerged` sees patched to each in turn. `program` (a jitted function `trace` reaches) has its traces
    cleared around each, since it would otherwise keep the first backend's; the patch is undone at the end."""
    from gemma4_jax.kernels import numerics

    counts = {}
    try:
        for backend in ("cpu", "gpu"):
            monkeypatch.setattr(numerics.jax, "default_backend", lambda b=backend: b)
            program.clear_cache()
            counts[backend] = trace().count("optimization_barrier")
    finally:
        monkeypatch.undo()
        program.clear_cache()
    return counts
