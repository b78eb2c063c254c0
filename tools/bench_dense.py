"""`bench.py dense`: a decode step's dense projections, XLA against the skinny Pallas kernel, at a model's shapes.

    PYTHONPATH=. python tools/bench.py dense --preset 26b-a4b --tokens 1,4,16 [--sweep] [--json out.json]

For each distinct projection shape W [K,N] of the preset's layers (queries, keys, values, output, MLP gate/up/down,
router, per-layer-input gate/projection) and each row count M: XLA's product (`jnp.dot`, what the model ran before
the kernel) and `gemv.gemv` at its default config, plus, with `--sweep`, other block sizes and K splits. Each is
checked against a float32 product at `Precision.HIGHEST`, then timed on the device: one compiled program applies
the projection to distinct weight matrices (at least `--min-mb` of them, so they stream from HBM, not L2), and a
second one to half as many; the difference of their medians over `--repeat` runs, per extra call, is the time a
projection takes inside a model's step, launch gaps included, without the program's fixed launch and sync cost.

Reported per shape: µs and GB/s over W's bytes; the summary adds up one decode step's projections (each shape
times how many layers use it) for XLA and for the kernel.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import save_json, seconds_per_call


def add_parser(sub) -> None:
    p = sub.add_parser("dense", help="decode-step dense projections: XLA vs the skinny Pallas kernel")
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--sweep", action="store_true",
                   help="also time other block sizes and K splits (first token count, heaviest shapes)")
    p.add_argument("--sweep-shapes", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--min-mb", type=float, default=256.0, help="MB of distinct weights per timed program")
    p.add_argument("--max-weights", type=int, default=64, help="at most this many weights per timed program")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def projection_shapes(cfg) -> dict[tuple[int, int], int]:
    """{(K, N): uses per decode step} over the layers' weight products."""
    d, n = cfg.hidden_size, cfg.num_heads
    uses: collections.Counter = collections.Counter()
    for spec in cfg.layers:
        h = spec.head_dim
        uses[(d, n * h)] += 1
        uses[(n * h, d)] += 1
        if spec.owns_kv:
            uses[(d, spec.num_kv_heads * h)] += 1 if spec.k_eq_v else 2
        uses[(d, spec.mlp_width)] += 2
        uses[(spec.mlp_width, d)] += 1
        if spec.moe:
            uses[(d, cfg.num_experts)] += 1
        if spec.ple:
            uses[(d, cfg.ple_dim)] += 1
            uses[(cfg.ple_dim, d)] += 1
    return dict(uses)


def candidates(k: int, n: int):
    from gemma4_jax.kernels.gemv import GemvConfig, default_config
    from gemma4_jax.kernels.tiling import fit_block as _fit

    out = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            b_n, b_k = _fit(n, bn), _fit(k, bk)
            if not b_n or not b_k:
                continue
            steps = k // b_k
            for split in sorted({s for s in (1, 2, 4, 8, 11, 16) if steps % s == 0}):
                out.append(GemvConfig(block_n=b_n, block_k=b_k, split_k=split, num_warps=4))
    out.append(GemvConfig(block_n=_fit(n, 64), block_k=_fit(k, 128), split_k=default_config(k, n).split_k,
                          num_warps=2))
    return list(dict.fromkeys(out))


def _device_time(fn, x, ws, repeat: int) -> float:
    """Seconds per projection on the device: programs that apply fn to the first half of ws and to all of it,
    timed alike; the difference over the extra calls (a program's fixed launch and sync cost cancels)."""
    half = ws[:len(ws) // 2]
    progs = [jax.jit(lambda x, ws: tuple(fn(x, w) for w in ws)) for _ in range(2)]
    out = [seconds_per_call(prog, x, some, repeat=repeat) for prog, some in zip(progs, (half, ws), strict=True)]
    return max(out[1] - out[0], 1e-9) / (len(ws) - len(half))


def run(args) -> dict:
    from gemma4_jax.config import preset
    from gemma4_jax.kernels.gemv import default_config, gemv

    cfg = preset(args.preset)
    bf = jnp.bfloat16
    dev = jax.devices()[0]
    shapes = projection_shapes(cfg)
    res = dict(preset=args.preset, card=dev.device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
               shapes=[])
    print(f"{args.preset}: {len(shapes)} projection shapes, {dev.device_kind}", flush=True)
    key = jax.random.key(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    heaviest = sorted(shapes, key=lambda s: -s[0] * s[1] * shapes[s])[:args.sweep_shapes]
    for (k, n), uses in sorted(shapes.items()):
        nbytes = k * n * 2
        count = min(args.max_weights, max(8, int(np.ceil(args.min_mb * 1e6 / nbytes))))
        ws = [(k**-0.5 * jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)).astype(bf)
              for i in range(count)]
        entry = dict(k=k, n=n, uses_per_step=uses, weight_bytes=nbytes, weights_timed=count,
                     default=str(default_config(k, n)), rows=[])
        for m in tokens:
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, k), jnp.float32).astype(bf)
            ref = np.asarray(jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST))
            row = dict(tokens=m, results=[])

            def measure(name, fn, row=row, x=x, ref=ref, nbytes=nbytes, m=m, ws=ws, k=k, n=n):
                try:
                    out = np.asarray(jax.jit(fn)(x, ws[0]), np.float32)
                    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                    s = _device_time(fn, x, ws, args.repeat)
                    r = dict(impl=name, us=s * 1e6, gb_s=nbytes / s / 1e9, rel_err=err,
                             finite=bool(np.isfinite(out).all()))
                    print(f"  K={k:6d} N={n:6d} M={m:3d} {name:70s} {r['us']:8.2f} us {r['gb_s']:6.0f} GB/s "
                          f"err {err:.1e}", flush=True)
                except Exception as ex:  # a config that does not compile here: record it, go on
                    r = dict(impl=name, error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}")
                    print(f"  K={k} N={n} M={m} {name}: {r['error']}", flush=True)
                row["results"].append(r)

            measure("xla", lambda x, w: jnp.dot(x, w))
            measure("kernel default", lambda x, w: gemv(x, w))
            if args.sweep and m == tokens[0] and (k, n) in heaviest:
                for c in candidates(k, n):
                    measure(f"kernel {c}", lambda x, w, c=c: gemv(x, w, config=c))
            entry["rows"].append(row)
        res["shapes"].append(entry)
        del ws
        save_json(res, args.json)

    print("\nsummary: one decode step's projections (µs; each shape × its uses)")
    res["summary"] = {}
    for m in tokens:
        tot = collections.defaultdict(float)
        for entry in res["shapes"]:
            row = next(r for r in entry["rows"] if r["tokens"] == m)
            ok = {r["impl"]: r["us"] for r in row["results"] if "us" in r}
            for name in ("xla", "kernel default"):
                tot[name] += ok.get(name, float("nan")) * entry["uses_per_step"]
            tot["kernel best"] += min((v for kk, v in ok.items() if kk != "xla"), default=float("nan")) \
                * entry["uses_per_step"]
        res["summary"][m] = dict(tot)
        print(f"M={m:3d}: " + ", ".join(f"{kk} {v:.0f}" for kk, v in tot.items()), flush=True)
    save_json(res, args.json)
    return res
