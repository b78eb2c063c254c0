"""`bench.py attention`: our Pallas attention kernels against XLA, cuDNN and JAX's stock Pallas ops on a GPU.

Prefill (B=1, 8 heads, causal, bf16): TFLOP/s counting the causal half, 4·B·N·H·T²/2. Decode (bf16, one
query token per sequence, full cache): GB/s of K and V read, and its share of the card's measured HBM
bandwidth (a large device copy, bytes read plus written). Every baseline runs in the same process on the
same card. `--check` first compares the compiled kernels with the float32 references on small shapes
(windows, offsets, ragged lengths) and, per benchmark shape, with XLA's output; `--tune` sweeps the
kernels' block configs and benchmarks with the fastest.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import copy_bandwidth, device_seconds, save_json, seconds_per_call

from gemma4_jax.config import PRESETS, Gemma4Config
from gemma4_jax.kernels import (
    DecodeConfig,
    FlashConfig,
    decode_attention,
    decode_attention_reference,
    dispatch,
    flash_attention,
    flash_attention_reference,
)
from gemma4_jax.kernels.decode_attention import num_splits
from gemma4_jax.model.text import attention as xla_attention
from gemma4_jax.model.text import attention_mask

PREFILL_SHAPES = [(4096, 512, None), (16384, 512, None), (4096, 256, None), (16384, 256, None),
                  (4096, 256, 1024), (16384, 256, 1024), (4096, 512, 1024)]  # (T, head_dim, window); B=1, N=K=8
# The models' own decode calls (name, query heads, KV heads, head_dim, cache slots): sliding layers read a
# ring of W slots, full layers the context. Timed at batch 1, 16 and 64 for ours, XLA and `auto`'s choice.
MODEL_DECODE = [("e4b sliding", 8, 2, 256, 512), ("e4b full 2K", 8, 2, 512, 2048), ("e4b full 32K", 8, 2, 512, 32768),
                ("31b sliding", 32, 16, 256, 1024), ("31b full 2K", 32, 4, 512, 2048),
                ("31b full 8K", 32, 4, 512, 8192), ("31b full 32K", 32, 4, 512, 32768)]
MODEL_DECODE_BATCH = (1, 16, 64)
DECODE_SHAPES = [(1, 8192), (1, 32768), (32, 8192), (32, 32768)]  # (B, S); N=32, K=4, head_dim 512
FLASH_TUNE = {512: [FlashConfig(64, 32, 8, 2), FlashConfig(64, 16, 8, 3), FlashConfig(32, 32, 4, 3),
                    FlashConfig(64, 16, 4, 3)],
              256: [FlashConfig(64, 32, 4, 2), FlashConfig(128, 64, 8, 2), FlashConfig(64, 64, 4, 2),
                    FlashConfig(128, 32, 4, 2), FlashConfig(128, 32, 8, 3)]}
DECODE_TUNE = [DecodeConfig(32, 4, 2, 256), DecodeConfig(32, 4, 2, 128), DecodeConfig(32, 4, 3, 128),
               DecodeConfig(16, 4, 3, 256), DecodeConfig(64, 4, 2, 256)]


class Deadline:
    """Skips the remaining work once `seconds` have passed, so the table and JSON still come out."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def __bool__(self) -> bool:
        return time.perf_counter() < self.end


