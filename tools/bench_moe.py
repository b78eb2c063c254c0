"""`bench.py moe`: the routed-expert kernels against the XLA path at one model's expert shapes, on random data.

    PYTHONPATH=. python tools/bench.py moe --preset 26b-a4b --tokens 1,16,64,128,2048 [--sweep] [--json out.json]

For each token count M (routed rows R = M · top-k, experts drawn uniformly, k distinct per token): the XLA path
(`moe_experts_xla`: a gather of the routed experts up to 64 rows, `ragged_dot` above) and the kernels
(`moe_experts`) at the default config, plus, with `--sweep`, the candidate configs below. Each is checked
against `moe_experts_reference` in float32 at `Precision.HIGHEST` on the same inputs (max|Δ| / max|ref|), then
timed: `--iters` calls back to back, median of `--repeat` such runs, rotating over `--weight-sets` layers of
expert weights so that the routed experts come from HBM, not L2, as in a model (layers differ).

Reported per call: µs, useful TFLOP/s (2 · R · 3 · D · F), and GB/s over the bytes of the experts the routing
touches (each read once), the HBM floor; the same in the JSON with every config tried.

`--model-kl L` then builds the preset cut to its first L layers (real widths, all experts; random weights,
norms near 1) and runs one 512-token forward three ways: float32 with XLA experts at `Precision.HIGHEST` (the
reference), bfloat16 with the XLA experts (the path before the kernels) and bfloat16 with the kernels; it
reports each bf16 run's KL(reference ‖ run) per token (mean, p99, max) and top-1 agreement.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import device_seconds, kl_per_token, random_modules_f32_bf16, save_json, seconds_per_call


def add_parser(sub) -> None:
    p = sub.add_parser("moe", help="MoE expert kernels vs XLA at a model's expert shapes")
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--tokens", default="1,16,64,128,2048")
    p.add_argument("--sweep", action="store_true", help="also time the candidate configs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--weight-sets", type=int, default=4)
    p.add_argument("--no-xla", action="store_true", help="skip the XLA path (it is slow at many rows)")
    p.add_argument("--mosaic", action="store_true",
                   help="also the Mosaic GPU grouped GEMM (moe_mgpu; with --sweep, its candidate configs too)")
    p.add_argument("--sweep-token-tiles", action="store_true",
                   help="with --mosaic, also time token-tile configs (column tiles, ring depth) at ≤ 64 tokens")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels' sweep (keep their default)")
    p.add_argument("--gemm-only", action="store_true",
                   help="also time each default's two grouped-GEMM kernels alone (plan, gather and combine outside)")
    p.add_argument("--plan", action="store_true",
                   help="only the Mosaic path's tile plan (+ gather), XLA's against the one-launch kernel, and the "
                        "routed experts with each, timed from a device trace")
    p.add_argument("--model-kl", type=int, default=0, metavar="L",
                   help="also: bf16 XLA experts vs bf16 kernels against a float32 forward, the preset cut to L layers")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def model_kl(preset_name: str, layers: int, tokens: int = 512, mosaic: bool = False) -> dict:
    """KL per token of bf16 forwards (XLA experts, kernels) from a float32 XLA forward of the same weights."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import PRESETS, Gemma4Config
    from gemma4_jax.kernels import dispatch

    raw = dict(PRESETS[preset_name], num_hidden_layers=layers)
    raw["layer_types"] = raw["layer_types"][:layers]
    cfg = Gemma4Config.from_hf_dict(raw, name=f"{preset_name}-{layers}l")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(1, tokens))
    m32, m16 = random_modules_f32_bf16(cfg)  # the same weights, the second rounded to bf16
    dispatch.MOE_FORCE = "xla"
    with jax.default_matmul_precision("highest"):
        ref = Gemma4Model(m32, RunConfig(dtype="float32", attn_impl="xla")).logits(ids)
    del m32
    out = {"config": cfg.name, "tokens": tokens}
    runs = [("bf16_xla_experts", "xla"), ("bf16_kernels", "pallas")] + ([("bf16_mosaic", "mosaic")] if mosaic else [])
    for name, force in runs:
        dispatch.MOE_FORCE = force
        got = Gemma4Model(m16, RunConfig(dtype="bfloat16", attn_impl="auto")).logits(ids)
        kl = kl_per_token(ref, got).reshape(-1)
        out[name] = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
                     "top1_equal": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}
        print(f"  {name}: KL mean {kl.mean():.3e} p99 {np.percentile(kl, 99):.3e} max {kl.max():.3e}, "
              f"top-1 equal {out[name]['top1_equal']:.3f}", flush=True)
    dispatch.MOE_FORCE = None
    return out


