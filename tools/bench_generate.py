"""`bench.py generate`: end-to-end generation speed on random real-shape weights, beside transformers.

    PYTHONPATH=. python tools/bench.py generate --preset e4b --batch 1,16,64 --prompt-len 128 --gen-len 128 \
        [--prefill-len 2048] [--repeat 2] [--pp N] [--profile DIR] \
        [--compare transformers [--compile-batches 16]] [--json out.json]

The random model is built once on the device (`gemma4_jax.testing.synthetic.random_model`, `random_init_s`), the
HBM bandwidth measured with a large copy (`hbm_gb_s`); then, for each batch size in turn
(`results[str(batch)]`), with prompts of `--prompt-len` random tokens:

- compile and first run: the first `gen-len`-token generation (it compiles prefill and the decode loop);
  `compile_s` is that less a timed one;
- decode ms/token and tokens/s: the decode part of a `gen-len`-token generation (the `gen-len − 1` tokens after
  the prefill's), timed on its own (`generate(timings=)`), best of `--repeat` (until 2026-12-01: the difference
  between a `gen-len`- and a `gen-len/2 + 1`-token generation, which a busy machine could make negative);
- the HBM roofline: the bytes a decode step must read (weights, only the routed experts' share for MoE,
  and the KV cache at the mean context of the timed steps) over the measured bandwidth (`hbm_gb_s`, a
  copy), and decode's ratio to it; the same over a read-only bandwidth (`hbm_read_gb_s`, a 4 GiB sum) as
  `read_roofline_ms_per_token` / `decode_vs_read_roofline`; and over the best of those, a decode-like read (a
  bf16 matrix-vector product over 4 GiB, `hbm_matvec_gb_s`) and the same probes and a batch-1 product timed by
  their kernels' device time (`hbm_device_gb_s`, `bench_common.device_bandwidths`: no host launch and wait in
  the time, as in the decode loop) as `best_roofline_ms_per_token` / `decode_vs_best_roofline` at
  `hbm_best_gb_s` (a probe slower than the model's own decode would put decode above its roofline);
- prefill ms and % MFU of the batch's prompts: `gemma4_jax.generation.loop.prefill` called directly on the
  shapes generation compiled, best of `--repeat`;
- device memory: the process's peak so far (so list the batches in increasing order) and the bytes in use.

`load_to_first_run_s` is the random init plus the first batch's compile and first run.

After the first batch: prefill of `--prefill-len` tokens at batch 1 (`long_prefill`: compile, ms, % MFU;
0 skips it), then, with `--profile DIR`, perfetto traces of an (already compiled) 1-token generation and one of
33 tokens (two decode chunks), summarised into `profile` (the busiest kernels and op classes of the longer one, by
`tools/trace_summary.py`) and `profile.decode_step` (their difference over the 32 steps: one decode step's device
µs and kernels by op class, and the device's idle µs between kernels; `between_anchors`: per step, the windows
when no `--profile-anchor` kernel runs — a MoE model's experts by default — and the kernels inside them, the chain
that the rest of the step adds to the experts; `kernel_args`: each named kernel's profiler args). With
`--profile-hlo` the process also dumps its decode programs' optimised HLO into DIR/hlo, and each listed kernel gets
`hlo`: the HLO instruction of its first instance in the decode program and the named scopes and ops it runs (a
GPU trace names XLA's fusions only by instruction; `hlo_annotated` counts the kernels found). With `--pp N` (a
pipeline), prefill is timed as a 1-token generation instead.

`--dtype float32` (pp 1) runs the model, its cache and compute in float32 at full precision, as
`load(dtype="float32")` does (no MFU: bf16's peak is not its figure; the roofline at 4-byte weights). A float32 model
keeps a layer's q/k/v and gate/up products apart on a GPU (`numerics.unmerged`, for exactness); `--float32-merged`
lets XLA merge them, so that the two runs give what keeping them apart costs.

`--compare transformers` then runs the same shapes through transformers' Gemma4ForCausalLM (in `--dtype`,
random weights, built once; `transformers[str(batch)]`): `eager` for every batch, and `static_compiled`
(a static cache, with the decode step under transformers' own `torch.compile(mode="reduce-overhead")`)
for the batches in `--compile-batches` ('' for none). Decode from a streamer's clock: the time from the first
new token to the end of a `gen-len`-token generation (one run, after an 8-token warm-up, whose time is
`first_run_s`), prefill as a 1-token generation. As a check on that clock, `decode_ms_per_token_without_streamer`
is the difference between a `gen-len`- and a (`gen-len` / 2 + 1)-token generation without a streamer, over the
tokens between (the method of the 2026-11-28 tables; on a busy host it can even come out negative), and
`generation_overhead_s` what a whole generation took beyond its 1-token generation and that many marginal steps.
`torch_compile` says what torch.compile did in each mode's runs (`CudagraphWatch`): a compiled step whose CUDA
graphs were skipped launches every kernel from the host, so the ratio stands only where `cudagraph_skips` is 0.
JAX keeps freed device memory in its own pool until its process ends, so with `--compare` our side runs in a child
process: the two models are never on the device together.

The JSON file is rewritten after every measured item, so a run cut short keeps what it measured; each
phase prints a line with its seconds. A batch that fails (out of memory) records its error and the
run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import (
    Progress,
    best_generation,
    copy_bandwidth,
    device_bandwidths,
    device_trace,
    matvec_bandwidth,
    random_model,
    read_bandwidth,
    seconds_once,
    torch_full_float32,
    weight_arrays,
)

# Dense bf16 tensor-core peak (FLOP/s) by device kind, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generation speed on random real-shape weights (+ transformers)")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json instead of --preset (smoke tests)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch", default="1", help="batch sizes measured in turn with one model, e.g. 1,16,64")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the decode runs")
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048, help="prompt tokens of the batch-1 prefill (0: skip)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the model's weights, cache and compute (float32: full-precision matmuls, pp 1 only; "
                        "transformers' side with --compare in the same dtype)")
    p.add_argument("--float32-merged", action="store_true",
                   help="with --dtype float32: let XLA merge a layer's q/k/v and gate/up products (the library keeps "
                        "them apart for exactness, numerics.unmerged) to measure what keeping them apart costs")
    add_decode_arguments(p)
    p.add_argument("--check-scheduling", action="store_true",
                   help="only compare greedy tokens under both decode schedulings (each twice), no timing")
    p.add_argument("--profile", default=None, metavar="DIR", help="perfetto trace of one generation (first batch)")
    p.add_argument("--profile-top", type=int, default=30, help="kernels kept in the profile summary")
    p.add_argument("--profile-anchor", default="moe", metavar="REGEX",
                   help="kernels whose gaps the profile analyses (what runs while none of them does)")
    p.add_argument("--profile-hlo", action="store_true",
                   help="with --profile: XLA dumps the decode programs' optimised HLO into DIR/hlo, and the summary's "
                        "kernels name the scopes and ops they run (trace_summary.hlo_scopes)")
    p.add_argument("--compare", default="none", choices=["none", "transformers"])
    p.add_argument("--compile-batches", default="16",
                   help="batches for transformers' static cache + torch.compile ('' for none)")
    p.add_argument("--hbm-gib", type=float, default=2.0,
                   help="GiB copied to measure the bandwidth (twice that is summed for the read-only figure)")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="seconds for the whole run: our side starts no new batch after 0.6·S, transformers no "
                        "new item after S (skipped items are recorded as such)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep our compiled programs in DIR across processes, as `bench.py queue --compile-cache` and "
                        "the CLI do (default: none, so compile times are a cold process's)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def gemv_config(text: str):
    """`--output-projection-config`'s value: BN,BK,SPLIT[,WARPS,STAGES] as a `gemv.GemvConfig` (block sizes powers
    of two from 16, a split of at least 1)."""
    gemv = _gemv()
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 5) or min(values) < 1 or any(b < 16 or b & (b - 1) for b in values[:2]):
        raise argparse.ArgumentTypeError(f"takes BN,BK,SPLIT[,WARPS,STAGES] with BN and BK powers of two from 16, "
                                         f"not {text!r}")
    return gemv.GemvConfig(*values)


def add_decode_arguments(p) -> None:
    """The flags that change how a decode step runs (the dispatcher's and the skinny kernel's settings): `bench.py
    generate` and `bench.py chain` take them; `apply_decode_settings` applies them."""
    p.add_argument("--moe-impl", default=None, choices=["xla", "pallas", "mosaic"],
                   help="force the MoE experts' path (xla: before the kernels; pallas: the Triton kernels; mosaic: "
                        "the Mosaic GPU grouped GEMM), attention unchanged")
    p.add_argument("--dense-impl", default=None, choices=["xla"],
                   help="run the decode-step projections through XLA (the path before the skinny kernel)")
    p.add_argument("--fused-projections", action="store_true",
                   help="q/k/v and gate/up in one skinny-kernel launch each, the norm inside (FUSED_PROJECTIONS)")
    p.add_argument("--fused-add-norm", action="store_true",
                   help="each output projection's partials, the post-block norm, the residual and the next norm in one "
                        "kernel where the projection takes the skinny kernel (FUSED_ADD_NORM)")
    p.add_argument("--gemv-max-weight", type=int, default=None, metavar="ELEMENTS",
                   help="the largest weight (K*N elements) a decode-step projection sends to the skinny kernel; "
                        "larger ones go to XLA, whatever the batch (dispatch.GEMV_MAX_WEIGHT and "
                        "GEMV_MAX_WEIGHT_BATCHED; default: the library's)")
    p.add_argument("--gemv-max-weight-batched", type=int, default=None, metavar="ELEMENTS",
                   help="the same for projections of 2 to 16 rows only, after --gemv-max-weight "
                        "(dispatch.GEMV_MAX_WEIGHT_BATCHED; default: the library's)")
    p.add_argument("--one-row-stream-rows", type=int, default=None, metavar="ROWS",
                   help="a one-sequence decode step runs its stream on this many copies of the sequence, attention "
                        "and the cache on one, in any model (dispatch.ONE_ROW_STREAM_ROWS and ONE_ROW_STREAM_ROWS_MOE; "
                        "default: the library's, 4 and for MoE models 1)")
    p.add_argument("--one-row-padded-max-weight", type=int, default=None, metavar="ELEMENTS",
                   help="one-row products XLA takes, of weights of at most this many elements, run on x padded to "
                        "16 rows, as XLA's GEMM (dispatch.ONE_ROW_PADDED_MAX_WEIGHT; default: the library's, 0: none)")
    p.add_argument("--gemv-min-weight", type=int, default=None, metavar="ELEMENTS",
                   help="the smallest weight (K*N elements) a decode-step projection sends to the skinny kernel; "
                        "smaller ones (26B-A4B's router: 360,448) go to XLA (dispatch.GEMV_MIN_WEIGHT; default: the "
                        "library's)")
    p.add_argument("--gemv-target-programs", type=int, default=None, metavar="N",
                   help="programs the skinny kernel aims for, narrowing its column tiles, then splitting K "
                        "(gemv.TARGET_PROGRAMS; default: the library's)")
    p.add_argument("--gemv-min-block-n", type=int, default=None, metavar="B",
                   help="the narrowest column tile the skinny kernel takes before it splits K (gemv.MIN_BLOCK_N; "
                        "default: the library's)")
    p.add_argument("--gemv-max-split-k", type=int, default=None, metavar="S",
                   help="the most K splits the skinny kernel takes (1: none; gemv.MAX_SPLIT_K; default: the "
                        "library's)")
    p.add_argument("--decode-kernel-min-batch", type=int, default=None, metavar="B",
                   help="the smallest batch whose decode attention takes the Pallas kernel under auto; smaller "
                        "ones take XLA (dispatch.DECODE_KERNEL_MIN_BATCH; default: the library's)")
    p.add_argument("--decode-kernel-max-keys", type=int, default=None, metavar="S",
                   help="below that batch, the most keys (cache slots) a decode call may read and still take the "
                        "kernel; 0: XLA for every such call (dispatch.DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS)")
    p.add_argument("--decode-target-programs", type=int, default=None, metavar="N",
                   help="programs the decode attention kernel aims for when it splits the keys; 1: no split and no "
                        "combining kernel (dispatch.DECODE_TARGET_PROGRAMS; default: the kernel's, 128)")
    p.add_argument("--output-projection-config", type=gemv_config, default=None, metavar="BN,BK,SPLIT[,WARPS,STAGES]",
                   help="the skinny kernel's blocks for each block's output projection at a decode step, e.g. "
                        "16,256,1 for 16-column tiles and no K split (dispatch.OUTPUT_PROJECTION_CONFIG; default: "
                        "the kernel's own rule)")
    p.add_argument("--decode-query-prologue", action=argparse.BooleanOptionalAction, default=None,
                   help="the decode kernel applies the queries' norm and RoPE itself; --no-decode-query-prologue: XLA "
                        "applies them first (dispatch.DECODE_QUERY_PROLOGUE; default: the library's, off)")
    p.add_argument("--decode-new-key", action=argparse.BooleanOptionalAction, default=None,
                   help="with the prologue on, the decode kernel also makes the step's key and value and writes them "
                        "into the cache in place; --no-decode-new-key: the queries alone (dispatch.DECODE_NEW_KEY; "
                        "default: the library's, on)")
    p.add_argument("--decode-prologue-partials", action=argparse.BooleanOptionalAction, default=None,
                   help="with the prologue on, the decode kernel adds the projections' float32 K splits itself; "
                        "--no-decode-prologue-partials: XLA adds them first and the kernel reads the summed rows "
                        "(dispatch.DECODE_PROLOGUE_PARTIALS; default: the library's, on)")
    p.add_argument("--l2-prefetch-bytes", type=int, default=None, metavar="BYTES",
                   help="at a decode step, once a layer's queries are projected, one kernel reads up to BYTES of the "
                        "weights the layer streams next into L2 (dispatch.L2_PREFETCH_BYTES; 0: off; default: the "
                        "library's, 24 MiB, in layers of at most dispatch.L2_PREFETCH_MAX_LAYER_BYTES)")
    p.add_argument("--l2-prefetch-next-bytes", type=int, default=None, metavar="BYTES",
                   help="a second L2 prefetch once a layer's MLP is done: up to BYTES of its per-layer-input weights "
                        "and the next layer's q/k/v projections (dispatch.L2_PREFETCH_NEXT_BYTES; default 0: off)")
    p.add_argument("--l2-prefetch-max-layer-bytes", type=int, default=None, metavar="BYTES",
                   help="only layers whose own weights come to at most BYTES prefetch (dispatch."
                        "L2_PREFETCH_MAX_LAYER_BYTES; default: the library's, 256 MiB, every layer of E2B and E4B)")
    p.add_argument("--l2-prefetch-programs", type=int, default=None, metavar="P",
                   help="the L2 prefetch kernel's programs (dispatch.L2_PREFETCH_PROGRAMS; default: the library's)")
    p.add_argument("--l2-prefetch-loads", type=int, default=None, metavar="N",
                   help="blocks each program of the L2 prefetch kernel has in flight at once "
                        "(dispatch.L2_PREFETCH_LOADS; default: the library's, 1)")
    from gemma4_jax.kernels.dispatch import L2_PREFETCH_ORDERS

    p.add_argument("--l2-prefetch-order", default=None, choices=L2_PREFETCH_ORDERS,
                   help="which weights the L2 prefetch's budget covers first (dispatch.L2_PREFETCH_ORDER; default: "
                        "the library's, stream: the order the layer reads them)")
    from gemma4_jax.kernels.l2_prefetch import EVICTIONS

    p.add_argument("--l2-prefetch-eviction", default=None, choices=EVICTIONS,
                   help="the L2 prefetch's eviction hint on its loads (dispatch.L2_PREFETCH_EVICTION; default: the "
                        "library's, evict_last)")
    p.add_argument("--moe-plan-kernel", action="store_true",
                   help="the Mosaic experts' tile plan as one kernel at few rows (dispatch.MOE_PLAN_KERNEL)")
    p.add_argument("--moe-token-tiles", type=int, default=None, metavar="TOKENS",
                   help="the Mosaic experts without a plan (a tile per chosen expert over every token) for calls of "
                        "at most this many tokens, 0: never (dispatch.MOE_TOKEN_TILES_MAX_TOKENS; default: the "
                        "library's)")
    p.add_argument("--dense-after-router", action=argparse.BooleanOptionalAction, default=None,
                   help="a MoE layer's dense MLP waits for the router's weights, so that it runs beside the experts "
                        "(dispatch.DENSE_AFTER_ROUTER; default: the library's, on)")
    p.add_argument("--gemv-sum-in-kernel", nargs="?", const="all", default=None, choices=("all", "norm"),
                   help="the skinny kernel adds its K splits itself, with no reduction kernel after it: in every "
                        "projection (all, the default of the flag) or in those a norm or a sum follows (norm) "
                        "(dispatch.GEMV_SUM_IN_KERNEL)")
    p.add_argument("--router-own-norm", action="store_true",
                   help="a MoE router normalises its own copy of the stream, not sharing XLA's merged reduction "
                        "(dispatch.ROUTER_OWN_NORM on)")
    p.add_argument("--router-kernel", action="store_true",
                   help="a MoE router's top-k at decode by the router kernel, not XLA's kernels "
                        "(dispatch.ROUTER_KERNEL on)")
    p.add_argument("--moe-mosaic-min-rows", type=int, default=None, metavar="ROWS",
                   help="routed rows from which `auto` takes the Mosaic experts (dispatch.MOSAIC_MOE_MIN_ROWS)")
    p.add_argument("--decode-scheduling", default=None, choices=["CONCURRENT", "LHS"],
                   help="XLA's command-buffer scheduling for the decode programs (programs.DECODE_SCHEDULING; "
                        "default: the library's)")
    p.add_argument("--decode-xla-option", action="append", default=None, metavar="NAME=VALUE", type=_xla_option,
                   help="an XLA option for the decode programs alone, e.g. xla_gpu_enable_triton_gemm=false "
                        "(programs.DECODE_XLA_OPTIONS; repeatable)")


def _xla_option(text: str) -> tuple[str, str | bool | int | float]:
    """NAME=VALUE as XLA takes it: true / false as a bool, a number as a number, anything else as text."""
    name, eq, value = text.partition("=")
    if not eq or not name.startswith("xla_"):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with an XLA option's name (xla_...), got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """The same random prompts on both sides (seeded by the batch size)."""
    return np.random.default_rng(batch).integers(3, vocab, size=(batch, length)).tolist()


def scheduling_check(model, prompts: list[list[int]], gen_len: int) -> dict:
    """Greedy tokens of one model under each decode scheduling, each twice (LHS, CONCURRENT, LHS, CONCURRENT, one
    process): whether each setting repeats itself and whether the two agree, and where they first part."""
    from gemma4_jax.generation import programs

    saved, runs = programs.DECODE_SCHEDULING, {}
    try:
        for mode in ("LHS", "CONCURRENT") * 2:
            programs.DECODE_SCHEDULING = mode
            out = np.asarray(model.generate(prompts, max_new_tokens=gen_len, stop_tokens=()), np.int32)
            runs.setdefault(mode, []).append(out)
    finally:
        programs.DECODE_SCHEDULING = saved
    lhs, conc = runs["LHS"][0], runs["CONCURRENT"][0]
    differ = np.nonzero((lhs != conc).any(axis=0))[0]
    return {"lhs_repeats": bool((runs["LHS"][0] == runs["LHS"][1]).all()),
            "concurrent_repeats": bool((runs["CONCURRENT"][0] == runs["CONCURRENT"][1]).all()),
            "modes_agree": bool((lhs == conc).all()), "first_differing_step": int(differ[0]) if differ.size else None,
            "sequences_differing": int((lhs != conc).any(axis=1).sum()), "tokens_equal": float((lhs == conc).mean())}


def short_len(prompt_len: int, gen_len: int, context: int) -> int:
    """The shortest generation from `gen_len // 2 + 1` on that runs the same compiled programs as `gen_len`
    (output bucket and cache length), so that the difference of the two is decode steps only."""
    from gemma4_jax.generation.loop import bucket

    def key(n):
        return bucket(n, 8), min(bucket(prompt_len + n), context)

    n = gen_len // 2 + 1
    while n < gen_len and key(n) != key(gen_len):
        n += 1
    if n >= gen_len:
        raise SystemExit(f"--gen-len {gen_len}: no shorter generation shares its compiled programs "
                         f"(use a power of two ≥ 4)")
    return n


def step_bytes(cfg, batch: int, context: int, itemsize: int = 2) -> int:
    """Bytes one decode step must read: the weights it uses and the KV cache up to `context`."""
    from gemma4_jax.model.text import abstract_model, count_params

    total = count_params(abstract_model(cfg))
    if cfg.ple_dim:  # the per-layer table is gathered (B rows), not read whole
        total -= cfg.ple_vocab_size * cfg.num_layers * cfg.ple_dim
    moe_layers = sum(1 for s in cfg.layers if s.moe)
    if moe_layers:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        total -= moe_layers * per_expert * (cfg.num_experts - min(cfg.num_experts, cfg.top_k_experts * batch))
    kv = 0
    for s in cfg.layers:
        if s.owns_kv:
            length = min(s.window, context) if s.window else context
            kv += 2 * length * s.num_kv_heads * s.head_dim
    return (total + batch * kv) * itemsize


def prefill_flops(cfg, batch: int, tokens: int) -> float:
    """2·(active params)·tokens + attention (4·N·H·T²/2 per full-causal layer, window-limited on sliding)."""
    from gemma4_jax.model.text import abstract_model, count_params

    active = count_params(abstract_model(cfg)) - (cfg.ple_vocab_size * cfg.num_layers * cfg.ple_dim)
    moe_layers = sum(1 for s in cfg.layers if s.moe)
    if moe_layers:
        active -= moe_layers * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.num_experts - cfg.top_k_experts)
    flops = 2.0 * active * batch * tokens
    for s in cfg.layers:
        keys = min(s.window, tokens) if s.window else tokens / 2
        flops += 4.0 * cfg.num_heads * s.head_dim * tokens * keys * batch
    return flops


def _config(args):
    from gemma4_jax.config import Gemma4Config, preset

    return Gemma4Config.from_json(args.config) if args.config else preset(args.preset)


def hlo_dump_flags(profile_dir: str) -> list[str]:
    """XLA flags that dump the decode programs' optimised HLO as text into profile_dir/hlo (`--profile-hlo`)."""
    return [f"--xla_dump_to={os.path.join(profile_dir, 'hlo')}", "--xla_dump_hlo_as_text",
            "--xla_dump_hlo_module_re=decode_chunk"]


