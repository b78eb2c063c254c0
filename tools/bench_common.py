"""What the `bench.py` subcommands share: one timer, the HBM bandwidth probes, the JSON writer and phase progress,
and random-weight models at a config's real shapes (pp=1, or a pipeline).

The random-model section is where the benchmarks build models out of gemma4_jax's pieces (synthetic weights,
parameter paths, the pipeline's split and stage leaves): when those move, this section changes, not each benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from flax import nnx

    from gemma4_jax import Gemma4Config, Gemma4Model

Path = tuple[str, ...]

# -- timing -----------------------------------------------------------------------------------------------------


def seconds_per_call(fn: Callable[..., Any], *args: Any, arg_sets: Sequence[tuple] = (), calls: int | None = 1,
                     repeat: int = 5, stat: Callable[[list[float]], float] = statistics.median, warmup: bool = True,
                     budget_s: float = 0.25) -> float:
    """Seconds per call of `fn(*args)`: `repeat` runs of `calls` calls back to back, each run on the wall clock
    until its last result is ready (`jax.block_until_ready`), reduced by `stat` (the median; `min` for best-of).

    `warmup`: one untimed call first, so that compiling is not timed. `calls=None`: as many calls per run as fill
    about `budget_s`, sized by one timed call (2 to 200): short kernels are then timed over many launches.
    `arg_sets`: argument tuples cycled through call by call, instead of `args` (weights that stream from HBM, not
    L2, as a model's layers do).
    """
    sets = list(arg_sets) or [args]
    if warmup:
        jax.block_until_ready(fn(*sets[0]))
    if calls is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*sets[0]))
        calls = int(min(200, max(2, budget_s / max(time.perf_counter() - t0, 1e-6))))
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = None
        for i in range(calls):
            out = fn(*sets[i % len(sets)])
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / calls)
    return float(stat(runs))


def device_trace(directory: str):
    """`jax.profiler.trace` into `directory` with a perfetto trace (what `trace_summary` reads) and without the
    Python tracer: the summaries read only the device's kernels, and on the CPU the Python events crowded them
    out of the trace (a 17-token demo trace: 9.5 MB, 0.3 kernels a decode step; without them 0.6 MB, ~765)."""
    options = None
    if hasattr(jax.profiler, "ProfileOptions"):
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
    return jax.profiler.trace(directory, create_perfetto_trace=True, profiler_options=options)


def device_seconds(jobs: Sequence[tuple[Callable[..., Any], tuple]], runs: int = 5, trace_dir: str | None = None,
                   pause_s: float = 0.05) -> list[dict]:
    """Device time of each `(fn, args)` in `jobs`, from a profiler trace rather than the wall clock: every job is
    compiled and run once untraced, then, inside one trace, run `runs` times back to back and waited for inside a
    `TraceAnnotation`, with a `pause_s` pause before and after; each job's busy µs per run (its kernels' durations
    added up: what the work costs inside a step that runs as one CUDA graph, whatever the host's launch jitter) and
    kernels per run are the device kernels that start inside its annotation, widened by half a pause on each side
    (`trace_summary.in_spans`). Where the annotations are missing or a job's span holds no kernel, the kernels are
    split at the pauses instead (`trace_summary.bursts`). Splitting by spans first keeps work that starts between
    the jobs out of both (on a busy CPU, a thread-pool event bridged a pause and joined the two jobs into one burst).
    Short programs that the wall clock cannot time (a few µs of kernels) come out to within the trace's resolution."""
    import tempfile

    from trace_summary import bursts, device_events, host_spans, in_spans, newest_trace, read_trace

    mark = "device_seconds job"
    for fn, args in jobs:
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        d = trace_dir or tmp
        with device_trace(d):
            for i, (fn, args) in enumerate(jobs):
                time.sleep(pause_s)
                with jax.profiler.TraceAnnotation(f"{mark} {i}"):
                    out = None
                    for _ in range(runs):
                        out = fn(*args)
                    jax.block_until_ready(out)
            time.sleep(pause_s)
        trace = read_trace(newest_trace(d))
        events, spans = device_events(trace), host_spans(trace, mark)
    groups = in_spans(events, spans, pad_us=pause_s * 1e6 / 2) if len(spans) == len(jobs) else []
    if len(groups) != len(jobs) or not all(groups):
        groups = bursts(events, gap_us=pause_s * 1e6 / 2)
    if len(groups) != len(jobs):
        raise RuntimeError(f"the trace splits into {len(groups)} bursts of device work, not the {len(jobs)} jobs run")
    return [{"busy_us": sum(e[1] for e in g) / runs, "kernels": len(g) / runs} for g in groups]


def seconds_once(fn: Callable[[], Any]) -> float:
    """Seconds of one call of `fn()` until its result is ready, compiling included: `seconds_per_call` with no
    warm-up. (Blocking walks the result's leaves: give it a function that returns None, not a long list.)"""
    return seconds_per_call(fn, repeat=1, warmup=False)


def best_generation(model: Gemma4Model, prompts: list[list[int]], new_tokens: int, repeat: int) -> tuple[float, float]:
    """Best of `repeat` greedy `new_tokens`-token generations that never stop early: (whole seconds, seconds of
    the decode part, the `new_tokens − 1` tokens after prefill's, timed on its own by `generate(timings=)`, so
    never negative)."""
    whole = decode = float("inf")
    for _ in range(repeat):
        t: dict = {}
        t0 = time.perf_counter()
        model.generate(prompts, max_new_tokens=new_tokens, stop_tokens=(), timings=t)
        whole, decode = min(whole, time.perf_counter() - t0), min(decode, t["decode_s"])
    return whole, decode


# -- HBM bandwidth ----------------------------------------------------------------------------------------------


def _probe(name: str, gib: float) -> tuple[Callable[..., Any], tuple, int]:
    """One HBM probe over `gib` GiB of bf16: (jitted function, its arguments, the bytes it moves).

    copy: `x + 1`, bytes read and written; read: a float32 sum, read only, as decode mostly is; matvec: 8 rows
    times a [8192, N] weight, float32 accumulation (the weight is all that is read); gemv: the same at 1 row, what
    a batch-1 decode step's projections are."""
    if name in ("copy", "read"):
        x = (jnp.zeros if name == "copy" else jnp.ones)((int(gib * 2**29),), jnp.bfloat16)
        if name == "copy":
            return jax.jit(lambda a: a + 1), (x,), 2 * x.nbytes
        return jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (x,), x.nbytes
    w = jnp.ones((8192, int(gib * 2**30) // (2 * 8192)), jnp.bfloat16)
    x = jnp.ones((8 if name == "matvec" else 1, 8192), jnp.bfloat16)
    return jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), (x, w), w.nbytes


def _wall_clock_bandwidth(name: str, gib: float, timing: dict) -> float:
    fn, args, nbytes = _probe(name, gib)
    return nbytes / seconds_per_call(fn, *args, **{"stat": min, **timing})


def copy_bandwidth(gib: float = 2.0, **timing: Any) -> float:
    """Bytes/s of a `gib` GiB bf16 `x + 1` on the device, counting bytes read and written (`_probe`). `timing`:
    options of `seconds_per_call`; by default the best of 5 calls."""
    return _wall_clock_bandwidth("copy", gib, timing)


def read_bandwidth(gib: float = 4.0, **timing: Any) -> float:
    """Bytes/s of reading `gib` GiB of bf16 into a float32 sum (`_probe`). `timing`: as for `copy_bandwidth`."""
    return _wall_clock_bandwidth("read", gib, timing)


def matvec_bandwidth(gib: float = 4.0, **timing: Any) -> float:
    """Bytes/s of a decode-like read: 8 bf16 rows times a `gib` GiB bf16 weight (`_probe`). `timing`: as for
    `copy_bandwidth`."""
    return _wall_clock_bandwidth("matvec", gib, timing)


def device_bandwidths(gib: float = 2.0, runs: int = 5) -> dict[str, float]:
    """Bytes/s of every `_probe` over `gib` GiB (copy, read, matvec, and gemv: the batch-1 product), each timed by
    its kernels' device time (`device_seconds`), not the wall clock. A decode step runs inside the generation's
    device loop with no host in between, so this is the bandwidth to hold its time against; the wall clock also
    counts each call's launch and wait, which at 0.5–4 GiB on an H200 is a large share (copy, read and 8-row probes
    by the wall clock: 2.1–3.4 TB/s, where 31B's decode streams its weights at 4.26). Empty where the trace cannot
    be split into the jobs."""
    probes = {name: _probe(name, gib) for name in ("copy", "read", "matvec", "gemv")}
    try:
        times = device_seconds([(fn, args) for fn, args, _ in probes.values()], runs=runs)
    except RuntimeError as e:  # the trace did not split into the jobs: say so, keep the wall-clock probes
        print(f"device-timed bandwidth probes skipped: {e}", flush=True)
        return {}
    return {name: nbytes / (t["busy_us"] * 1e-6)
            for (name, (_, _, nbytes)), t in zip(probes.items(), times, strict=True) if t["busy_us"] > 0}


# -- results ------------------------------------------------------------------------------------------------------


def save_json(res: dict, path: str | None) -> None:
    """Write `res` to `path` (nothing when None) through a temporary file and a rename, so that a run killed
    mid-write leaves the previous file whole; values JSON has no type for are written as their str."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


class Progress:
    """Ends a phase: records its seconds in `res["phases_s"]`, rewrites the JSON file, prints `[name] S s` (and,
    when `start` is given, the seconds since it), so that a run cut short keeps and shows what it measured."""

    def __init__(self, res: dict, path: str | None, start: float | None = None):
        self.res, self.path, self.start, self.clock = res, path, start, time.time()
        res.setdefault("phases_s", {})

    def __call__(self, name: str) -> None:
        now = time.time()
        self.res["phases_s"][name] = round(now - self.clock, 2)
        self.clock = now
        save_json(self.res, self.path)
        total = "" if self.start is None else f" ({now - self.start:.0f} s in all)"
        print(f"[{name}] {self.res['phases_s'][name]} s{total}", flush=True)


def kl_per_token(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(ref ‖ other) of the softmaxes of float32 logits [..., V], per position."""
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


# -- random models at a config's shapes: the benchmarks' calls into gemma4_jax's model building -------------------


@contextlib.contextmanager
def torch_full_float32():
    """float32 means float32 in torch inside this: TF32 off for CUDA matmuls and cuDNN convolutions (cuDNN's default
    is TF32), as our float32 runs at full precision; both settings restored afterwards, for callers in the same
    process."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_model(cfg: Gemma4Config, attn_impl: str = "auto", pp: int = 1, dtype: str = "bfloat16") -> Gemma4Model:
    """A `Gemma4Model` (bf16, or float32 at pp = 1: it runs at full precision, as `load(dtype="float32")` does)
    with random weights at `cfg`'s shapes, made on the device by `gemma4_jax.testing.synthetic.random_model`.
    With `pp` > 1 it is made on one device and copied through the host into a pipeline at the split
    `load(..., pp=pp)` picks."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.testing.synthetic import random_model as random_module

    if pp > 1 and dtype != "bfloat16":
        raise ValueError(f"the bench's pipelined model is bfloat16 only, not {dtype}")
    module = random_module(cfg, jnp.dtype(dtype))
    if pp == 1:
        return Gemma4Model(module, RunConfig(dtype, 1, None, attn_impl))
    params = _host_params(module)
    del module  # off the device before the stages are placed
    return pipeline_model(cfg, params, pipeline_stages(cfg, pp), attn_impl)


def host_params(model: Gemma4Model) -> dict[Path, np.ndarray]:
    """A pp=1 model's weights on the host, by parameter path: what `pipeline_model` and `float32_model` take."""
    return _host_params(model.module)


def _host_params(module: nnx.Module) -> dict[Path, np.ndarray]:
    from gemma4_jax.model.text import iter_params

    return {path: np.asarray(var.get_value()) for path, var in iter_params(module)}


def pipeline_stages(cfg: Gemma4Config, pp: int, layer_split: str | None = None) -> tuple:
    """The pipeline's split: `layer_split` ("0,a,...,L") when given, else the one `load(..., pp=pp)` picks."""
    from gemma4_jax.parallel.stages import best_stages, parse_layer_split

    return parse_layer_split(layer_split, cfg.num_layers) if layer_split else best_stages(cfg, pp, 2)


def pipeline_model(cfg: Gemma4Config, params: dict[Path, np.ndarray], stages: tuple,
                   attn_impl: str = "auto") -> Gemma4Model:
    """A bf16 `Gemma4Model` pipelined over `stages` (a device each), holding `params` (see `host_params`)."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.parallel.pipeline import Pipeline
    from gemma4_jax.parallel.stages import split_params

    pipe = Pipeline(cfg, stages, split_params(cfg, stages, params), jnp.bfloat16, attn_impl)
    return Gemma4Model(None, RunConfig("bfloat16", len(stages), None, attn_impl), pipeline=pipe)


def float32_model(cfg: Gemma4Config, params: dict[Path, np.ndarray]) -> Gemma4Model:
    """A pp=1 float32 `Gemma4Model` (XLA attention) holding `params` (see `host_params`): a reference forward of
    the same weights, bf16's own error measured against it."""
    from gemma4_jax.api import Gemma4Model, RunConfig
    from gemma4_jax.model.text import abstract_model, iter_params

    module = abstract_model(cfg, jnp.float32)
    for path, var in iter_params(module):
        var.set_value(jnp.asarray(params[path], jnp.float32))
    return Gemma4Model(module, RunConfig(dtype="float32", attn_impl="xla"))


def random_modules_f32_bf16(cfg: Gemma4Config) -> tuple[nnx.Module, nnx.Module]:
    """Two `Gemma4Text` modules at `cfg`'s shapes: random float32 weights, and the same weights rounded to bf16
    (a reference and the bf16 run measured against it)."""
    from gemma4_jax.model.text import abstract_model, iter_params
    from gemma4_jax.testing.synthetic import random_model as random_module

    m32 = random_module(cfg, jnp.float32)
    m16 = abstract_model(cfg, jnp.bfloat16)
    for (_, a), (_, b) in zip(iter_params(m32), iter_params(m16), strict=True):
        b.set_value(a.get_value().astype(jnp.bfloat16))
    return m32, m16


def weight_arrays(model: Gemma4Model) -> list[jax.Array]:
    """A model's weight arrays on its device(s): the pp=1 state, or the pipeline's stage parameters."""
    return jax.tree.leaves(model.state if model.pipeline is None else model.pipeline.params)
