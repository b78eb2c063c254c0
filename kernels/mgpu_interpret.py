"""JAX's GPU interpret mode for our Mosaic GPU kernels (CPU tests): the parameters, and two shims.

Loaded by the kernels only for interpret mode (`params(True)` installs the shims on first use); the GPU path
never touches the interpreter's internals. Each shim is a no-op where the internals are not where expected
(then the interpreter raises its own error):
* wgmma with transposed operands (`ref.transpose`), which the interpreter lacks before jax 0.11.2;
* a per-thread runner that puts the simulated warpgroups on distinct CPU devices, compiles each once and
  returns only when the thread's program has finished.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu


def params(interpret):
    """None (compile for the GPU) or a GPU InterpretGPUParams instance, the shims installed."""
    p = _interpret_params(interpret)
    if p is not None:
        _install_interpret_transpose_shim()
        _install_interpret_thread_runner()
    return p


def _interpret_params(interpret):
    """None (compile for the GPU) or a GPU InterpretGPUParams instance."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        cls = getattr(plgpu, "InterpretGPUParams", None)
        if cls is None:  # not public in jax 0.10; only reached in interpret mode
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # noqa: N813
        return cls()
    return interpret


def _install_interpret_transpose_shim():
    """Teach GPU interpret mode's wgmma transposed operands (`ref.transpose`), if it lacks them.

    jax 0.10's interpreter resolves wgmma operands with plain index ranges and fails on a TransposeTransform.
    This wraps its host callback: trailing transposes are peeled off the operand's transforms, the operand is
    read with the remaining ranges and transposed in numpy. Only ever called for interpret mode; a no-op if
    the internals are not where expected (then the interpreter raises its own error).
    """
    try:

        from jax._src.pallas.mosaic.interpret import utils as iu
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc
        from jax._src.state.types import TransposeTransform
    except ImportError:
        return
    if hasattr(iu, "to_access"):  # jax ≥ 0.11.2: the interpreter reads transposed operands itself
        return
    orig = getattr(gc, "wgmma", None)
    needed = ("_remove_noop_transforms", "_get_shared_memory", "HostAllocationKey")
    if orig is None or getattr(orig, "_mgpu_transpose_shim", False) or not all(hasattr(gc, n) for n in needed):
        return

    def peel(ts):
        ts = tuple(gc._remove_noop_transforms(ts))
        perm = None
        while ts and isinstance(ts[-1], TransposeTransform):
            p = tuple(ts[-1].permutation)
            perm = p if perm is None else tuple(perm[i] for i in p)
            ts = ts[:-1]
        return ts, perm

    @functools.wraps(orig)
    def wgmma(*, token, acc_allocation_key_as_array, acc_transforms, a_allocation_key_as_array, a_transforms,
              b_allocation_key_as_array, b_transforms, source_info=None, **where):
        # `where`: the calling thread as the interpreter names it (jax 0.10: device_id, grid_point_coords and
        # thread_id; jax 0.11.0 and 0.11.1: mesh_location and thread), and acc_dtype; passed on as they came
        # (the Mosaic tests of tests/test_moe.py pass on the CPU with jax 0.10.2, 0.11.0 and 0.11.2, 2026-12-08)
        (a_ts, a_perm), (b_ts, b_perm) = peel(a_transforms), peel(b_transforms)
        if a_perm is None and b_perm is None:
            return orig(token=token, acc_allocation_key_as_array=acc_allocation_key_as_array,
                        acc_transforms=acc_transforms,
                        a_allocation_key_as_array=a_allocation_key_as_array, a_transforms=a_transforms,
                        b_allocation_key_as_array=b_allocation_key_as_array, b_transforms=b_transforms,
                        source_info=source_info, **where)
        acc_dtype = where.pop("acc_dtype", None)
        mem = gc._get_shared_memory()
        if "mesh_location" in where:  # jax 0.11
            from jax._src.pallas.mosaic_gpu.interpret import shared_memory as sm

            tid = where["thread"]
            info = sm.GPULoggingInfo(where["mesh_location"], tid, source_info)
        else:
            device_id, thread_id = int(where["device_id"]), int(where["thread_id"])
            coords = tuple(int(x) for x in where["grid_point_coords"])
            tid = mem.get_global_thread_id(device_id, thread_id)
            info = iu.GPULoggingInfo(device_id=device_id, grid_point_coords=coords, thread_id=thread_id,
                                     source_info=source_info)

        def rng(ts):
            return iu.to_range(jax.tree.map(int, tuple(ts)))

        def read(key, ts):
            val, _, _ = mem.get_buffer_content(gc.HostAllocationKey.from_array(key), rng(ts), tid,
                                               logging_info=info)
            return val

        a = read(a_allocation_key_as_array, a_ts)
        b = read(b_allocation_key_as_array, b_ts)
        a = a if a_perm is None else np.transpose(a, a_perm)
        b = b if b_perm is None else np.transpose(b, b_perm)
        acc_key = gc.HostAllocationKey.from_array(acc_allocation_key_as_array)
        acc_rng = rng(gc._remove_noop_transforms(acc_transforms))
        acc, _, _ = mem.get_buffer_content(acc_key, acc_rng, tid, logging_info=info)
        mem.store_buffer_content(acc_key, acc_rng, acc + np.matmul(a, b, dtype=acc_dtype or acc.dtype), tid,
                                 logging_info=info)
        return token

    wgmma._mgpu_transpose_shim = True
    gc.wgmma = wgmma