def _header(args, cfg) -> dict:
    dtype = getattr(args, "dtype", "bfloat16")
    if dtype != "bfloat16" and args.pp > 1:
        raise SystemExit(f"bench.py generate: --dtype {dtype} runs at --pp 1 only (the bench's pipeline is bfloat16).")
    if getattr(args, "float32_merged", False) and dtype != "float32":
        raise SystemExit("bench.py generate: --float32-merged needs --dtype float32 (other dtypes are merged anyway).")
    return {"preset": args.config or args.preset, "pp": args.pp, "dtype": dtype,
            "float32_merged": getattr(args, "float32_merged", False), "batches": _ints(args.batch),
            "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "short_len": short_len(args.prompt_len, args.gen_len, cfg.max_position_embeddings),
            "prefill_len": args.prefill_len, "repeat": args.repeat, "date": time.strftime("%Y-%m-%d"),
            "moe_impl": getattr(args, "moe_impl", None) or args.attn_impl,
            "dense_impl": getattr(args, "dense_impl", None) or args.attn_impl,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compile_cache": getattr(args, "compile_cache", None),
            "fused_projections": getattr(args, "fused_projections", False),
            "fused_add_norm": getattr(args, "fused_add_norm", False),
            "moe_plan_kernel": getattr(args, "moe_plan_kernel", False),
            "router_kernel": getattr(args, "router_kernel", False),
            "router_own_norm": getattr(args, "router_own_norm", False),
            "gemv_sum_in_kernel": getattr(args, "gemv_sum_in_kernel", None) or False,
            "moe_mosaic_min_rows": getattr(args, "moe_mosaic_min_rows", None) or _dispatch().MOSAIC_MOE_MIN_ROWS,
            **{name.lower(): value for name, value in _weight_limits(args, _dispatch()).items()},
            **{key: _given(args, flag, getattr(_dispatch(), name)) for flag, name, key in GIVEN_SETTINGS},
            "gemv_target_programs": getattr(args, "gemv_target_programs", None) or _gemv().TARGET_PROGRAMS,
            "gemv_min_block_n": getattr(args, "gemv_min_block_n", None) or _gemv().MIN_BLOCK_N,
            "gemv_max_split_k": getattr(args, "gemv_max_split_k", None) or _gemv().MAX_SPLIT_K,
            "decode_kernel_min_batch": getattr(args, "decode_kernel_min_batch", None)
            or _dispatch().DECODE_KERNEL_MIN_BATCH,
            "one_row_stream_rows": getattr(args, "one_row_stream_rows", None) or _dispatch().stream_rows(
                1, cfg.num_experts > 0),
            "decode_target_programs": getattr(args, "decode_target_programs", None)
            or _dispatch().DECODE_TARGET_PROGRAMS,
            "output_projection_config": repr(getattr(args, "output_projection_config", None)
                                             or _dispatch().OUTPUT_PROJECTION_CONFIG),
            "l2_prefetch_max_layer_bytes": getattr(args, "l2_prefetch_max_layer_bytes", None)
            or _dispatch().L2_PREFETCH_MAX_LAYER_BYTES,
            "l2_prefetch_programs": getattr(args, "l2_prefetch_programs", None) or _dispatch().L2_PREFETCH_PROGRAMS,
            "l2_prefetch_loads": getattr(args, "l2_prefetch_loads", None) or _dispatch().L2_PREFETCH_LOADS,
            "l2_prefetch_order": getattr(args, "l2_prefetch_order", None) or _dispatch().L2_PREFETCH_ORDER,
            "l2_prefetch_eviction": getattr(args, "l2_prefetch_eviction", None) or _dispatch().L2_PREFETCH_EVICTION,
            "decode_scheduling": getattr(args, "decode_scheduling", None) or _programs().DECODE_SCHEDULING,
            "decode_xla_options": dict(getattr(args, "decode_xla_option", None) or _programs().DECODE_XLA_OPTIONS)}


