"""`bench.py numerics`: how far float32 logits are from exact, ours against transformers', at a variant's real widths.

    PYTHONPATH=. python tools/bench.py numerics --preset e2b --layers 10 --vocab 8192 --tokens 768 [--json out.json]

Builds transformers' `Gemma4ForCausalLM` from the preset cut to `--layers` layers (KV-shared layers cut in
proportion; `--experts` to cut an MoE's experts) with the vocabulary shrunk to `--vocab`, random weights with every
norm, layer scalar and router scale perturbed away from 1.0, and saves it as a real HF directory. One forward over
`--tokens` random tokens, five ways:

  reference             transformers in float64 on the CPU
  transformers_f32      transformers in float32 (on the GPU when there is one; torch's defaults: no TF32)
  ours_f32              gemma4_jax, dtype float32 (every matmul at full float32 precision)
  ours_f32_default      the same under JAX's default matmul precision (what float32 was before: TF32 on a GPU)
  ours_bf16             gemma4_jax, dtype bfloat16 (for scale)

Against the reference: mean rel. error = mean|Δ| / mean|ref| over all logits; per-token p99 = the 99th
percentile over tokens of max|Δ| (over the vocabulary) / max|ref|; top-1 agreement.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("numerics", help="float32 logits against a float64 transformers reference, ours vs theirs")
    p.add_argument("--preset", default="e2b")
    p.add_argument("--config", default=None, help="a config.json instead of --preset (smoke tests)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=0, help="cut an MoE's experts to this many (0: keep)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def cut_config(raw: dict, layers: int, vocab: int, experts: int = 0) -> dict:
    """An HF text config dict: `raw` cut to its first `layers` layers and a `vocab`-token vocabulary."""
    raw = dict(raw)
    total = int(raw["num_hidden_layers"])
    raw["num_hidden_layers"] = layers
    raw["layer_types"] = list(raw["layer_types"])[:layers]
    if raw.get("num_kv_shared_layers"):
        raw["num_kv_shared_layers"] = int(raw["num_kv_shared_layers"]) * layers // total
    raw["vocab_size"] = vocab
    if raw.get("vocab_size_per_layer_input"):
        raw["vocab_size_per_layer_input"] = vocab
    if experts and raw.get("num_experts"):
        raw["num_experts"] = experts
        raw["top_k_experts"] = min(int(raw["top_k_experts"]), experts)
    return raw


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref)
    per_token = d.reshape(-1, d.shape[-1]).max(-1) / np.abs(ref).max()
    return {"mean_rel": float(d.mean() / np.abs(ref).mean()), "token_p99": float(np.percentile(per_token, 99)),
            "top1": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}


def run(args) -> dict:
    import jax
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    import gemma4_jax
    from gemma4_jax import api
    from gemma4_jax.config import PRESETS
    from gemma4_jax.tiny import perturb_scales

    base = json.load(open(args.config)) if args.config else PRESETS[args.preset]
    raw = cut_config(base, args.layers, args.vocab, args.experts)
    cuda = torch.cuda.is_available()
    res = {"preset": args.config or args.preset, "layers": args.layers, "vocab": args.vocab, "tokens": args.tokens,
           "experts": raw.get("num_experts", 0), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
           "torch": torch.__version__, "card": jax.devices()[0].device_kind,
           "transformers_f32_on": "cuda" if cuda else "cpu", "runs": {}}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    hf = perturb_scales(Gemma4ForCausalLM(Gemma4TextConfig(**raw)).eval(), args.seed + 1)
    hf.config._attn_implementation = "eager"
    hf.config._experts_implementation = "eager"  # torch's grouped_mm has no float64
    ids = np.random.default_rng(args.seed).integers(3, args.vocab, size=(1, args.tokens))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        print(f"{res['preset']} cut to {args.layers} layers, vocab {args.vocab}, {args.tokens} tokens "
              f"({time.perf_counter() - t0:.0f} s to build)", flush=True)
        with torch.no_grad():
            ref = hf.double()(torch.as_tensor(ids)).logits.numpy()
            dev = "cuda" if cuda else "cpu"
            f32 = hf.float().to(dev)(torch.as_tensor(ids, device=dev)).logits.float().cpu().numpy()
        del hf
        if cuda:
            torch.cuda.empty_cache()
        runs = {"transformers_f32": f32}
        for name, dtype, scope in (("ours_f32", "float32", None), ("ours_f32_default", "float32", "default"),
                                   ("ours_bf16", "bfloat16", None)):
            model = gemma4_jax.load(d, dtype=dtype, progress=False)
            keep = api.precision_scope
            if scope == "default":  # what float32 ran at before: JAX's default precision
                api.precision_scope = lambda dtype: contextlib.nullcontext()
            try:
                runs[name] = np.asarray(model.logits(ids), np.float64)
            finally:
                api.precision_scope = keep
            del model
    for name, got in runs.items():
        res["runs"][name] = errors(ref, got)
        e = res["runs"][name]
        print(f"  {name:18s} mean rel {e['mean_rel']:.2e}  per-token p99 {e['token_p99']:.2e}  "
              f"top-1 {e['top1']:.3f}", flush=True)
    t = res["runs"]["transformers_f32"]
    o = res["runs"]["ours_f32"]
    res["ours_over_transformers"] = {k: o[k] / t[k] for k in ("mean_rel", "token_p99")}
    print(f"  ours ÷ transformers (float32): mean {res['ours_over_transformers']['mean_rel']:.2f}×, "
          f"p99 {res['ours_over_transformers']['token_p99']:.2f}×  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res
