"""`bench.py pipeline`: pp=1 against pp=N on random real-shape weights (memory, decode speed, agreement).

    PYTHONPATH=. python tools/bench.py pipeline --preset e4b --pp 2 --batch 8 --prompt-len 128 --gen-len 64

pp=1 is the plain model (`gemma4_jax.load(..., pp=1)` path); pp=N is the pipeline with the same
weights, the same total batch split into N micro-batches (the ring full). Reports per-device weight
bytes (device memory in use after placing the weights), decode tokens/s (timed between a 2-token and a
`gen-len`-token run, both compiled beforehand), the fraction of greedy tokens equal to pp=1's, and
the KV budget each layout leaves on an 80 GB card.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="pp=1 vs pp=N: weight memory per device, decode speed, agreement")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json to use instead of --preset (smoke tests)")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-pp1", action="store_true", help="measure only the pipeline (weights still compared)")
    p.set_defaults(func=run)


def _mem(devices) -> list[int]:
    return [int((d.memory_stats() or {}).get("bytes_in_use", 0)) for d in devices]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(args) -> dict:
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import Gemma4Config, preset
    from gemma4_jax.hf_checkpoint import iter_params
    from gemma4_jax.pipeline import Pipeline, stage_leaves_from_params
    from gemma4_jax.stages import balanced_stages
    from gemma4_jax.synthetic import random_model

    cfg = Gemma4Config.from_json(args.config) if args.config else preset(args.preset)
    devices = jax.devices()
    dtype = jnp.bfloat16
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    result = {"preset": args.preset, "card": devices[0].device_kind, "batch": args.batch,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "jax": jax.__version__}

    def measure(model):
        model.generate(prompts, max_new_tokens=2, stop_tokens=())  # compile
        model.generate(prompts, max_new_tokens=args.gen_len, stop_tokens=())
        _, t2 = _timed(lambda: model.generate(prompts, max_new_tokens=2, stop_tokens=()))
        toks, tg = _timed(lambda: model.generate(prompts, max_new_tokens=args.gen_len, stop_tokens=()))
        return toks, args.batch * (args.gen_len - 2) / (tg - t2), (tg - t2) / (args.gen_len - 2) * 1e3

    t0 = time.perf_counter()
    module = random_model(cfg, dtype)
    jax.block_until_ready(jax.tree.leaves(nnx_state(module)))
    init_s = time.perf_counter() - t0
    one = Gemma4Model(module, RunConfig(dtype="bfloat16", max_seq_len=None))
    w1 = sum(a.nbytes for a in jax.tree.leaves(nnx_state(module)))
    toks1, tps1, ms1 = measure(one) if not args.skip_pp1 else (None, float("nan"), float("nan"))
    result["pp1"] = {"weights_gib_per_device": w1 / 2**30, "decode_tok_s": tps1, "ms_per_step": ms1,
                     "random_init_s": init_s}
    print(json.dumps(result["pp1"]), flush=True)
    params = {path: np.asarray(var.get_value()) for path, var in iter_params(one.module)}
    del one, module
    stages = balanced_stages(cfg, args.pp, 2)
    leaves = stage_leaves_from_params(cfg, stages, params)
    del params
    base = _mem(devices)
    pipe = Gemma4Model(None, RunConfig(dtype="bfloat16", pp=args.pp), pipeline=Pipeline(cfg, stages, leaves, dtype))
    wn = [0] * args.pp  # bytes of each device's blocks of the stage-stacked parameters
    for leaf in jax.tree.leaves(pipe.pipeline.params):
        for shard in leaf.addressable_shards:
            wn[devices.index(shard.device)] += shard.data.nbytes
    result["device_bytes_in_use_after_load"] = [a - b for a, b in zip(_mem(devices), base, strict=True)][: args.pp]
    print(json.dumps({"pp": args.pp, "weights_gib_per_device": [w / 2**30 for w in wn]}), flush=True)
    toksn, tpsn, msn = measure(pipe)
    toks1 = toks1 or toksn
    same = np.mean([a == b for ra, rb in zip(toks1, toksn, strict=True) for a, b in zip(ra, rb, strict=True)])
    first_diff = [next((i for i, (a, b) in enumerate(zip(ra, rb, strict=True)) if a != b), None)
                  for ra, rb in zip(toks1, toksn, strict=True)]
    kv_tok = _kv_bytes_per_token(cfg, stages)
    result[f"pp{args.pp}"] = {"split": [s.start for s in stages] + [cfg.num_layers],
                              "weights_gib_per_device": [w / 2**30 for w in wn], "decode_tok_s": tpsn,
                              "ms_per_step": msn, "greedy_equal_fraction": float(same),
                              "first_divergence": first_diff}
    hbm = 80 * 2**30
    full_kv = _kv_bytes_per_token(cfg, (stages[0].__class__(0, 0, cfg.num_layers, 1),))
    result["kv_budget_tokens_80gb"] = {
        "pp1": int((hbm - w1) // full_kv[0]),
        f"pp{args.pp}": int(min((hbm - w) // k for w, k in zip(wn, kv_tok, strict=True))),
    }
    budget = result["kv_budget_tokens_80gb"]
    result["ratios"] = {"weights_per_device": max(wn) / w1, "decode_throughput": tpsn / tps1,
                        "kv_budget": budget[f"pp{args.pp}"] / budget["pp1"]}
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def nnx_state(module):
    from flax import nnx

    return nnx.state(module)


def _kv_bytes_per_token(cfg, stages) -> list[int]:
    """Bytes of full-attention K/V per context token on each stage (sliding layers are fixed windows)."""
    out = []
    for s in stages:
        layers = {cfg.layers[i].kv_source for i in s.layers}
        out.append(sum(2 * cfg.layers[i].num_kv_heads * cfg.layers[i].head_dim * 2 for i in layers
                       if cfg.layers[i].window is None))
    return out