# Flags that set a dispatcher setting whenever given, 0 and False included (not given: the library's stands):
# (the flag's dest, `dispatch`'s name, the JSON header's key).
GIVEN_SETTINGS = (
    ("dense_after_router", "DENSE_AFTER_ROUTER", "dense_after_router"),
    ("moe_token_tiles", "MOE_TOKEN_TILES_MAX_TOKENS", "moe_token_tiles_max_tokens"),
    ("decode_kernel_max_keys", "DECODE_KERNEL_ONE_SEQUENCE_MAX_KEYS", "decode_kernel_max_keys"),
    ("decode_query_prologue", "DECODE_QUERY_PROLOGUE", "decode_query_prologue"),
    ("decode_new_key", "DECODE_NEW_KEY", "decode_new_key"),
    ("decode_prologue_partials", "DECODE_PROLOGUE_PARTIALS", "decode_prologue_partials"),
    ("l2_prefetch_bytes", "L2_PREFETCH_BYTES", "l2_prefetch_bytes"),
    ("l2_prefetch_next_bytes", "L2_PREFETCH_NEXT_BYTES", "l2_prefetch_next_bytes"),
)


def _given(args, flag: str, default):
    """The flag's value where it was given (0 and False included), else `default`."""
    value = getattr(args, flag, None)
    return default if value is None else value