def _install_interpret_thread_runner():
    """Make GPU interpret mode's simulated threads run on distinct CPU devices, compiled once.

    The interpreter runs a CTA's threads (here 3 warpgroups) as concurrent XLA computations whose host
    callbacks block inside barrier waits. Four things this replacement of its per-thread runner (jax 0.10's
    `thread_map._run_jaxpr`) deals with:
    * XLA:CPU runs only about as many callbacks at once per device as the host has cores, so on a 2-core
      machine two threads blocked in a barrier can starve the third and the kernel deadlocks (intermittently).
      Thread i runs on CPU device i mod #devices; with ≥ 3 devices (set
      XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts; our tests' conftest does) no
      device hosts two threads.
    * Threads on different devices must not be ordered by JAX's runtime tokens for ordered effects (the
      interpreter's callbacks are ordered): a thread that inherits the token of another thread's still-running
      execution blocks on it while that thread waits for it in a barrier. The thread's (thread-local) token
      set is cleared before each run; the simulated threads are concurrent by design.
    * The stock runner lowers and compiles the thread's program again for every grid point (~1.5 s each);
      here the executable is cached per (program, device, argument types).
    * XLA:CPU may dispatch a thread's program asynchronously: the call returns while its last callbacks
      (the barriers' deallocation) still run, the interpreter's end-of-kernel check finds a barrier still
      allocated, and every later interpreted kernel in the process fails on the state left behind (CI,
      intermittently; here by the fifth call of one kernel in one process). The runner returns the
      program's outputs (the thread's final token, into which its callbacks are chained) and blocks on them
      and on the run's effect tokens before the thread counts as done.
    Only ever called for interpret mode; a no-op if the internals are not where expected.
    """
    try:
        from jax._src.pallas.mosaic.interpret import thread_map as tm
    except ImportError:
        return
    orig = getattr(tm, "_run_jaxpr", None)
    if orig is None or getattr(orig, "_mgpu_thread_runner", False):
        return
    cache: dict = {}
    try:
        from jax._src.dispatch import runtime_tokens as tokens
        if not hasattr(tokens, "clear"):
            tokens = None
    except ImportError:
        tokens = None

    def _run(jaxpr, consts, *args):
        return jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run(jaxpr, consts, *args):
        devices = jax.devices("cpu")
        try:
            dev = devices[int(args[0]) % len(devices)]  # args[0] is the thread index
        except (IndexError, TypeError, ValueError):
            return orig(jaxpr, consts, *args)
        consts, args = jax.device_put((consts, args), dev)
        sig = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves((consts, args)))
        key = (id(jaxpr), dev.id, sig)
        hit = cache.get(key)
        if hit is None or hit[0] is not jaxpr:
            if len(cache) > 256:
                cache.clear()
            with jax.default_device(dev):
                compiled = jax.jit(_run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()
            hit = cache[key] = (jaxpr, compiled)  # holding jaxpr keeps its id from being reused
        if tokens is not None:  # see the docstring: no ordering tokens carried over from other executions
            tokens.clear()
        jax.block_until_ready(hit[1](consts, *args))  # see the docstring: the run must have finished
        if tokens is not None:
            tokens.block_until_ready()

    run._mgpu_thread_runner = True
    tm._run_jaxpr = run
