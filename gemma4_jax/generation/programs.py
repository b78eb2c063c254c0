"""Compiled programs kept across processes, so that a second run starts without tracing.

JAX's persistent compilation cache (`cli.use_compile_cache`) saves compiling, but a new process still traces and
lowers every program to find it there: for the demo model's prefill on a 2-core CPU, 175 ms of tracing and 75 ms
of lowering before 128 ms of loading. A `Program` is a `jax.jit` function whose compiled executable is also
written to `DIR` (when set: the CLIs set it beside JAX's cache) under a key of everything the program depends on —
the package's source, the JAX and jaxlib versions, the backend and its devices, the settings read when tracing
(matmul precision, x64, the kernel dispatcher's knobs), the process's XLA_FLAGS, the static arguments, and the
shapes, dtypes and shardings of the others — and read back in a later process without tracing anything. `DIR`
defaults to the environment variable GEMMA4_JAX_PROGRAM_CACHE (what `cli.use_compile_cache` sets: the folder
`programs` inside the compile cache); unset, a Program is a plain jitted function.

Anything that goes wrong on the way (a file that does not load, a structure that does not pickle) falls back to
the plain jitted call; a key that differs is only a miss. A program that JAX's own cache supplied is run but not
written: XLA's CPU client serializes an executable it deserialized without its compiled functions, and a later
process that loaded it would fail with "Function … not found" (`_from_jax_cache`). Programs run with pp = 1; the
pipeline's ring is a Program that is not kept (`keep=False`), for its compiler options.

Decode programs (`decode=True`: the decode loop, the pipeline's ring) are compiled with XLA's command-buffer
scheduling set to `DECODE_SCHEDULING`. On the GPU a decode step runs as one CUDA graph; XLA's default (`LHS`)
orders its kernels one after another, `CONCURRENT` lets kernels that share no buffer run side by side — a layer's
dense MLP beside its router and experts, the keys' and values' cache writes, the small norms and gates. On an H200
that took 26B-A4B's batch-16 step from 10.76 to 10.19 ms and E2B's batch-1 token from 3.09 to 2.93 ms
(docs/performance.md, "Concurrent kernels in the decode graph"). Other backends ignore the option.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jaxlib
from jax.experimental import serialize_executable

from .. import kernels
from ..cli import PROGRAM_CACHE_ENV
from ..kernels import dispatch

log = logging.getLogger(__name__)

ENV = PROGRAM_CACHE_ENV  # GEMMA4_JAX_PROGRAM_CACHE
# XLA's command-buffer scheduling for decode programs: "CONCURRENT" or "LHS" (XLA's default); "" leaves it unset.
DECODE_SCHEDULING = "CONCURRENT"
# More XLA options for the decode programs alone, by name (none by default; `bench.py generate --decode-xla-option
# NAME=VALUE`), prefill unchanged. {"xla_gpu_enable_triton_gemm": False} (the decode GEMMs on cuBLAS) made E2B's
# and E4B's batch-16 steps 48-51 % slower on an H200 (docs/performance.md, fourteenth session).
DECODE_XLA_OPTIONS: dict[str, str | bool | int | float] = {}
DIR: str | None = None  # where compiled programs are kept (None: the environment variable's folder, or nowhere)
_LOADED: dict = {}  # key (and each call's cheaper in-process key) -> the executable, for later calls in a process


@functools.cache
def source_fingerprint() -> str:
    """sha256 over the package's Python sources (kernels included): a program compiled from other code misses."""
    roots = {Path(__file__).resolve().parents[1], Path(kernels.__file__).resolve().parent}
    files = sorted({p.resolve() for root in roots for p in root.rglob("*.py")})
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@functools.cache
def _platform_key() -> str:
    client = jax.local_devices()[0].client
    kinds = ",".join(d.device_kind for d in jax.local_devices())
    return f"{jax.__version__}|{jaxlib.__version__}|{client.platform}|{client.platform_version}|{kinds}"


def folder() -> str | None:
    return DIR or os.environ.get(ENV) or None


def _static_key(value) -> str:
    """A text that names a static argument across processes (objects with a `cache_key` give theirs)."""
    key = getattr(value, "cache_key", None)
    return key if isinstance(key, str) else repr(value)


def _config() -> tuple:
    """The settings read when tracing, lowering or compiling that no argument carries (XLA_FLAGS: a process's XLA
    options, which a program kept by a process run under other flags was not compiled with)."""
    return (jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64, dispatch.settings(),
            DECODE_SCHEDULING, tuple(sorted(DECODE_XLA_OPTIONS.items())), os.environ.get("XLA_FLAGS", ""))


def compiler_options(decode: bool) -> dict[str, str | bool | int | float]:
    """XLA options a program compiles with: decode programs get `DECODE_SCHEDULING` and `DECODE_XLA_OPTIONS`."""
    if not decode:
        return {}
    options = {"xla_gpu_command_buffer_scheduling_mode": DECODE_SCHEDULING} if DECODE_SCHEDULING else {}
    return {**options, **DECODE_XLA_OPTIONS}


def _fast_aval(x):
    if isinstance(x, jax.Array):
        return x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding
    return type(x), x


def _aval(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)}:{x.dtype}:{getattr(x, 'weak_type', False)}:{getattr(x, 'sharding', None)}"
    return f"{type(x).__name__}:{x!r}"