def _weight_limits(args, dispatch) -> dict:
    """The dispatcher's weight limits under the flags (`dispatch`'s attribute names): a flag given, 0 included
    (no weight on the kernel, none padded), or the library's; --gemv-max-weight sets both maximums."""
    most = _given(args, "gemv_max_weight", None)
    return {"GEMV_MAX_WEIGHT": _given(args, "gemv_max_weight", dispatch.GEMV_MAX_WEIGHT),
            "GEMV_MAX_WEIGHT_BATCHED": _given(args, "gemv_max_weight_batched",
                                              dispatch.GEMV_MAX_WEIGHT_BATCHED if most is None else most),
            "GEMV_MIN_WEIGHT": _given(args, "gemv_min_weight", dispatch.GEMV_MIN_WEIGHT),
            "ONE_ROW_PADDED_MAX_WEIGHT": _given(args, "one_row_padded_max_weight", dispatch.ONE_ROW_PADDED_MAX_WEIGHT)}


def apply_decode_settings(args) -> None:
    """Set the dispatcher's, the skinny kernel's and the decode programs' module settings from
    `add_decode_arguments`' flags (those not given keep the library's)."""
    dispatch = _dispatch()
    dispatch.MOE_FORCE = getattr(args, "moe_impl", None)
    dispatch.DENSE_FORCE = getattr(args, "dense_impl", None)
    dispatch.FUSED_PROJECTIONS = getattr(args, "fused_projections", False)
    dispatch.FUSED_ADD_NORM = getattr(args, "fused_add_norm", False)
    dispatch.MOE_PLAN_KERNEL = getattr(args, "moe_plan_kernel", False)
    dispatch.ROUTER_KERNEL = getattr(args, "router_kernel", False)
    dispatch.ROUTER_OWN_NORM = getattr(args, "router_own_norm", False)
    dispatch.GEMV_SUM_IN_KERNEL = {None: False, "all": True, "norm": "norm"}[getattr(args, "gemv_sum_in_kernel", None)]
    dispatch.numerics.FLOAT32_APART = not getattr(args, "float32_merged", False)
    if getattr(args, "moe_mosaic_min_rows", None):
        dispatch.MOSAIC_MOE_MIN_ROWS = args.moe_mosaic_min_rows
    for name, value in _weight_limits(args, dispatch).items():
        setattr(dispatch, name, value)
    for flag, name, _ in GIVEN_SETTINGS:
        setattr(dispatch, name, _given(args, flag, getattr(dispatch, name)))
    for flag, name in (("gemv_target_programs", "TARGET_PROGRAMS"), ("gemv_min_block_n", "MIN_BLOCK_N"),
                       ("gemv_max_split_k", "MAX_SPLIT_K")):
        if getattr(args, flag, None):
            setattr(_gemv(), name, getattr(args, flag))
    if getattr(args, "decode_kernel_min_batch", None):
        dispatch.DECODE_KERNEL_MIN_BATCH = args.decode_kernel_min_batch
    if getattr(args, "decode_target_programs", None):
        dispatch.DECODE_TARGET_PROGRAMS = args.decode_target_programs
    if getattr(args, "output_projection_config", None):
        dispatch.OUTPUT_PROJECTION_CONFIG = args.output_projection_config
    if getattr(args, "l2_prefetch_max_layer_bytes", None):
        dispatch.L2_PREFETCH_MAX_LAYER_BYTES = args.l2_prefetch_max_layer_bytes
    if getattr(args, "l2_prefetch_programs", None):
        dispatch.L2_PREFETCH_PROGRAMS = args.l2_prefetch_programs
    if getattr(args, "l2_prefetch_loads", None):
        dispatch.L2_PREFETCH_LOADS = args.l2_prefetch_loads
    if getattr(args, "l2_prefetch_order", None):
        dispatch.L2_PREFETCH_ORDER = args.l2_prefetch_order
    if getattr(args, "l2_prefetch_eviction", None):
        dispatch.L2_PREFETCH_EVICTION = args.l2_prefetch_eviction
    if getattr(args, "one_row_stream_rows", None):  # for every model, MoE or not
        dispatch.ONE_ROW_STREAM_ROWS = dispatch.ONE_ROW_STREAM_ROWS_MOE = args.one_row_stream_rows
    if getattr(args, "decode_scheduling", None):
        _programs().DECODE_SCHEDULING = args.decode_scheduling
    if getattr(args, "decode_xla_option", None):
        _programs().DECODE_XLA_OPTIONS = dict(args.decode_xla_option)