def plan_rows_timed(m: int, d: int, e: int, k: int, key, weights) -> dict:
    """At m tokens: the Mosaic path's plan and gathered rows by XLA and by `plan_tiles_kernel` (equal?), and the
    routed experts with each, as device µs and kernels per call (`bench_common.device_seconds`)."""
    from gemma4_jax.kernels import moe_mgpu as mos

    kx, ki, kw = jax.random.split(jax.random.fold_in(key, 1000 + m), 3)
    x = jax.random.normal(kx, (m, d), jnp.float32).astype(jnp.bfloat16)
    idx = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(ki, m)).astype(jnp.int32)
    w = jax.random.uniform(kw, (m, k), jnp.float32, 0.1, 1.0)
    cfg = mos.default_config(m * k, d, weights[0].shape[1])
    out = {"tokens": m, "routed_rows": m * k, "kernel_applies": mos.plan_kernel_supports(m * k, e)}
    if not out["kernel_applies"]:
        return out
    interp = jax.devices()[0].platform != "gpu"  # on a CPU: the plan alone, interpreted (a smoke run)
    plans = {pk: jax.jit(lambda x_, i, pk=pk: mos.make_plan(x_, i, e, cfg, plan_kernel=pk, interpret=interp))
             for pk in (False, True)}
    (p0, xs0), (p1, xs1) = plans[False](x, idx), plans[True](x, idx)
    t = p0.table.shape[1]
    out["equal"] = bool(np.array_equal(np.asarray(p1.table)[:, :t], np.asarray(p0.table))
                        and np.array_equal(np.asarray(p1.order), np.asarray(p0.order))
                        and np.array_equal(np.asarray(p1.pos), np.asarray(p0.pos))
                        and np.array_equal(np.asarray(xs1), np.asarray(xs0)))
    jobs = [(plans[False], (x, idx)), (plans[True], (x, idx))]
    names: tuple = ("plan_xla", "plan_kernel")
    if not interp:
        experts = {pk: jax.jit(lambda *a, pk=pk: mos.moe_experts_mgpu(*a, plan_kernel=pk)) for pk in (False, True)}
        args = (x, w, idx, *weights)
        y0, y1 = (np.asarray(experts[pk](*args), np.float32) for pk in (False, True))
        out["experts_equal"] = bool(np.array_equal(y0, y1))
        jobs += [(experts[False], args), (experts[True], args)]
        names += ("experts_plan_xla", "experts_plan_kernel")
    for name, r in zip(names, device_seconds(jobs, runs=20), strict=True):
        out[name] = {"us": round(r["busy_us"], 2), "kernels": r["kernels"]}
    print(f"  M={m}: {out}", flush=True)
    return out


