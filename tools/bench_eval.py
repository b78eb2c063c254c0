"""`bench.py eval`: GSM8K at serving speed — continuous batching with a shared few-shot prefix against static
batches, on random weights at a preset's real shapes.

    PYTHONPATH=. python tools/bench.py eval --preset e4b --questions 1319 --shots 8 --slots 64 --json out.json

The prompts are the eval script's (`evals.gsm8k.prompt_ids`: the chat format, `--shots` worked examples from the
train file), encoded by the demo model's tokenizer (its ids are valid in every Gemma 4 vocabulary; random weights
do not care which text they see). Random weights never stop early, so each question gets its own token limit: the
token length of its reference solution in the GSM8K file (at most `--max-new-tokens`), the same in both modes.

- static: batches of `--slots` questions in file order, each batch generating up to its longest limit (what
  `tools/eval_gsm8k.py` does without `--engine`); each answer cut at its own limit.
- engine: `Gemma4Model.generate_continuous` with `--slots` slots and the shared prefix.

Reported: wall seconds and questions/s of each (compiles included, as a user's run has them: `--warm` runs a
few questions of each mode first, so their programs are compiled before the timed run), the seconds JAX spent
tracing, lowering and compiling inside each mode (`compile_s`, from `jax.monitoring`) and the questions/s without
them (`questions_s_compiled`: what a second run in the same process, or one whose programs come from the
persistent cache, would get), the prompt tokens
computed with and without the shared prefix, and how many answers (and first tokens) the two modes share. In
bf16 on random weights the logits are nearly flat, so the two modes' different roundings (one prefill of the
whole prompt against the prefix's cache plus the question) part greedy answers within a few tokens; the equality
of the answers is tested in float32 (tests/test_engine.py, tests/test_gsm8k.py).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from bench_common import Progress, random_model, save_json

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data",
                    "gsm8k")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="GSM8K: continuous batching + shared prefix vs static batches")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json instead of a preset (CPU smoke runs)")
    p.add_argument("--data", default=os.path.join(DATA, "test.jsonl"))
    p.add_argument("--shots-data", default=None, help="default: train.jsonl beside --data")
    p.add_argument("--questions", type=int, default=1319)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--slots", type=int, default=64, help="engine slots, and the static batch size")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--modes", default="static,engine")
    p.add_argument("--warm", type=int, default=0, help="questions run untimed first in each mode (compiling)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _prompts_and_limits(args):
    from gemma4_jax.demo import demo_path
    from gemma4_jax.evals import gsm8k
    from gemma4_jax.tokenizer import Tokenizer

    tok = Tokenizer(demo_path())
    examples = gsm8k.read_jsonl(args.data)[:args.questions]
    shots_file = args.shots_data or os.path.join(os.path.dirname(os.path.abspath(args.data)), "train.jsonl")
    shots = gsm8k.read_jsonl(shots_file)[:args.shots] if args.shots else []
    prompts = [gsm8k.prompt_ids(tok, ex["question"], shots) for ex in examples]
    limits = [max(1, min(args.max_new_tokens, len(tok.encode(ex["answer"], add_bos=False)))) for ex in examples]
    return prompts, limits


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_s = [0.0]  # seconds this process spent tracing, lowering and compiling


def _count_compile(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_s[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)  # once per process, not once per run


def static_batches(model, prompts, limits, slots: int) -> list[list[int]]:
    out = []
    for s in range(0, len(prompts), slots):
        lim = limits[s:s + slots]
        got = model.generate(prompts[s:s + slots], max_new_tokens=max(lim), stop_tokens=())
        out += [g[:m] for g, m in zip(got, lim, strict=True)]
    return out


def run(args) -> dict:
    from gemma4_jax.config import Gemma4Config, preset

    start = time.time()
    cfg = Gemma4Config.from_json(args.config) if args.config else preset(args.preset)
    prompts, limits = _prompts_and_limits(args)
    res = dict(preset=args.config or args.preset, questions=len(prompts), shots=args.shots, slots=args.slots,
               max_new_tokens=args.max_new_tokens, card=jax.devices()[0].device_kind, jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), new_tokens=sum(limits),
               prompt_tokens_mean=float(np.mean([len(p) for p in prompts])), modes={})
    progress = Progress(res, args.json, start)
    model = random_model(cfg)
    progress("random_init")
    modes = {
        "static": lambda ps, ls, st: static_batches(model, ps, ls, args.slots),
        "engine": lambda ps, ls, st: model.generate_continuous(ps, max_new_tokens=ls, slots=args.slots,
                                                               stop_tokens=(), shared_prefix=True, stats=st),
    }
    outs = {}
    for name in args.modes.split(","):
        if args.warm:
            modes[name](prompts[:args.warm], limits[:args.warm], {})
        stats: dict = {}
        c0, t0 = _compile_s[0], time.perf_counter()
        outs[name] = modes[name](prompts, limits, stats)
        wall, compile_s = time.perf_counter() - t0, _compile_s[0] - c0
        res["modes"][name] = dict(wall_s=round(wall, 2), questions_s=len(prompts) / wall,
                                  new_tokens_s=sum(map(len, outs[name])) / wall, compile_s=round(compile_s, 2),
                                  questions_s_compiled=len(prompts) / max(wall - compile_s, 1e-9), **stats)
        print(f"{name}: {wall:.1f} s ({compile_s:.1f} s compiling), {len(prompts) / wall:.2f} questions/s "
              f"{stats}", flush=True)
        progress(name)
    if {"static", "engine"} <= set(outs):
        pairs = list(zip(outs["static"], outs["engine"], strict=True))
        res["same_answers"] = float(np.mean([a == b for a, b in pairs]))
        res["same_first_token"] = float(np.mean([a[0] == b[0] for a, b in pairs]))
        res["engine_vs_static"] = res["modes"]["engine"]["questions_s"] / res["modes"]["static"]["questions_s"]
        res["engine_vs_static_compiled"] = (res["modes"]["engine"]["questions_s_compiled"]
                                            / res["modes"]["static"]["questions_s_compiled"])
    save_json(res, args.json)
    return res