def _dispatch():
    from gemma4_jax.kernels import dispatch

    return dispatch


def _gemv():
    from gemma4_jax.kernels import gemv

    return gemv


def _programs():
    from gemma4_jax.generation import programs

    return programs


def run(args) -> dict:
    start = time.time()
    if getattr(args, "profile_hlo", False):  # before jax starts its backend, which reads XLA_FLAGS once
        if not args.profile:
            raise SystemExit("bench.py generate: --profile-hlo needs --profile DIR (the dump goes into DIR/hlo).")
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *hlo_dump_flags(args.profile)]).strip()
    _header(args, _config(args))  # bad arguments fail here, before any device work
    _use_compile_cache(args)
    if args.compare == "none":
        res = ours(args, start)
    else:
        # JAX gives freed device memory back only when its process ends: our model is measured in a child
        # process, so that the device is empty when transformers' model is built.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                res = pool.submit(ours, args, start).result()
            except Exception as e:  # the child raised or died: keep what its JSON file holds
                traceback.print_exception(e)
                res = _header(args, _config(args))
                if args.json and os.path.exists(args.json):
                    with open(args.json) as f:
                        res = json.load(f)
                res["error"] = repr(e)
        _transformers(args, res, Progress(res, args.json, start))
    print(json.dumps(res, indent=1), flush=True)
    return res


