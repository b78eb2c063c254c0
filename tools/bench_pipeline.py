"""`bench.py pipeline`: pp=1 against pp=N on random real-shape weights (memory, decode speed, agreement).

    PYTHONPATH=. python tools/bench.py pipeline --preset 31b --pp 2,4 --batch 8,32 --prompt-len 128 --gen-len 64 \
        --prefill-len 2048 --json out.json

pp=1 is the plain model; pp=N is the pipeline (`gemma4_jax.parallel.pipeline.Pipeline`) with the same weights
(copied through the host), at the split `load(..., pp=N)` would pick unless `--layer-split`, and the same
total batch cut into N micro-batches (the ring full). For each it reports:

- weights per device: the bytes of the arrays on each device (exact) and the device's bytes in use;
- the KV budget: the device's free bytes after the weights (`bytes_limit − bytes_in_use`, measured) over
  the bytes one more token of context costs on that device (full-attention K/V of the layers it holds),
  and the same at a fixed 80 GB per device;
- decode tokens/s: the decode ring of a `gen-len`-token generation (its `gen-len − 1` steps after the
  prefill's token), timed on its own (`generate(timings=)`), best of `--repeat` (until 2026-12-01: the difference
  of a `gen-len` and a `gen-len/2 + 1` token generation, which a busy machine could make negative), at every
  total batch of `--batch` (`by_batch`; the top-level fields are the first batch's);
- with `--prefill-len N`: the prefill of one N-token prompt (its first token included), timed on its own, best
  of `--repeat`, and pp=N's speed against pp=1's (`ratios_vs_pp1.prefill`);
- agreement with pp=1: the fraction of greedy tokens equal, the first divergence of each row, and the
  KL divergence per token between pp=1's and pp=N's next-token distributions over the first two prompts;
  with `--f32-reference`, also each layout's KL from a float32 forward of the same weights (bf16's own
  error, against which pp=N's difference from pp=1 is read); with `--shape-control`, pp=1 against itself
  at another batch size (how far bf16 results move when only the matmul shapes change).

The JSON file is rewritten after every phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import time

import jax
import numpy as np
from bench_common import (
    Progress,
    best_generation,
    float32_model,
    host_params,
    kl_per_token,
    pipeline_model,
    pipeline_stages,
    random_model,
    weight_arrays,
)


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="pp=1 vs pp=N: weight memory per device, KV budget, decode speed, agreement")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json to use instead of --preset (smoke tests)")
    p.add_argument("--pp", default="2", help="stage counts to compare with pp=1, e.g. 2 or 2,4")
    p.add_argument("--layer-split", default=None, help="a split 0,a,...,L to use instead of the default (one --pp)")
    p.add_argument("--batch", default="8", help="total batches, e.g. 8 or 8,32 (the first: agreement)")
    p.add_argument("--prefill-len", type=int, default=0, help="also time the prefill of one prompt this long")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--attn-impl", default="auto", help="attention: auto | xla | pallas (both layouts)")
    p.add_argument("--no-logits", action="store_true", help="skip the KL comparison (saves two compiles)")
    p.add_argument("--shape-control", action="store_true",
                   help="also compare pp=1 with itself at batch 1 vs 2: how far bf16 moves with matmul shapes alone")
    p.add_argument("--f32-reference", action="store_true",
                   help="also compare both layouts with a float32 forward of the same weights (4 bytes/param on one "
                        "device): the bf16 noise floor that pp=N's difference from pp=1 should be read against")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _stats(devices) -> list[dict]:
    return [d.memory_stats() or {} for d in devices]


def kv_bytes_per_token(cfg, layers, itemsize: int = 2) -> int:
    """Bytes one more context token costs in the K/V of `layers` (full attention; sliding caches are a fixed
    window per sequence)."""
    owners = {cfg.layers[i].kv_source for i in layers}
    return sum(2 * cfg.layers[i].num_kv_heads * cfg.layers[i].head_dim * itemsize for i in owners
               if cfg.layers[i].window is None)


def _budget(free: list[float], per_token: list[int]) -> int:
    """Context tokens that fit on every device (a stage holding no full-attention layer is no limit)."""
    return int(min((f // k for f, k in zip(free, per_token, strict=True) if k), default=0))


def _kl_summary(ref: np.ndarray, other: np.ndarray) -> dict:
    kl = kl_per_token(ref, other)
    return {"mean": float(kl.mean()), "max": float(kl.max()),
            "top1_equal_fraction": float(np.mean(ref.argmax(-1) == other.argmax(-1)))}


def _ratio(kl: dict, base: dict) -> float | None:
    """The mean of one KL summary over another's; None where the base is 0 (bit-identical logits)."""
    return kl["mean"] / base["mean"] if base["mean"] > 0 else None