def candidates(rows: int, d: int, f: int):
    """Configs worth timing at this many routed rows (block sizes fitted to D and F)."""
    from gemma4_jax.kernels.moe import MoeConfig
    from gemma4_jax.kernels.tiling import fit_block as _fit

    out = []
    if rows <= 64:
        for plan in ("rows", "sorted"):
            for n_up, k_up, n_dn, stages in ((32, 128, 64, 4), (64, 128, 128, 3), (16, 256, 32, 4), (32, 64, 64, 6)):
                out.append(MoeConfig(plan, 16, _fit(f, n_up), _fit(d, k_up), _fit(d, n_dn), _fit(f, 64), 4, stages))
    if 16 < rows <= 512:  # decode at batch 3–64: one block of 16 rows an expert, the tiles and pipelining vary
        for n_up, k_up, n_dn, k_dn, warps, stages in (
                (32, 128, 64, 64, 4, 4), (16, 256, 64, 64, 4, 4), (32, 256, 64, 64, 4, 3), (64, 128, 64, 64, 4, 4),
                (32, 128, 32, 64, 4, 4), (32, 128, 128, 64, 4, 4), (32, 128, 64, 32, 4, 5), (32, 128, 64, 64, 2, 4),
                (16, 128, 32, 64, 2, 5), (32, 128, 64, 64, 4, 6), (64, 64, 64, 64, 4, 5), (16, 512, 64, 64, 4, 3),
                (32, 128, 64, 64, 8, 4), (64, 256, 128, 64, 8, 3)):
            out.append(MoeConfig("sorted", 16, _fit(f, n_up), _fit(d, k_up), _fit(d, n_dn), _fit(f, k_dn), warps,
                                 stages))
    if rows > 16:
        for bm, n_up, k_up, n_dn, k_dn, warps, stages in (
                (16, 32, 128, 64, 64, 4, 4), (32, 64, 64, 128, 64, 4, 3), (64, 64, 64, 128, 64, 4, 3),
                (64, 64, 64, 128, 64, 8, 4), (128, 64, 64, 128, 64, 8, 3), (64, 64, 128, 128, 64, 4, 3),
                (64, 64, 128, 256, 64, 8, 3), (128, 64, 128, 128, 64, 8, 3), (64, 64, 64, 128, 32, 4, 4),
                # wider gate_up tiles (two accumulators of bm × block_n: 8 warps keep them in registers)
                (64, 128, 64, 128, 64, 8, 3), (64, 128, 64, 256, 64, 8, 3), (64, 128, 32, 128, 64, 8, 4),
                (128, 128, 64, 256, 64, 8, 3), (128, 128, 32, 128, 64, 8, 4), (64, 64, 64, 256, 64, 4, 4),
                (64, 128, 64, 128, 64, 4, 3), (128, 64, 64, 256, 64, 8, 4), (64, 32, 64, 128, 64, 4, 4)):
            if bm <= max(16, rows // 8):
                out.append(MoeConfig("sorted", bm, _fit(f, n_up), _fit(d, k_up), _fit(d, n_dn), _fit(f, k_dn),
                                     warps, stages))
    return list(dict.fromkeys(out))


# (block_m, padded, gate_up columns, down columns, stages)
MOSAIC_SHAPES = ((64, False, 64, 128, 4), (64, False, 64, 128, 6), (64, False, 64, 256, 4), (64, False, 64, 64, 4),
                 (64, True, 64, 128, 4), (64, True, 64, 256, 4), (128, False, 64, 128, 3), (128, False, 64, 128, 4),
                 (128, True, 64, 128, 3), (128, True, 64, 128, 4), (128, True, 64, 64, 5))
# token tiles (unpadded 64-row tiles only), with gate_up's depth per step and ring depth (block_k_up, stages_up:
# steps of 128 and 256 read 256 and 512 contiguous bytes of each weight row) where given
TOKEN_TILE_SHAPES = ((64, False, 64, 128, 4, 128, 3), (64, False, 64, 128, 4, 128, 4), (64, False, 64, 128, 4, 256, 2),
                     (64, False, 64, 64, 4, 128, 3), (64, False, 64, 128, 6), (64, False, 64, 64, 4))


def mosaic_candidates(d: int, f: int, shapes=MOSAIC_SHAPES):
    """Mosaic configs worth timing: gate_up / down column tiles, ring depth (block sizes fitted to D and F)."""
    from gemma4_jax.kernels.moe_mgpu import SMEM_BYTES, MgpuMoeConfig, smem_bytes
    from gemma4_jax.kernels.tiling import fit_block as _fit

    out = []
    for bm, padded, n_up, n_dn, stages, *up in shapes:
        k_up, stages_up = up or (0, 0)
        c = MgpuMoeConfig(block_m=bm, block_n_up=_fit(f, n_up), block_n_down=_fit(d, n_dn),
                          block_k=_fit(min(d, f), 64), stages=stages, padded=padded,
                          block_k_up=k_up and _fit(d, k_up), stages_up=stages_up)
        if smem_bytes(c) <= SMEM_BYTES - 1024:
            out.append(c)
    return list(dict.fromkeys(out))


def run(args) -> dict:
    from gemma4_jax.config import preset
    from gemma4_jax.kernels.moe import default_config, moe_experts, moe_experts_reference, moe_experts_xla
    from gemma4_jax.kernels.moe_mgpu import default_config as mgpu_default_config
    from gemma4_jax.kernels.moe_mgpu import moe_experts_mgpu, token_tiles_apply

    cfg = preset(args.preset)
    d, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts
    bf = jnp.bfloat16
    key = jax.random.key(0)
    weights = []
    for s in range(args.weight_sets):
        kg, ku, kd = jax.random.split(jax.random.fold_in(key, s), 3)
        weights.append(((d**-0.5 * jax.random.normal(kg, (e, f, d), jnp.float32)).astype(bf),
                        (d**-0.5 * jax.random.normal(ku, (e, f, d), jnp.float32)).astype(bf),
                        (f**-0.5 * jax.random.normal(kd, (e, d, f), jnp.float32)).astype(bf)))
    dev = jax.devices()[0]
    res = dict(preset=args.preset, d=d, f=f, experts=e, top_k=k, card=dev.device_kind, jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), rows=[])
    print(f"{args.preset}: D={d} F={f} E={e} top-{k}, {dev.device_kind}", flush=True)
    if args.plan:
        res["plan"] = [plan_rows_timed(m, d, e, k, key, weights[0]) for m in (int(t) for t in args.tokens.split(","))]
        save_json(res, args.json)
        return res
    for m in [int(t) for t in args.tokens.split(",")]:
        kx, ki, kw = jax.random.split(jax.random.fold_in(key, 1000 + m), 3)
        x = jax.random.normal(kx, (m, d), jnp.float32).astype(bf)
        idx = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(ki, m)).astype(jnp.int32)
        w = jax.random.uniform(kw, (m, k), jnp.float32, 0.1, 1.0)
        touched = int(np.unique(np.asarray(idx)).size)
        nbytes = touched * 3 * d * f * 2
        flops = 2 * m * k * 3 * d * f
        g0, u0, d0 = weights[0]
        ref = np.asarray(jax.jit(lambda *a: moe_experts_reference(*a, precision=jax.lax.Precision.HIGHEST))(
            x.astype(jnp.float32), w, idx, g0.astype(jnp.float32), u0.astype(jnp.float32), d0.astype(jnp.float32)))
        row = dict(tokens=m, routed_rows=m * k, experts_touched=touched, expert_bytes=nbytes, flops=flops,
                   default=str(default_config(m * k, d, f)), results=[])

        def measure(name, fn, row=row, x=x, w=w, idx=idx, ref=ref, nbytes=nbytes, flops=flops, g0=g0, u0=u0,
                    d0=d0, m=m, k=k):
            try:
                out = np.asarray(fn(x, w, idx, g0, u0, d0), np.float32)
                err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                finite = bool(np.isfinite(out).all())
                sets = [(x, w, idx, *ws) for ws in weights]
                s = seconds_per_call(fn, arg_sets=sets, calls=args.iters, repeat=args.repeat)
                r = dict(impl=name, us=s * 1e6, tflops=flops / s / 1e12, gb_s=nbytes / s / 1e9, rel_err=err,
                         finite=finite)
            except Exception as ex:  # a config that does not compile here: record it, go on
                r = dict(impl=name, error=f"{type(ex).__name__}: {str(ex)[:3000]}")
            row["results"].append(r)
            if "us" in r:
                print(f"  M={m:5d} R={m * k:6d} {name:90s} {r['us']:9.1f} us {r['tflops']:7.1f} TFLOP/s "
                      f"{r['gb_s']:7.0f} GB/s err {r['rel_err']:.1e}", flush=True)
            else:
                print(f"  M={m:5d} {name}: {r['error'][:1500]}", flush=True)
            return r

        if not args.no_xla:
            measure("xla", jax.jit(moe_experts_xla))
        measure("kernel default", moe_experts)
        if args.mosaic:
            measure("mosaic default", moe_experts_mgpu)
            if token_tiles_apply(m, mgpu_default_config(m * k, d, f)):  # no plan: a tile per chosen expert
                measure("mosaic token tiles", jax.jit(lambda *a: moe_experts_mgpu(*a, token_tiles=True)))
                for c in (mosaic_candidates(d, f, TOKEN_TILE_SHAPES) if args.sweep_token_tiles else ()):
                    measure(f"mosaic token tiles {c}",
                            jax.jit(lambda *a, c=c: moe_experts_mgpu(*a, config=c, token_tiles=True)))
        if args.gemm_only:
            from gemma4_jax.kernels import moe as tri
            from gemma4_jax.kernels import moe_mgpu as mos

            tcfg, mcfg = default_config(m * k, d, f), mos.default_config(m * k, d, f)
            tplan = jax.jit(lambda i, c=tcfg: tri.make_plan(i, e, c))(idx)
            mplan, xs = jax.jit(lambda x_, i, c=mcfg: mos.make_plan(x_, i, e, c))(x, idx)
            gemms = [("kernel default, GEMMs only", jax.jit(
                lambda p_, x_, w_, g, u, dn, c=tcfg, k=k: tri.grouped_gemms(p_, x_, w_, g, u, dn, c, top_k=k)),
                [(tplan, x, w, *ws) for ws in weights])]
            if args.mosaic:
                gemms.append(("mosaic default, GEMMs only", jax.jit(
                    lambda p_, x_, g, u, dn, c=mcfg: mos.grouped_gemms(p_, x_, g, u, dn, c)),
                    [(mplan, xs, *ws) for ws in weights]))
            for name, fn, sets in gemms:
                s = seconds_per_call(fn, arg_sets=sets, calls=args.iters, repeat=args.repeat)
                row["results"].append(dict(impl=name, us=s * 1e6, tflops=flops / s / 1e12, gb_s=nbytes / s / 1e9))
                print(f"  M={m:5d} R={m * k:6d} {name:90s} {s * 1e6:9.1f} us {flops / s / 1e12:7.1f} TFLOP/s "
                      f"{nbytes / s / 1e9:7.0f} GB/s", flush=True)
        if args.sweep and not args.no_triton:
            for c in candidates(m * k, d, f):
                measure(f"kernel {c}", jax.jit(lambda *a, c=c: moe_experts(*a, config=c)))
        if args.sweep and args.mosaic:
            for c in mosaic_candidates(d, f):
                measure(f"mosaic {c}", jax.jit(lambda *a, c=c: moe_experts_mgpu(*a, config=c)))
        res["rows"].append(row)
        save_json(res, args.json)
    if args.model_kl:
        print(f"model KL, {args.preset} cut to {args.model_kl} layers", flush=True)
        res["model_kl"] = model_kl(args.preset, args.model_kl, mosaic=args.mosaic)
        save_json(res, args.json)
    print("\nsummary (best kernel config vs XLA, per token count)")
    for row in res["rows"]:
        ok = [r for r in row["results"] if "us" in r]
        xla = next((r for r in ok if r["impl"] == "xla"), None)
        best = min((r for r in ok if r["impl"] != "xla"), key=lambda r: r["us"], default=None)
        dflt = next((r for r in ok if r["impl"] == "kernel default"), None)
        if best:
            print(f"M={row['tokens']:5d}: best {best['us']:.1f} us ({best['tflops']:.0f} TFLOP/s, "
                  f"{best['gb_s']:.0f} GB/s)"
                  f" default {dflt['us'] if dflt else float('nan'):.1f} us"
                  f" xla {xla['us'] if xla else float('nan'):.1f} us :: {best['impl']}")
    return res