def _use_compile_cache(args) -> None:
    """`--compile-cache DIR` for this process (the CLI's `use_compile_cache`); a folder that cannot be written is one
    sentence."""
    from gemma4_jax.cli import ConfigError, use_compile_cache

    try:
        use_compile_cache(getattr(args, "compile_cache", None))
    except ConfigError as e:
        raise SystemExit(f"bench.py generate: {e}.") from None


def ours(args, start: float) -> dict:
    """Our model at every batch size (see the module docstring); the results, also in the JSON file."""
    from gemma4_jax.generation.cache import init_cache
    from gemma4_jax.generation.loop import DECODE_CHUNK, bucket, prefill

    cfg = _config(args)
    _use_compile_cache(args)  # again: with --compare this runs in a child process of its own
    dev = jax.devices()[0]
    apply_decode_settings(args)
    res = _header(args, cfg)
    dtype = jnp.dtype(res["dtype"])
    res.update(card=dev.device_kind, jax=jax.__version__, results={})
    progress = Progress(res, args.json, start)
    res["hbm_gb_s"] = (bw := copy_bandwidth(args.hbm_gib)) / 1e9
    res["hbm_read_gb_s"] = (read_bw := read_bandwidth(2 * args.hbm_gib)) / 1e9
    res["hbm_matvec_gb_s"] = (mv_bw := matvec_bandwidth(2 * args.hbm_gib)) / 1e9
    device_bw = device_bandwidths(2 * args.hbm_gib)
    res["hbm_device_gb_s"] = {name: v / 1e9 for name, v in device_bw.items()}
    best_bw = max(bw, read_bw, mv_bw, *device_bw.values())
    res["hbm_best_gb_s"] = best_bw / 1e9
    progress("hbm_bandwidth")

    t0 = time.perf_counter()
    model = random_model(cfg, args.attn_impl, args.pp, dtype.name)
    res["weight_dtypes"] = sorted({str(w.dtype) for w in jax.block_until_ready(weight_arrays(model))})
    res["random_init_s"] = time.perf_counter() - t0
    progress("random_init")

    if getattr(args, "check_scheduling", False):
        res["scheduling_check"] = {str(b): scheduling_check(model, _prompts(cfg.vocab_size, b, args.prompt_len),
                                                            args.gen_len) for b in res["batches"]}
        progress("scheduling_check")
        return res

    # MFU against bf16's peak only (a float32 model's is not a tensor-core figure: no MFU)
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None) if dtype == jnp.bfloat16 else None
    context = model.context

    def prefill_times(prompts: list[list[int]], max_len: int, calls: int) -> list[float]:
        """Seconds of `calls` prefills of `prompts` (a fresh cache of `max_len` each: it is donated)."""
        if model.pipeline is not None:  # no separate prefill: a 1-token generation
            def one_token() -> None:
                model.generate(prompts, max_new_tokens=1, stop_tokens=())

            return [seconds_once(one_token) for _ in range(calls)]
        b, t = len(prompts), len(prompts[0])
        ids = np.zeros((b, min(bucket(t), context)), np.int32)  # padded as generate pads
        ids[:, :t] = prompts
        ids, lengths = jnp.asarray(ids), jnp.asarray([t] * b, jnp.int32)
        times = []
        for _ in range(calls):
            cache = jax.block_until_ready(init_cache(cfg, b, max_len, dtype))
            t0 = time.perf_counter()
            jax.block_until_ready(prefill(model.graphdef, model.state, ids, lengths, cache, impl=model.run.attn_impl,
                                          mm=None))  # as generate calls it: the same compiled program
            times.append(time.perf_counter() - t0)
        return times

    def memory(entry: dict) -> None:
        stats = dev.memory_stats() or {}
        entry["peak_device_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
        entry["device_gib_in_use"] = stats.get("bytes_in_use", 0) / 2**30

    def measure(b: int, entry: dict):
        prompts = _prompts(cfg.vocab_size, b, args.prompt_len)

        def gen(n, keep: list | None = None) -> None:  # no result to block on: the timer's wait is then free
            out = model.generate(prompts, max_new_tokens=n, stop_tokens=())
            if keep is not None:
                keep.append(out)

        first: list = []
        entry["first_run_s"] = seconds_once(lambda: gen(args.gen_len, first))  # compiles prefill and the decode loop
        # the greedy tokens' digest: runs of one model under other settings (scheduling, kernels) compare by it
        entry["tokens_sha1"] = hashlib.sha1(np.asarray(first[0], np.int32).tobytes()).hexdigest()
        progress(f"b{b}_compile_and_first_run")
        t_long, decode = best_generation(model, prompts, args.gen_len, args.repeat)
        again: list = []  # the same generation once more in this process: its tokens bit for bit, or not
        gen(args.gen_len, again)
        entry["tokens_same_in_process"] = bool(np.array_equal(np.asarray(first[0]), np.asarray(again[0])))
        decode /= args.gen_len - 1
        floor = step_bytes(cfg, b, args.prompt_len + args.gen_len // 2, dtype.itemsize) / bw
        entry.update(compile_s=entry["first_run_s"] - t_long, generate_s={str(args.gen_len): t_long},
                     decode_ms_per_token=decode * 1e3, decode_tokens_s=b / decode,
                     roofline_ms_per_token=floor * 1e3, decode_vs_roofline=decode / floor,
                     read_roofline_ms_per_token=floor * bw / read_bw * 1e3,
                     decode_vs_read_roofline=decode / (floor * bw / read_bw),
                     best_roofline_ms_per_token=floor * bw / best_bw * 1e3,
                     decode_vs_best_roofline=decode / (floor * bw / best_bw))
        memory(entry)
        progress(f"b{b}_decode")
        max_len = min(bucket(args.prompt_len + args.gen_len), context)  # generate's cache: nothing new compiles
        pre = min(prefill_times(prompts, max_len, args.repeat + (1 if model.pipeline is not None else 0)))
        mfu = prefill_flops(cfg, b, args.prompt_len) / pre / peak if peak else None
        entry.update(prefill_ms=pre * 1e3, prefill_mfu=mfu)
        memory(entry)
        progress(f"b{b}_prefill")
        return gen

    extras_done = False
    for b in res["batches"]:
        entry = res["results"][str(b)] = {}
        if args.deadline and time.time() - start > 0.6 * args.deadline:
            entry["skipped"] = f"--deadline {args.deadline:g} s: our side's share was spent"
            progress(f"b{b}_skipped")
            continue
        try:
            gen = measure(b, entry)
        except Exception as e:  # out of memory, most likely: keep the other batches
            traceback.print_exc()
            entry["error"] = repr(e)
            progress(f"b{b}_error")
            continue
        res.setdefault("load_to_first_run_s", res["random_init_s"] + entry["first_run_s"])
        if extras_done:
            continue
        extras_done = True  # after the first batch measured
        if args.prefill_len > 0:
            n = args.prefill_len
            long = res["long_prefill"] = {"batch": 1, "tokens": n}
            try:
                first, *rest = prefill_times(_prompts(cfg.vocab_size, 1, n), n, 1 + args.repeat)
                best = min(rest)
                long.update(compile_s=first - best, ms=best * 1e3, tokens_s=n / best,
                            mfu=prefill_flops(cfg, 1, n) / best / peak if peak else None)
                memory(long)
            except Exception as e:
                traceback.print_exc()
                long["error"] = repr(e)
            progress("long_prefill")
        if args.profile:
            # Two traces: a 1-token generation (prefill and the first token) and one with two decode chunks more;
            # their difference over the steps is one decode step's kernels, busy and idle time, by op class.
            steps = 2 * DECODE_CHUNK
            for name, n in (("one", 1), ("gen", 1 + steps)):
                with device_trace(os.path.join(args.profile, name)):
                    gen(n)
            res["profile"] = {"dir": args.profile, "batch": b, "new_tokens": 1 + steps}
            try:  # the busiest kernels, so that the JSON carries the evidence without the trace
                import trace_summary as ts

                paths = {k: ts.newest_trace(os.path.join(args.profile, k)) for k in ("one", "gen")}
                top = getattr(args, "profile_top", 30)
                raw = {k: ts.read_trace(p) for k, p in paths.items()}  # each trace read once
                one = ts.summarise(paths["one"], events=raw["one"])
                res["profile"].update(ts.summarise(paths["gen"], top, raw["gen"]))
                step = res["profile"]["decode_step"] = ts.per_step(res["profile"], one, steps)
                anchor = getattr(args, "profile_anchor", "moe")
                between = step["between_anchors"] = ts.per_step_gaps(
                    *(ts.gaps(ts.device_events(raw[k]), anchor) for k in ("gen", "one")), steps, top)
                names = {k["name"] for k in res["profile"]["kernels"]}
                names |= {k["name"] for g in between.values() for k in g["kernels"]}
                res["profile"]["kernel_args"] = ts.first_args(raw["gen"], names)
                if getattr(args, "profile_hlo", False):  # the dump holds the decode program alone
                    res["profile"]["hlo_annotated"] = ts.annotate_from_dump(
                        res["profile"]["kernels"], raw["gen"], os.path.join(args.profile, "hlo"))
            except Exception as e:
                res["profile"]["summary_error"] = repr(e)
            progress("profile")
    return res


class _CudagraphMessages(logging.Handler):
    """Keeps the messages of the log records it sees that speak of CUDA graphs."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        if "cudagraph" in (message := record.getMessage()):
            self.messages.append(message)


def _compile_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "graphs_compiled": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


class CudagraphWatch:
    """What torch.compile did while a block ran: the CUDA graphs it skipped (`cudagraph_skips`, with the reasons it
    logged on CUDA, `cudagraph_skip_reasons`; a CPU counts skips silently), the graphs dynamo compiled
    (`graphs_compiled`) and its graph breaks (`graph_breaks`). A `reduce-overhead` decode step that is not graphed
    launches every kernel from the host, so a comparison with it is only fair where `cudagraph_skips` is 0."""

    # where inductor logs a skip: its artifact logger "cudagraphs" (torch 2.11, 2.13) or "perf_hints" (older) of this
    # module, whose records reach this one
    LOGGER = "torch._inductor.cudagraph_utils"

    def __enter__(self):
        self._messages = _CudagraphMessages()
        logging.getLogger(self.LOGGER).addHandler(self._messages)
        self._before = _compile_counts()
        return self

    def __exit__(self, *exc):
        logging.getLogger(self.LOGGER).removeHandler(self._messages)
        self.counts = {k: v - self._before[k] for k, v in _compile_counts().items()}
        return False

    def result(self) -> dict:
        return {**self.counts, "cudagraph_skip_reasons": sorted(set(self._messages.messages))[:8]}


def _transformers(args, res: dict, progress: Progress) -> None:
    """The same shapes through transformers' Gemma4ForCausalLM (in --dtype, built once): eager, and static cache +
    compile for `--compile-batches`; into `res["transformers"]`. float32 without TF32, as ours runs it."""
    with torch_full_float32():
        _transformers_runs(args, res, progress)


def _transformers_runs(args, res: dict, progress: Progress) -> None:
    import gc

    import torch
    import transformers
    from transformers import CompileConfig, Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_jax.config import PRESETS

    raw = PRESETS[args.preset.lower()] if not args.config else json.load(open(args.config))
    raw = raw.get("text_config", raw)
    vocab = raw["vocab_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = res["transformers"] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 "torch": torch.__version__, "transformers": transformers.__version__}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    try:
        # in --dtype from the start (bf16 by default: a 31B model in float32 would not fit)
        dtype = getattr(torch, getattr(args, "dtype", "bfloat16"))
        with torch.device(device):
            config = Gemma4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
            model = Gemma4ForCausalLM._from_config(config, dtype=dtype).eval()
        sync()
    except Exception as e:
        traceback.print_exc()
        out["error"] = repr(e)
        progress("transformers_error")
        return
    out["random_init_s"] = time.perf_counter() - t0
    out["dtype"] = str(model.dtype)
    progress("transformers_random_init")

    # transformers compiles the decode step itself when the cache is static (on CUDA; on a CPU, when told to).
    compiled = CompileConfig(mode="reduce-overhead")
    if device == "cpu":
        compiled._compile_all_devices = True
    modes = {"eager": {"disable_compile": True},
             "static_compiled": {"cache_implementation": "static", "compile_config": compiled,
                                 "max_cache_len": args.prompt_len + args.gen_len}}  # one cache size: no recompile
    compile_batches = set(_ints(args.compile_batches))

    class Clock:
        """A generate() streamer that only notes when each step's tokens arrive (put: the prompt, then every
        new token; end): decode = last − second arrival, timed directly, never negative."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            sync()
            self.times.append(time.perf_counter())

    def generator(ids, kw):
        def gen(n, clock=None):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, **kw)
            sync()
        return gen

    for b in _ints(args.batch):
        entry = out[str(b)] = {}
        ids = torch.tensor(_prompts(vocab, b, args.prompt_len), device=device)
        for name in ("eager", "static_compiled") if b in compile_batches else ("eager",):
            gen = generator(ids, modes[name])
            m = entry[name] = {}
            if args.deadline and time.time() - progress.start > args.deadline:
                m["skipped"] = f"--deadline {args.deadline:g} s reached"
                progress(f"transformers_b{b}_{name}_skipped")
                continue
            with CudagraphWatch() as watch:
                try:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    m["first_run_s"] = seconds_once(lambda gen=gen: gen(min(8, args.gen_len)))  # warm-up (compiles)
                    clock = Clock()
                    t_long = seconds_once(lambda gen=gen, clock=clock: gen(args.gen_len, clock))
                    prefill = seconds_once(lambda gen=gen: gen(1))
                    decode = (clock.times[-1] - clock.times[1]) / (args.gen_len - 1)
                    m.update(prefill_ms=prefill * 1e3, decode_ms_per_token=decode * 1e3, decode_tokens_s=b / decode,
                             generate_s={str(args.gen_len): t_long})
                    short = args.gen_len // 2 + 1
                    if args.gen_len > short:  # the clock's check: no streamer, no copy to the host a token
                        plain = {n: seconds_once(lambda gen=gen, n=n: gen(n)) for n in (args.gen_len, short)}
                        m["generate_s"].update({f"{n}_without_streamer": t for n, t in plain.items()})
                        step = (plain[args.gen_len] - plain[short]) / (args.gen_len - short)
                        m["decode_ms_per_token_without_streamer"] = step * 1e3
                        # what a whole generation carries beyond its 1-token generation and its marginal steps (a
                        # CUDA graph recorded again each generation would show here, not in the marginal step)
                        m["generation_overhead_s"] = plain[args.gen_len] - prefill - (args.gen_len - 1) * step
                    if device == "cuda":
                        m["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
                except Exception as e:
                    traceback.print_exc()
                    m["error"] = repr(e)
            m["torch_compile"] = watch.result()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            progress(f"transformers_b{b}_{name}")
    if args.prefill_len > 0 and not (args.deadline and time.time() - progress.start > args.deadline):
        n = args.prefill_len
        gen = generator(torch.tensor(_prompts(vocab, 1, n), device=device), modes["eager"])
        long = out["long_prefill"] = {"batch": 1, "tokens": n}
        try:
            gen(1)
            long["ms"] = seconds_once(lambda: gen(1)) * 1e3
        except Exception as e:
            traceback.print_exc()
            long["error"] = repr(e)
        progress("transformers_long_prefill")