def run(args) -> dict:
    from gemma4_jax.config import Gemma4Config, preset

    cfg = Gemma4Config.from_json(args.config) if args.config else preset(args.preset)
    pps = [int(x) for x in str(args.pp).split(",")]
    devices = jax.devices()
    rng = np.random.default_rng(0)
    batches = [int(x) for x in str(args.batch).split(",")]
    if min(batches) < 1 or args.prefill_len < 0:
        raise SystemExit("--batch sizes must be at least 1 and --prefill-len at least 0")
    prompts = {b: rng.integers(3, cfg.vocab_size, size=(b, args.prompt_len)).tolist() for b in batches}
    long_prompt = [rng.integers(3, cfg.vocab_size, size=args.prefill_len).tolist()]
    res = {"preset": args.config or args.preset, "attn_impl": args.attn_impl, "card": devices[0].device_kind,
           "devices": len(devices),
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "batch": batches[0], "batches": batches,
           "prompt_len": args.prompt_len, "gen_len": args.gen_len, "prefill_len": args.prefill_len}
    phase = Progress(res, args.json)

    def measure(model, key):
        """Decode speed at every batch (the first batch's fields also at the top), the long prefill; the first
        batch's greedy tokens."""
        first = None
        res[key]["by_batch"] = {}
        for b in batches:
            toks = model.generate(prompts[b], max_new_tokens=args.gen_len, stop_tokens=())  # compiles
            first = toks if first is None else first
            phase(f"{key}_b{b}_compile_and_first_run")
            t_long, decode = best_generation(model, prompts[b], args.gen_len, args.repeat)  # the ring alone
            step = decode / (args.gen_len - 1)
            res[key]["by_batch"][str(b)] = dict(decode_ms_per_step=step * 1e3, decode_tok_s=b / step,
                                               generate_s={str(args.gen_len): t_long})
            phase(f"{key}_b{b}_timed")
        res[key].update(res[key]["by_batch"][str(batches[0])])
        if args.prefill_len:
            model.generate(long_prompt, max_new_tokens=1, stop_tokens=())  # compiles
            best = float("inf")
            for _ in range(args.repeat):
                t: dict = {}
                model.generate(long_prompt, max_new_tokens=1, stop_tokens=(), timings=t)
                best = min(best, t["prefill_s"])
            res[key]["prefill_ms"] = best * 1e3
            phase(f"{key}_prefill")
        return first

    def memory(key, n, weights, per_token):
        stats = _stats(devices[:n])
        free = [s.get("bytes_limit", 0) - s.get("bytes_in_use", 0) for s in stats]
        res[key].update(weights_gib_per_device=[w / 2**30 for w in weights],
                        bytes_in_use_gib=[s.get("bytes_in_use", 0) / 2**30 for s in stats],
                        bytes_limit_gib=[s.get("bytes_limit", 0) / 2**30 for s in stats],
                        kv_bytes_per_token=per_token,
                        kv_budget_tokens=_budget(free, per_token),
                        kv_budget_tokens_80gb=_budget([80e9 - w for w in weights], per_token))

    one = random_model(cfg, args.attn_impl)
    state = weight_arrays(one)
    jax.block_until_ready(state)
    res["pp1"] = {}
    memory("pp1", 1, [sum(a.nbytes for a in state)], [kv_bytes_per_token(cfg, range(cfg.num_layers))])
    del state
    phase("pp1_random_init")
    toks1 = measure(one, "pp1")
    few = np.asarray(prompts[batches[0]][:2])
    if not args.no_logits:
        logits1 = one.logits(few)
        phase("pp1_logits")
        if args.shape_control:  # the same model and prompt at another batch size: bf16's shape noise
            res["pp1"]["kl_batch1_vs_batch2"] = _kl_summary(logits1[:1], one.logits(few[:1]))
            phase("pp1_shape_control")
    params = host_params(one)
    del one
    gc.collect()
    phase("to_host")
    ref = None
    if args.f32_reference and not args.no_logits:
        ref = float32_model(cfg, params).logits(few)
        gc.collect()
        res["pp1"]["kl_vs_f32"] = _kl_summary(ref, logits1)
        phase("f32_reference")

    for n in pps:
        key = f"pp{n}"
        stages = pipeline_stages(cfg, n, args.layer_split)
        res[key] = {"split": [s.start for s in stages] + [cfg.num_layers]}
        pipe = pipeline_model(cfg, params, stages, args.attn_impl)
        weights = [0] * n
        for leaf in weight_arrays(pipe):
            for shard in leaf.addressable_shards:
                weights[devices.index(shard.device)] += shard.data.nbytes
        jax.block_until_ready(weight_arrays(pipe))
        memory(key, n, weights, [kv_bytes_per_token(cfg, s.layers) for s in stages])
        phase(f"{key}_place")
        toks = measure(pipe, key)
        same = [[a == b for a, b in zip(ra, rb, strict=True)] for ra, rb in zip(toks1, toks, strict=True)]
        res[key]["greedy_equal_fraction"] = float(np.mean(same))
        res[key]["first_divergence"] = [row.index(False) if False in row else None for row in same]
        if not args.no_logits:
            logits = pipe.logits(few)
            res[key]["kl_vs_pp1"] = _kl_summary(logits1, logits)
            if ref is not None:
                res[key]["kl_vs_f32"] = _kl_summary(ref, logits)
            del logits
        p1 = res["pp1"]
        res[key]["ratios_vs_pp1"] = {
            "weights_per_device": max(weights) / p1["weights_gib_per_device"][0] / 2**30,
            "decode_throughput": res[key]["decode_tok_s"] / p1["decode_tok_s"],
            "decode_throughput_by_batch": {b: r["decode_tok_s"] / p1["by_batch"][b]["decode_tok_s"]
                                           for b, r in res[key]["by_batch"].items()},
            "prefill": p1["prefill_ms"] / res[key]["prefill_ms"] if args.prefill_len else None,
            "kv_budget": res[key]["kv_budget_tokens"] / p1["kv_budget_tokens"] if p1["kv_budget_tokens"] else None,
            "kv_budget_80gb": res[key]["kv_budget_tokens_80gb"] / p1["kv_budget_tokens_80gb"],
        }
        # issue #21's agreement bars: pp=N's mean KL to float32 over pp=1's (≤ 1.1), and its KL to pp=1 over the
        # shape control's (≤ 1.0); absent where the flags that measure them were not given
        if "kl_vs_f32" in res[key]:
            res[key]["ratios_vs_pp1"]["kl_vs_f32"] = _ratio(res[key]["kl_vs_f32"], p1["kl_vs_f32"])
        if "kl_vs_pp1" in res[key] and "kl_batch1_vs_batch2" in p1:
            res[key]["kl_vs_pp1_over_shape_control"] = _ratio(res[key]["kl_vs_pp1"], p1["kl_batch1_vs_batch2"])
        phase(f"{key}_agreement")
        print(json.dumps({key: res[key]}), flush=True)
        del pipe
        gc.collect()
    print(json.dumps(res, indent=1), flush=True)
    return res

