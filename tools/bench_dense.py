"""`bench.py dense`: a decode step's dense projections, XLA against the skinny Pallas kernel, at a model's shapes.

    PYTHONPATH=. python tools/bench.py dense --preset 26b-a4b --tokens 1,4,16 [--sweep] [--json out.json]

For each distinct projection shape W [K,N] of the preset's layers (queries, keys, values, output, MLP gate/up/down,
router, per-layer-input gate/projection) and each row count M: XLA's product (`jnp.dot`, what the model ran before
the kernel) and `gemv.gemv` at its default config, plus, with `--sweep` (the `--sweep-shapes` heaviest shapes), other
block sizes, K splits and pipeline depths, with W stored [K,N] and [N,K] (`nk`). Each is checked against a float32
product at `Precision.HIGHEST`, then timed on the device from a profiler trace (`bench_common.device_seconds`):
one compiled program applies the projection to distinct weight matrices (at least `--min-mb` of them, so they
stream from HBM, not L2), and the kernels' busy time per projection is what it costs inside a model's step, which
runs as one CUDA graph (the split-K partial sums' XLA reduction included). Wall-clock timing of such short
programs was noise on an H200 (docs/gpu-runs.md).

Reported per shape: µs and GB/s over W's bytes; the summary adds up one decode step's projections (each shape
times how many layers use it) for XLA and for the kernel.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import device_seconds, save_json


def add_parser(sub) -> None:
    p = sub.add_parser("dense", help="decode-step dense projections: XLA vs the skinny Pallas kernel")
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--sweep", action="store_true",
                   help="also time other block sizes, K splits, stages and the [N,K] layout (heaviest shapes)")
    p.add_argument("--sweep-shapes", type=int, default=4)
    p.add_argument("--shapes", default=None, help="only these projections, as KxN,KxN (default: every one)")
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


def candidates(k: int, n: int) -> list[tuple[bool, object]]:
    """(nk, config) pairs to sweep for W [K,N]: both layouts; column blocks 16–128, depth blocks 128 and 256, the
    fewest K splits that give one and two programs per SM of an H100/H200 (132), 2 or 4 pipeline stages (fewer
    stages, less shared memory, more programs resident at once). Column blocks of 16 only [N,K]: in [K,N] their
    rows are 32-byte pieces."""
    from gemma4_jax.kernels.gemv import GemvConfig
    from gemma4_jax.kernels.tiling import fit_block as _fit

    out = []
    for bn in (16, 32, 64, 128):
        for bk in (128, 256):
            b_n, b_k = _fit(n, bn), _fit(k, bk)
            if b_n != bn or b_k != bk:
                continue
            steps, tiles = k // b_k, n // b_n
            splits = [s for s in range(1, steps + 1) if steps % s == 0]
            chosen = {next((s for s in splits if tiles * s >= p), splits[-1]) for p in (132, 264)}
            for split in sorted(chosen):
                for stages in (2, 4):
                    for nk in (False, True) if bn > 16 else (True,):
                        out.append((nk, GemvConfig(block_n=b_n, block_k=b_k, split_k=split, num_warps=4,
                                                   num_stages=stages)))
    return list(dict.fromkeys(out))


def _label(nk: bool, c) -> str:
    return (f"{'nk' if nk else 'kn'} bn{c.block_n} bk{c.block_k} s{c.split_k} w{c.num_warps} p{c.num_stages}")


def run(args) -> dict:
    from gemma4_jax.config import preset
    from gemma4_jax.kernels.gemv import default_config, gemv

    cfg = preset(args.preset)
    bf = jnp.bfloat16
    dev = jax.devices()[0]
    shapes = projection_shapes(cfg)
    if args.shapes:
        wanted = {tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")}
        shapes = {kn: u for kn, u in shapes.items() if kn in wanted}
    res = dict(preset=args.preset, card=dev.device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
               timing="device trace: kernels' busy time per projection (bench_common.device_seconds)", shapes=[])
    print(f"{args.preset}: {len(shapes)} projection shapes, {dev.device_kind}", flush=True)
    key = jax.random.key(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    heaviest = sorted(shapes, key=lambda s: -s[0] * s[1] * shapes[s])[:args.sweep_shapes]
    interpret = dev.platform != "gpu"
    for (k, n), uses in sorted(shapes.items()):
        nbytes = k * n * 2
        count = min(args.max_weights, max(8, int(np.ceil(args.min_mb * 1e6 / nbytes))))
        ws = [(k**-0.5 * jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)).astype(bf)
              for i in range(count)]
        ws_nk = None
        entry = dict(k=k, n=n, uses_per_step=uses, weight_bytes=nbytes, weights_timed=count,
                     default=str(default_config(k, n)), rows=[])
        for m in tokens:
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, k), jnp.float32).astype(bf)
            ref = np.asarray(jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST))
            impls = [("xla", False, lambda x, w: jnp.dot(x, w)),
                     ("kernel default", False, lambda x, w: gemv(x, w, interpret=interpret)),
                     ("kernel summed", False, lambda x, w: gemv(x, w, interpret=interpret, sum_in_kernel=True))]
            if args.sweep and (k, n) in heaviest:
                impls += [(_label(nk, c), nk, lambda x, w, c=c, nk=nk: gemv(x, w, config=c, nk=nk,
                                                                             interpret=interpret))
                          for nk, c in candidates(k, n)]
            if any(nk for _, nk, _ in impls) and ws_nk is None:
                ws_nk = [jnp.asarray(w.T) for w in ws]
            row = dict(tokens=m, results=[])
            jobs, kept = [], []
            for name, nk, fn in impls:
                try:  # a config that does not compile here is recorded and skipped
                    w0 = ws_nk[0] if nk else ws[0]
                    out = np.asarray(jax.jit(fn)(x, w0), np.float32)
                    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                    prog = jax.jit(lambda x, ws, fn=fn: tuple(fn(x, w) for w in ws))
                    jobs.append((prog, (x, ws_nk if nk else ws)))
                    kept.append(dict(impl=name, rel_err=err, finite=bool(np.isfinite(out).all())))
                except Exception as ex:
                    msg = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
                    row["results"].append(dict(impl=name, error=msg))
                    print(f"  K={k} N={n} M={m} {name}: {row['results'][-1]['error']}", flush=True)
            for r, t in zip(kept, device_seconds(jobs, runs=args.repeat), strict=True):
                r.update(us=t["busy_us"] / count, kernels=t["kernels"] / count,
                         gb_s=nbytes / (t["busy_us"] / count) / 1e3)
                print(f"  K={k:6d} N={n:6d} M={m:3d} {r['impl']:34s} {r['us']:8.2f} us {r['gb_s']:6.0f} GB/s "
                      f"{r['kernels']:.1f} kernels  err {r['rel_err']:.1e}", flush=True)
                row["results"].append(r)
            entry["rows"].append(row)
        res["shapes"].append(entry)
        del ws, ws_nk
        save_json(res, args.json)

    print("\nsummary: one decode step's projections (µs; each shape × its uses)")
    res["summary"] = {}
    for m in tokens:
        tot = collections.defaultdict(float)
        for entry in res["shapes"]:
            row = next(r for r in entry["rows"] if r["tokens"] == m)
            ok = {r["impl"]: r["us"] for r in row["results"] if "us" in r}
            for name in ("xla", "kernel default", "kernel summed"):
                tot[name] += ok.get(name, float("nan")) * entry["uses_per_step"]
            tot["kernel best"] += min((v for kk, v in ok.items() if kk != "xla"), default=float("nan")) \
                * entry["uses_per_step"]
        res["summary"][m] = dict(tot)
        print(f"M={m:3d}: " + ", ".join(f"{kk} {v:.0f}" for kk, v in tot.items()), flush=True)
    save_json(res, args.json)
    return res