def _rand(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _try(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # a baseline that does not run at a shape is reported, not fatal
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return msg


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_small() -> list[dict]:
    """Compiled kernels vs the float32 reference: windows, offsets, GQA, ragged lengths, both dtypes."""
    rows = []
    cases = [(64, 1, None, 37, 37, 0), (256, 2, 16, 130, 300, 170), (512, 8, None, 200, 200, 0),
             (512, 8, 64, 77, 333, 256), (256, 8, 1024, 1000, 1000, 0)]
    for dtype in (jnp.bfloat16, jnp.float32):
        for i, (h, g, window, t, s, off) in enumerate(cases):
            kq, kk, kv = jax.random.split(jax.random.key(i), 3)
            b, kh = 2, 2
            q = _rand(kq, (b, t, kh * g, h), dtype, h ** -0.5)
            k, v = _rand(kk, (b, s, kh, h), dtype), _rand(kv, (b, s, kh, h), dtype)
            q_pos = jnp.broadcast_to(off + jnp.arange(t, dtype=jnp.int32), (b, t))
            k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)).at[1, s // 2:].set(-1)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            qd, qdp = q[:, -2:], q_pos[:, -2:]  # the last two tokens as a decode step
            for kind, fn, args in (("flash", flash_attention, (q, q_pos)), ("decode", decode_attention, (qd, qdp))):
                ref = flash_attention_reference(args[0].astype(jnp.float32), *f32[1:], args[1], k_pos, window=window)
                out = _try(fn, args[0], k, v, args[1], k_pos, window=window)
                row = dict(kind=kind, dtype=jnp.dtype(dtype).name, h=h, g=g, window=window, t=args[0].shape[1], s=s)
                if isinstance(out, str):
                    row["error"] = out
                else:
                    row.update(rel_err=_rel(out, ref), finite=bool(np.isfinite(np.asarray(out, np.float32)).all()))
                rows.append(row)
    return rows


def _mgpu():
    """Our Mosaic GPU prefill kernel, when this checkout has it."""
    try:
        from gemma4_jax.kernels import flash_attention_mgpu as m

        return m
    except Exception as e:  # absent, or mid-development: the rest of the bench still runs
        print(f"no Mosaic GPU kernel: {type(e).__name__}: {e}", flush=True)
        return None


def bench_prefill(t: int, h: int, check: bool, config: FlashConfig | None, window: int | None = None) -> dict:
    b, n, kh = 1, 8, 8
    kq, kk, kv = jax.random.split(jax.random.key(t + h), 3)
    q = _rand(kq, (b, t, n, h), jnp.bfloat16, h ** -0.5)
    k, v = _rand(kk, (b, t, kh, h), jnp.bfloat16), _rand(kv, (b, t, kh, h), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # Visible (query, key) pairs: the causal triangle, cut to the window's band.
    pairs = t * (t + 1) / 2 if window is None else window * t - window * (window - 1) / 2
    flops = 4 * b * n * h * pairs
    impls = {
        "ours": jax.jit(lambda q, k, v: flash_attention(q, k, v, pos, pos, window=window, config=config)),
        "xla": jax.jit(lambda q, k, v: xla_attention(q, k, v, attention_mask(pos, pos, window))),
    }
    m = _mgpu()
    if m is not None:
        impls["ours_mosaic"] = jax.jit(lambda q, k, v: m.flash_attention_mgpu(q, k, v, window=window))
    if h <= 256:
        impls["cudnn"] = jax.jit(lambda q, k, v: dispatch.cudnn_attention(q, k, v, window=window))
    impls["auto"] = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, pos, pos, window=window, aligned=True))
    if window is None:
        from jax.experimental.pallas.ops.gpu import attention as stock

        blocks = stock.BlockSizes(block_q=64, block_k=64) if h > 256 else stock.BlockSizes(block_q=128, block_k=64)
        impls["pallas_mha"] = jax.jit(lambda q, k, v: stock.mha(q, k, v, None, sm_scale=1.0, causal=True,
                                                                block_sizes=blocks))
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

            cfg = mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
            impls["mosaic_fa(f16)"] = jax.jit(lambda q, k, v: mgpu.attention(
                q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), cfg))
        except Exception:
            pass
    row = dict(shape=f"prefill B=1 N=K=8 T={t} H={h}" + (f" W={window}" if window else ""), flops=flops,
               tflops={}, errors={}, rel_err_vs_xla={},
               auto=dispatch.resolve("auto", head_dim=h, group=1, q_len=t, aligned=True))
    ref = impls["xla"](q, k, v) if check else None
    for name, fn in impls.items():
        res = _try(seconds_per_call, fn, q, k, v, calls=None)
        if isinstance(res, str):
            row["errors"][name] = res
            continue
        row["tflops"][name] = flops / res / 1e12
        if check and name != "xla":
            row["rel_err_vs_xla"][name] = _try(lambda f=fn: _rel(f(q, k, v), ref))
    return row