class Program:
    """`jax.jit(fn, static_argnums, static_argnames, donate_argnums, donate_argnames)`, called the same way, whose
    compiled form is kept in `DIR` across processes (unless `keep=False`); `decode=True` compiles it with the decode
    programs' XLA options (`compiler_options`). `.lower` and `.trace` are the jitted function's."""

    def __init__(self, fn: Callable, *, static_argnums=(), static_argnames=(), donate_argnums=(), donate_argnames=(),
                 decode: bool = False, keep: bool = True):
        self._fn, self._decode, self._keep = fn, decode, keep
        self._jit_args = dict(static_argnums=static_argnums, static_argnames=static_argnames,
                              donate_argnums=donate_argnums, donate_argnames=donate_argnames)
        self._jits: dict = {}
        names = list(inspect.signature(fn).parameters)
        nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self._static_pos = frozenset(nums) | {names.index(n) for n in argnames if n in names}
        self._static_names = frozenset(argnames) | {names[i] for i in nums}
        self._name = f"{fn.__module__}.{fn.__qualname__}"
        functools.update_wrapper(self, fn)

    @property
    def jitted(self):
        """The jitted function with today's compiler options (one per setting of them, kept)."""
        options = compiler_options(self._decode)
        key = tuple(sorted(options.items()))
        if key not in self._jits:
            self._jits[key] = jax.jit(self._fn, **self._jit_args, compiler_options=options or None)
        return self._jits[key]

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self.jitted.trace(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        where = folder() if self._keep else None
        if where is None:
            return self.jitted(*args, **kwargs)
        dyn_args = tuple(a for i, a in enumerate(args) if i not in self._static_pos)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self._static_names}
        try:
            leaves, treedef = jax.tree.flatten((dyn_args, dyn_kwargs))
            # In-process memo first: the full key formats every argument (3 ms for a model's ~700 parameters).
            fast = (self, where, _config(), tuple(a for i, a in enumerate(args) if i in self._static_pos),
                    tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static_names)), treedef,
                    tuple(map(_fast_aval, leaves)))
            compiled = _LOADED.get(fast)
            if compiled is None:
                compiled = _LOADED[fast] = self._compiled(where, args, kwargs, dyn_args, dyn_kwargs)
        except Exception as e:  # never worse than the plain call
            log.debug("program cache bypassed for %s: %r", self._name, e)
            return self.jitted(*args, **kwargs)
        return compiled(*dyn_args, **dyn_kwargs)

    def key(self, args, kwargs, dyn_args, dyn_kwargs) -> str:
        statics = [f"{i}={_static_key(a)}" for i, a in enumerate(args) if i in self._static_pos]
        statics += [f"{k}={_static_key(v)}" for k, v in sorted(kwargs.items()) if k in self._static_names]
        leaves, treedef = jax.tree.flatten((dyn_args, dyn_kwargs))
        h = hashlib.sha256()
        for part in (self._name, source_fingerprint(), _platform_key(), "|".join(map(str, _config())), *statics,
                     str(treedef),
                     *map(_aval, leaves)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def _compiled(self, where: str, args, kwargs, dyn_args, dyn_kwargs):
        key = self.key(args, kwargs, dyn_args, dyn_kwargs)
        if key in _LOADED:
            return _LOADED[key]
        path = Path(where) / f"{self._name.rsplit('.', 1)[-1]}-{key[:40]}.bin"
        compiled = None
        if path.exists():
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                compiled = serialize_executable.deserialize_and_load(
                    payload, in_tree, out_tree, execution_devices=_devices(dyn_args, dyn_kwargs))
            except Exception as e:  # unreadable or from another build: compile again, overwrite it
                log.debug("program %s not loaded: %r", path, e)
        if compiled is None:
            compiled, loaded = _from_jax_cache(lambda: self.jitted.lower(*args, **kwargs).compile())
            if not loaded:  # re-serialized, a loaded executable lacks its functions (module docstring)
                _save(path, pickle.dumps(serialize_executable.serialize(compiled)))
        _LOADED[key] = compiled
        return compiled


_HITS = threading.local()  # JAX persistent-cache hits seen in this thread (`_from_jax_cache`)


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _HITS.n = getattr(_HITS, "n", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


def _from_jax_cache(compile_: Callable):
    """(compile_(), whether JAX's persistent cache supplied it rather than the compiler)."""
    before = getattr(_HITS, "n", 0)
    compiled = compile_()
    return compiled, getattr(_HITS, "n", 0) != before


def _devices(dyn_args, dyn_kwargs) -> list:
    """The devices the arguments live on (the program's, as compiled for them; the default device where none is
    an array)."""
    for leaf in jax.tree.leaves((dyn_args, dyn_kwargs)):
        if isinstance(leaf, jax.Array):
            return sorted(leaf.sharding.device_set, key=lambda d: d.id)
    return jax.local_devices()[:1]


def _save(path: Path, data: bytes) -> None:
    """Write atomically (a temporary file in the same folder, renamed): a reader never sees half a program."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def program(*, static_argnums=(), static_argnames=(), donate_argnums=(), donate_argnames=(), decode: bool = False,
            keep: bool = True) -> Callable[[Callable], Program]:
    """Decorator: `@program(static_argnums=…, …)` in place of `@functools.partial(jax.jit, …)`."""
    return functools.partial(Program, static_argnums=static_argnums, static_argnames=static_argnames,
                             donate_argnums=donate_argnums, donate_argnames=donate_argnames, decode=decode, keep=keep)
