"""`bench.py generate`: end-to-end generation speed on random real-shape weights, beside transformers.

    PYTHONPATH=. python tools/bench.py generate --preset e4b --batch 1 --prompt-len 128 --gen-len 128 \
        [--pp N] [--compare transformers] [--json out.json]

Reports, for our model: time from nothing to the first token (random weights built on the device,
compile, prefill), compile time, prefill ms and % MFU, decode ms/token and tokens/s, the HBM roofline
(bytes a decode step must read — weights, only the routed experts' share for MoE, plus the KV cache —
over the bandwidth measured in the same process with a large copy) and peak device memory. Prefill is
timed as a 1-token generation; decode as the difference between a `gen-len`- and a 1-token run, both
compiled beforehand. `--compare transformers` runs the same shapes through transformers' Gemma 4 in the
same process: eager, and with a static cache under `torch.compile`.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 tensor-core peak (FLOP/s) by device kind, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generation speed on random real-shape weights (+ transformers)")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json instead of --preset (smoke tests)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--compare", default="none", choices=["none", "transformers"])
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def hbm_bandwidth() -> float:
    """Bytes/s of a 2 GiB bf16 `x + 1` (read + write), best of 5."""
    x = jnp.zeros((1 << 30,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    return 2 * x.nbytes / _timed(lambda: f(x).block_until_ready(), 5)


def step_bytes(cfg, batch: int, context: int, itemsize: int = 2) -> int:
    """Bytes one decode step must read: the weights it uses and the KV cache up to `context`."""
    from gemma4_jax.model import abstract_model, count_params

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
    from gemma4_jax.model import abstract_model, count_params

    active = count_params(abstract_model(cfg)) - (cfg.ple_vocab_size * cfg.num_layers * cfg.ple_dim)
    moe_layers = sum(1 for s in cfg.layers if s.moe)
    if moe_layers:
        active -= moe_layers * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.num_experts - cfg.top_k_experts)
    flops = 2.0 * active * batch * tokens
    for s in cfg.layers:
        keys = min(s.window, tokens) if s.window else tokens / 2
        flops += 4.0 * cfg.num_heads * s.head_dim * tokens * keys * batch
    return flops


def run(args) -> dict:
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.config import Gemma4Config, preset
    from gemma4_jax.synthetic import random_model

    cfg = Gemma4Config.from_json(args.config) if args.config else preset(args.preset)
    dev = jax.devices()[0]
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    res = {"preset": args.config or args.preset, "card": dev.device_kind, "jax": jax.__version__, "pp": args.pp,
           "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
           "date": time.strftime("%Y-%m-%d")}
    bw = hbm_bandwidth()
    res["hbm_gb_s"] = bw / 1e9

    t0 = time.perf_counter()
    module = random_model(cfg, jnp.bfloat16)
    if args.pp > 1:
        from gemma4_jax.hf_checkpoint import iter_params
        from gemma4_jax.pipeline import Pipeline, best_stages, stage_leaves_from_params

        params = {p: np.asarray(v.get_value()) for p, v in iter_params(module)}
        del module
        stages = best_stages(cfg, args.pp, 2)
        pipe = Pipeline(cfg, stages, stage_leaves_from_params(cfg, stages, params), jnp.bfloat16, args.attn_impl)
        model = Gemma4Model(None, RunConfig("bfloat16", args.pp, None, args.attn_impl), pipeline=pipe)
    else:
        model = Gemma4Model(module, RunConfig("bfloat16", 1, None, args.attn_impl))

    def gen(n):
        return model.generate(prompts, max_new_tokens=n, stop_tokens=())

    jax.block_until_ready(jax.tree.leaves(model.state if model.pipeline is None else model.pipeline.params))
    res["random_init_s"] = time.perf_counter() - t0
    first = _timed(lambda: gen(1))  # compiles prefill and the decode loop
    res["load_to_first_token_s"] = res["random_init_s"] + first
    gen(args.gen_len)  # a pipeline compiles its ring per length
    prefill = _timed(lambda: gen(1), 3)
    full = _timed(lambda: gen(args.gen_len), 3)
    res["compile_s"] = first - prefill
    decode = (full - prefill) / (args.gen_len - 1)
    res["prefill_ms"] = prefill * 1e3
    res["decode_ms_per_token"] = decode * 1e3
    res["decode_tokens_s"] = args.batch / decode
    floor = step_bytes(cfg, args.batch, args.prompt_len + args.gen_len // 2) / bw
    res["roofline_ms_per_token"] = floor * 1e3
    res["decode_vs_roofline"] = decode / floor
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
    res["prefill_mfu"] = prefill_flops(cfg, args.batch, args.prompt_len) / prefill / peak if peak else None
    res["peak_device_gib"] = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    print(json.dumps(res), flush=True)
    if args.compare == "transformers":
        del model
        res["transformers"] = _transformers(cfg, args, prompts)
        print(json.dumps(res["transformers"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _transformers(cfg, args, prompts) -> dict:
    """The same shapes through transformers' Gemma4ForCausalLM (bf16): eager, then static cache + compile."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_jax.config import PRESETS

    raw = PRESETS[args.preset] if not args.config else json.load(open(args.config))
    raw = raw.get("text_config", raw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Gemma4ForCausalLM(Gemma4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"}))
    model = model.to(torch.bfloat16).eval()
    ids = torch.tensor(prompts, device=device)
    out = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for name, kw in (("eager", {}), ("static_compiled", {"cache_implementation": "static"})):
        if name == "static_compiled":
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)

        def gen(n, kw=kw):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            sync()

        t = time.perf_counter()
        gen(args.gen_len)
        warm = time.perf_counter() - t
        prefill = _timed(lambda gen=gen: gen(1), 2)
        full = _timed(lambda gen=gen: gen(args.gen_len), 2)
        decode = (full - prefill) / (args.gen_len - 1)
        out[name] = {"first_run_s": warm, "prefill_ms": prefill * 1e3, "decode_ms_per_token": decode * 1e3,
                     "decode_tokens_s": args.batch / decode}
    return out