def bench_model_decode(name: str, n: int, kh: int, h: int, s: int, b: int, bw: float) -> dict:
    """One model decode call (one token per sequence, a full cache of s slots): ours, XLA and auto's choice."""
    kq, kk, kv = jax.random.split(jax.random.key(b * s + h), 3)
    q = _rand(kq, (b, 1, n, h), jnp.bfloat16, h ** -0.5)
    k, v = _rand(kk, (b, s, kh, h), jnp.bfloat16), _rand(kv, (b, s, kh, h), jnp.bfloat16)
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    window = s if "sliding" in name else None
    nbytes = 2 * k.nbytes
    impls = {
        "ours": jax.jit(lambda q, k, v: decode_attention(q, k, v, q_pos, k_pos, window=window)),
        "xla": jax.jit(lambda q, k, v: xla_attention(q, k, v, attention_mask(q_pos, k_pos, window, k_pos >= 0))),
    }
    row = dict(shape=f"{name} B={b} N={n} K={kh} H={h} S={s}", bytes=nbytes, us={}, gbps={}, errors={},
               auto=dispatch.resolve("auto", head_dim=h, group=n // kh, q_len=1, batch=b, keys=s))
    for key, fn in impls.items():
        res = _try(seconds_per_call, fn, q, k, v, calls=None)
        if isinstance(res, str):
            row["errors"][key] = res
            continue
        row["us"][key], row["gbps"][key] = res * 1e6, nbytes / res / 1e9
    if "ours" in row["us"] and "xla" in row["us"]:
        row["ours_over_xla_speed"] = row["us"]["xla"] / row["us"]["ours"]
    return row


def bench_decode(b: int, s: int, check: bool, config: DecodeConfig | None, bw: float) -> dict:
    n, kh, h = 32, 4, 512
    kq, kk, kv = jax.random.split(jax.random.key(b + s), 3)
    q = _rand(kq, (b, 1, n, h), jnp.bfloat16, h ** -0.5)
    k, v = _rand(kk, (b, s, kh, h), jnp.bfloat16), _rand(kv, (b, s, kh, h), jnp.bfloat16)
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    lengths = jnp.full((b,), s, jnp.int32)
    nbytes = 2 * k.nbytes
    impls = {
        "ours": jax.jit(lambda q, k, v: decode_attention(q, k, v, q_pos, k_pos, config=config)),
        "xla": jax.jit(lambda q, k, v: xla_attention(q, k, v, attention_mask(q_pos, k_pos, None, k_pos >= 0))),
        "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=1.0, key_value_seq_lengths=lengths, implementation="cudnn")),
    }
    from jax.experimental.pallas.ops.gpu import decode_attention as stock

    impls["pallas_gqa"] = jax.jit(lambda q, k, v: stock.gqa(q[:, 0], k, v, kv_seq_len=lengths, sm_scale=1.0)[:, None])
    row = dict(shape=f"decode B={b} S={s} N=32 K=4 H=512", bytes=nbytes, gbps={}, pct_hbm={}, errors={},
               rel_err_vs_xla={})
    ref = impls["xla"](q, k, v) if check else None
    for name, fn in impls.items():
        res = _try(seconds_per_call, fn, q, k, v, calls=None)
        if isinstance(res, str):
            row["errors"][name] = res
            continue
        row["gbps"][name] = nbytes / res / 1e9
        row["pct_hbm"][name] = 100 * nbytes / res / bw
        if check and name != "xla":
            row["rel_err_vs_xla"][name] = _try(lambda f=fn: _rel(f(q, k, v), ref))
    return row


def tune_flash(h: int, ok: Deadline, t: int = 4096) -> list[dict]:
    b, n = 1, 8
    kq, kk, kv = jax.random.split(jax.random.key(h), 3)
    q = _rand(kq, (b, t, n, h), jnp.bfloat16, h ** -0.5)
    k, v = _rand(kk, (b, t, n, h), jnp.bfloat16), _rand(kv, (b, t, n, h), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = []
    for cfg in FLASH_TUNE[h]:
        if not ok:
            break
        fn = jax.jit(lambda q, k, v, cfg=cfg: flash_attention(q, k, v, pos, pos, config=cfg))
        res = _try(seconds_per_call, fn, q, k, v, calls=None, budget_s=0.1, repeat=3)
        out.append(dict(config=dataclasses.asdict(cfg), h=h, t=t,
                        tflops=4 * b * n * h * t * t / 2 / res / 1e12 if not isinstance(res, str) else res))
    return out


def tune_decode(b: int, s: int, ok: Deadline) -> list[dict]:
    n, kh, h = 32, 4, 512
    kq, kk, kv = jax.random.split(jax.random.key(s), 3)
    q = _rand(kq, (b, 1, n, h), jnp.bfloat16, h ** -0.5)
    k, v = _rand(kk, (b, s, kh, h), jnp.bfloat16), _rand(kv, (b, s, kh, h), jnp.bfloat16)
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    out = []
    for cfg in DECODE_TUNE:
        if not ok:
            break
        fn = jax.jit(lambda q, k, v, cfg=cfg: decode_attention(q, k, v, q_pos, k_pos, config=cfg))
        res = _try(seconds_per_call, fn, q, k, v, calls=None, budget_s=0.1, repeat=3)
        out.append(dict(config=dataclasses.asdict(cfg), b=b, s=s,
                        gbps=2 * k.nbytes / res / 1e9 if not isinstance(res, str) else res))
    return out


# The small models' decode calls at short caches (name, query heads, KV heads, head_dim) and the (batch, slots) they
# are swept at by `--small-decode`: the shapes of `bench.py generate`'s decode steps (a 128-token prompt and 64 new
# tokens: 256 slots), where the kernel's tiles and split rule, chosen at 32K context and batch 1, were never timed.
# A sliding layer's ring holds at most its window's slots.


def _small_decode_shapes() -> tuple[list[tuple[str, int, int, int]], dict[str, int | None]]:
    """(name, query heads, KV heads, head_dim) of E2B's and E4B's sliding and full layers, and each one's window,
    from the presets' own layer specs."""
    shapes, windows = [], {}
    for preset in ("e2b", "e4b"):
        cfg = Gemma4Config.from_hf_dict(PRESETS[preset])
        for kind, spec in (("sliding", next(x for x in cfg.layers if x.window is not None)),
                           ("full", next(x for x in cfg.layers if x.window is None))):
            shapes.append((f"{preset} {kind}", cfg.num_heads, spec.num_kv_heads, spec.head_dim))
            windows[f"{preset} {kind}"] = spec.window
    return shapes, windows


SMALL_DECODE, SMALL_DECODE_WINDOWS = _small_decode_shapes()
SMALL_DECODE_POINTS = ((1, 256), (16, 256), (64, 256))
SMALL_DECODE_TARGETS = (16, 64, 128, 256, 1024)
SMALL_DECODE_SHAPES_OF_WARPS = ((4, 2), (8, 3), (2, 3), (4, 1))  # (num_warps, num_stages) tried at the best tiles
SMALL_DECODE_STREAM_BYTES = 256 << 20  # each timed pass reads this much cache (distinct copies): L2 cannot hold it


def _decode_configs(h: int) -> list[DecodeConfig]:
    """The first pass of `sweep_small_decode`: key tiles × split targets at 4 warps and 3 stages."""
    tiles = (16, 32, 64) if h <= 256 else (16, 32)
    return [DecodeConfig(bk, 4, 3, tp) for bk in tiles for tp in SMALL_DECODE_TARGETS]


def sweep_small_decode(name: str, n: int, kh: int, h: int, b: int, s: int, interpret: bool = False,
                       stream_bytes: int = SMALL_DECODE_STREAM_BYTES, first: list[DecodeConfig] | None = None) -> dict:
    """One small-model decode call (one token a sequence, a full cache of `s` slots; a sliding layer's at most its
    window) under the kernel's default config, every config of `_decode_configs`, then the best of those at other
    warps and stages, and XLA's attention: each timed by its kernels' device time (`device_seconds`, combine and
    padding kernels included) over distinct caches that together read `stream_bytes`, as a step's layers read
    theirs from HBM. Each output's error against the float32 reference is kept (`rel_err`)."""
    window = SMALL_DECODE_WINDOWS.get(name)
    s = min(s, window) if window else s
    kq, kk = jax.random.split(jax.random.key(b * s + h + kh), 2)
    q = _rand(kq, (b, 1, n, h), jnp.bfloat16, h ** -0.5)
    one = 2 * b * s * kh * h * 2
    copies = max(1, min(256, -(-stream_bytes // one)))
    caches = [(_rand(jax.random.fold_in(kk, 2 * i), (b, s, kh, h), jnp.bfloat16),
               _rand(jax.random.fold_in(kk, 2 * i + 1), (b, s, kh, h), jnp.bfloat16)) for i in range(copies)]
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.full((b, 1), s - 1, jnp.int32)
    ref = decode_attention_reference(q.astype(jnp.float32), caches[0][0].astype(jnp.float32),
                                     caches[0][1].astype(jnp.float32), q_pos, k_pos, window=window)
    row = dict(shape=f"{name} B={b} N={n} K={kh} H={h} S={s}", b=b, s=s, n=n, kh=kh, h=h, copies=copies,
               bytes=one, configs=[])

    def timed(named):  # [(label, config or 'xla')] -> rows, in one trace
        fns = []
        for _, cfg in named:
            if cfg == "xla":
                mask = attention_mask(q_pos, k_pos, window, k_pos >= 0)
                fns.append(jax.jit(lambda q, k, v, m=mask: xla_attention(q, k, v, m)))
            else:
                fns.append(jax.jit(lambda q, k, v, c=cfg: decode_attention(q, k, v, q_pos, k_pos, window=window,
                                                                           config=c, interpret=interpret)))
        out = []
        for (label, cfg), fn in zip(named, fns, strict=True):
            err = _try(lambda f=fn: _rel(f(q, *caches[0]), ref))
            out.append(dict(label=label, config=cfg if cfg == "xla" else cfg and dataclasses.asdict(cfg),
                            rel_err=err))
        jobs = [(lambda f=fn: [f(q, k, v) for k, v in caches][-1], ()) for fn in fns]
        times = _try(device_seconds, jobs, runs=2)
        for r, t in zip(out, times if isinstance(times, list) else [None] * len(out), strict=True):
            if t is None:
                r["error"] = times
            else:
                r["us"], r["kernels"] = t["busy_us"] / copies, t["kernels"] / copies
                r["gbps"] = one / (r["us"] * 1e-6) / 1e9 if r["us"] > 0 else None
        return out

    pass1, seen = [("default", None), ("xla", "xla")], set()
    for c in first or _decode_configs(h):  # configs that split the keys alike are one config: the first is kept
        splits = num_splits(b, kh, -(-s // c.block_k), c.target_programs)
        if (c.block_k, splits) not in seen:
            seen.add((c.block_k, splits))
            pass1.append((f"bk{c.block_k} ns{splits} (tp{c.target_programs})", c))
    row["configs"] = timed(pass1)
    kernel_rows = [r for r in row["configs"] if r["label"] not in ("xla",) and r.get("us")]
    if kernel_rows:
        best = min(kernel_rows, key=lambda r: r["us"])
        base = DecodeConfig(**best["config"]) if best["config"] else dispatch.decode_config(h, jnp.bfloat16)
        more = [(f"{best['label']} w{w} st{st}",
                 dataclasses.replace(base, num_warps=w, num_stages=st)) for w, st in SMALL_DECODE_SHAPES_OF_WARPS]
        row["configs"] += timed(more)
    timed_rows = [r for r in row["configs"] if r["label"] != "xla" and r.get("us")]
    if timed_rows:
        best = min(timed_rows, key=lambda r: r["us"])
        default = next(r for r in row["configs"] if r["label"] == "default")
        row["best"] = dict(label=best["label"], config=best["config"], us=best["us"])
        if default.get("us"):
            row["default_over_best"] = default["us"] / best["us"]
    return row


def small_decode_plan(only: str, points: str) -> tuple[list, list]:
    """The shapes and (batch, slots) points `--small-decode-only` and `--small-decode-points` name (empty: all of
    SMALL_DECODE, SMALL_DECODE_POINTS); one sentence (SystemExit) for a name or point it cannot read."""
    names = {x[0]: x for x in SMALL_DECODE}
    wanted = [v.strip() for v in only.split(",") if v.strip()]
    if unknown := [v for v in wanted if v not in names]:
        raise SystemExit(f"bench.py attention: --small-decode-only names {unknown[0]!r}, not one of {sorted(names)}.")
    pts = []
    for p in (v.strip() for v in points.split(",") if v.strip()):
        b, _, sl = p.partition("x")
        if not (b.isdigit() and sl.isdigit() and int(b) > 0 and int(sl) > 0):
            raise SystemExit(f"bench.py attention: --small-decode-points takes BATCHxSLOTS (such as 64x256), "
                             f"not {p!r}.")
        pts.append((int(b), int(sl)))
    return [names[v] for v in wanted] or list(SMALL_DECODE), pts or list(SMALL_DECODE_POINTS)


def run_small_decode(args) -> dict:
    """`--small-decode`: `sweep_small_decode` over SMALL_DECODE × SMALL_DECODE_POINTS, printed as it goes."""
    ok = Deadline(args.max_seconds)
    dev = jax.devices()[0]
    interpret = dev.platform != "gpu"
    result = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                  small_decode=[])
    shapes, points = small_decode_plan(args.small_decode_only, args.small_decode_points)
    for name, n, kh, h in shapes:
        for b, s in points:
            if not ok:
                break
            row = sweep_small_decode(name, n, kh, h, b, s, interpret=interpret,
                                     **({"stream_bytes": 1, "first": _decode_configs(h)[:2]} if interpret else {}))
            result["small_decode"].append(row)
            cells = "  ".join(f"{r['label']} {r['us']:.2f}" for r in row["configs"] if r.get("us") is not None)
            print(f"{row['shape']:<36} best {row.get('best', {}).get('label')}  "
                  f"default/best {row.get('default_over_best', float('nan')):.3f}  µs: {cells}", flush=True)
            save_json(result, args.json)
    save_json(result, args.json)
    return result


def _best(rows, key, cls):
    ok = [r for r in rows if not isinstance(r[key], str)]
    return cls(**max(ok, key=lambda r: r[key])["config"]) if ok else None


def print_table(result: dict) -> None:
    print(f"\ncard: {result['device']}  jax {result['jax']}  HBM copy {result['hbm_gbps']:.0f} GB/s")
    for row in result["prefill"]:
        cells = "  ".join(f"{k} {v:.0f}" for k, v in row["tflops"].items())
        print(f"{row['shape']:<34} TFLOP/s  {cells}")
        for k, v in row["errors"].items():
            print(f"    {k}: {v}")
    for row in result["decode"]:
        cells = "  ".join(f"{k} {v:.0f} ({row['pct_hbm'][k]:.0f}%)" for k, v in row["gbps"].items())
        print(f"{row['shape']:<34} GB/s  {cells}")
        for k, v in row["errors"].items():
            print(f"    {k}: {v}")
    for row in result.get("model_decode", []):
        cells = "  ".join(f"{k} {v:.1f}" for k, v in row["us"].items())
        print(f"{row['shape']:<44} µs  {cells}  (auto: {row['auto']})")


def for_profiler(mosaic_only: bool = False) -> None:
    """Run each prefill kernel a few times at T=4096 and nothing else, for `ncu` to capture (no timing)."""
    m = _mgpu()
    for h in (512,) if mosaic_only else (512, 256):
        kq, kk, kv = jax.random.split(jax.random.key(h), 3)
        q = _rand(kq, (1, 4096, 8, h), jnp.bfloat16, h ** -0.5)
        k, v = _rand(kk, (1, 4096, 8, h), jnp.bfloat16), _rand(kv, (1, 4096, 8, h), jnp.bfloat16)
        pos = jnp.broadcast_to(jnp.arange(4096, dtype=jnp.int32), (1, 4096))
        fns = {} if mosaic_only else {"ours": jax.jit(lambda q, k, v, p=pos: flash_attention(q, k, v, p, p))}
        if m is not None:
            fns["ours_mosaic"] = jax.jit(lambda q, k, v: m.flash_attention_mgpu(q, k, v))
        for name, fn in fns.items():
            for _ in range(2):
                out = _try(lambda f=fn, a=(q, k, v): jax.block_until_ready(f(*a)))
            print("ran", name, h, "error: " + out if isinstance(out, str) else "ok", flush=True)


def run(args) -> dict:
    if args.small_decode:
        return run_small_decode(args)
    if args.for_profiler:
        for_profiler(args.mosaic_only)
        return {}
    ok = Deadline(args.max_seconds)
    dev = jax.devices()[0]
    result = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    result["hbm_gbps"] = copy_bandwidth(2.0, calls=None, stat=statistics.median) / 1e9
    print(f"card {result['device']}, HBM copy {result['hbm_gbps']:.0f} GB/s", flush=True)
    if args.check:
        result["check"] = _try(check_small)
        for r in result["check"] if isinstance(result["check"], list) else [result["check"]]:
            print("check", r, flush=True)
    flash_cfg = {512: None, 256: None}
    decode_cfg = None
    if args.tune and ok:
        for h in (512, 256):
            rows = tune_flash(h, ok)
            result.setdefault("tune_flash", []).extend(rows)
            for r in rows:
                print("tune", r, flush=True)
            flash_cfg[h] = _best(rows, "tflops", FlashConfig)
        rows = tune_decode(1, 32768, ok) + tune_decode(1, 8192, ok)
        result["tune_decode"] = rows
        for r in rows:
            print("tune", r, flush=True)
        decode_cfg = _best([r for r in rows if r["b"] == 1], "gbps", DecodeConfig)
        result["tuned"] = dict(flash={h: c and dataclasses.asdict(c) for h, c in flash_cfg.items()},
                               decode=decode_cfg and dataclasses.asdict(decode_cfg))
    result["prefill"] = []
    for t, h, window in PREFILL_SHAPES:
        if (args.quick and t > 4096) or not ok:
            continue
        result["prefill"].append(bench_prefill(t, h, args.check, flash_cfg[h], window))
        print(result["prefill"][-1], flush=True)
        save_json(result, args.json)
    result["model_decode"] = []
    for name, n, kh, h, s in MODEL_DECODE:
        for b in MODEL_DECODE_BATCH:
            if ok:
                result["model_decode"].append(bench_model_decode(name, n, kh, h, s, b, result["hbm_gbps"] * 1e9))
                print(result["model_decode"][-1], flush=True)
        save_json(result, args.json)
    result["decode"] = []
    for b, s in DECODE_SHAPES:
        if not ok:
            continue
        result["decode"].append(bench_decode(b, s, args.check, decode_cfg, result["hbm_gbps"] * 1e9))
        print(result["decode"][-1], flush=True)
        save_json(result, args.json)
    print_table(result)
    save_json(result, args.json)
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="attention kernels vs XLA / cuDNN / stock Pallas (GPU)")
    p.add_argument("--check", action="store_true", help="correctness of the compiled kernels first")
    p.add_argument("--tune", action="store_true", help="sweep block configs and benchmark the fastest")
    p.add_argument("--quick", action="store_true", help="skip the 16K-token prefill shapes")
    p.add_argument("--json", help="write all numbers to this file")
    p.add_argument("--max-seconds", type=float, default=1e9, help="skip what remains after this long")
    p.add_argument("--for-profiler", action="store_true",
                   help="only run the prefill kernels at T=4096 a few times (under ncu), no timing")
    p.add_argument("--mosaic-only", action="store_true", help="with --for-profiler: only the Mosaic GPU kernel")
    p.add_argument("--small-decode", action="store_true",
                   help="only sweep the decode kernel's configs at the small models' short-cache decode calls, "
                        "device-timed (SMALL_DECODE)")
    p.add_argument("--small-decode-only", default="", metavar="NAMES",
                   help="with --small-decode: these of SMALL_DECODE's names, comma-separated (e.g. 'e2b sliding')")
    p.add_argument("--small-decode-points", default="", metavar="BxS,...",
                   help="with --small-decode: (batch, slots) points instead of SMALL_DECODE_POINTS, e.g. 1x256,64x256")
    p.set_defaults(func=run)
