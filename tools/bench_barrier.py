"""`bench.py barrier`: what a barrier across one kernel's programs costs, against a boundary between two kernels.

    PYTHONPATH=. python tools/bench.py barrier [--programs 132] [--rounds 9,17,33] [--iterations 400] [--json out.json]

A decode step of E2B or E4B is a chain of about 17 dependent kernels a layer; a kernel that ran a layer's phases
itself would put a grid barrier (`kernels/grid_barrier.py`) where each boundary is. This times both on the card:
the probe's R rounds (each program reads what another wrote in the round before) as R kernels, and as one kernel
with R − 1 barriers, each inside a jitted loop of `--iterations` calls (XLA runs the loop's body as a CUDA graph,
as it runs a decode step), by the wall clock. The slope from the fewest rounds to the most is the cost of one
boundary and of one barrier. Keep every R at 5 or more: on an H100 two kernels a call took longer than nine, likely
because XLA leaves so short a loop body out of the graph (`xla_gpu_graph_min_graph_size`). Every result is checked
against the plain-jnp reference first (a barrier that let a program run ahead would read stale values). Without a
GPU the rounds run in interpret mode (correctness only; the times mean nothing).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import save_json, seconds_per_call


def add_parser(sub) -> None:
    p = sub.add_parser("barrier", help="a grid barrier inside one kernel against a boundary between kernels")
    p.add_argument("--programs", type=int, default=None,
                   help="programs of every kernel (default: the GPU's multiprocessors; 4 without a GPU)")
    p.add_argument("--rounds", default="9,17,33", help="rounds a call, each a kernel or a barrier apart")
    p.add_argument("--iterations", type=int, default=400, help="calls in each timed loop")
    p.add_argument("--spins", default="atomic,volatile",
                   help="how a waiting program reads the barrier's counter, each timed (grid_barrier.wait_for_grid)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _barrier_loop(programs: int, rounds: int, iterations: int, interpret: bool, spin: str):
    """A jitted function of x [P, BLOCK] that runs `iterations` calls of the probe's `rounds` rounds in one kernel
    each; every call starts from x (the buffer it carries keeps x as its first row). Returns the last call's result
    and whether every program saw every barrier pass."""
    from gemma4_jax.kernels import grid_barrier as gb

    @jax.jit
    def barrier(x):
        buf = jnp.zeros((rounds + 1, programs, gb.BLOCK), jnp.float32).at[0].set(x)
        per_call = (rounds - 1) * programs

        def body(i, carry):
            buf, counter, ok = carry
            buf, counter, oks = gb.probe_barrier(buf, counter, (i * per_call)[None], rounds=rounds, spin=spin,
                                                 interpret=interpret)
            return buf, counter, ok & (jnp.min(oks) == 1)

        buf, _, ok = jax.lax.fori_loop(0, iterations, body, (buf, jnp.zeros((1,), jnp.int32), jnp.bool_(True)))
        return buf[rounds], ok

    return barrier


def _chain_loop(rounds: int, iterations: int, interpret: bool):
    """A jitted function of x [P, BLOCK] that runs `iterations` calls of the probe's `rounds` rounds as a kernel each;
    each call's rounds go on from the last's (rounds × iterations in all)."""
    from gemma4_jax.kernels import grid_barrier as gb

    @jax.jit
    def chain(x):
        def body(_, y):
            for _ in range(rounds):
                y = gb.probe_chain_round(y, interpret=interpret)
            return y
        return jax.lax.fori_loop(0, iterations, body, x)

    return chain


def run(args) -> dict:
    from gemma4_jax.kernels import grid_barrier as gb

    on_gpu = jax.devices()[0].platform == "gpu"
    device = jax.devices()[0]
    programs = args.programs or (getattr(device, "core_count", None) if on_gpu else None) or (132 if on_gpu else 4)
    rounds_list = [int(r) for r in args.rounds.split(",")]
    if min(rounds_list) < 2:
        raise SystemExit("bench.py barrier: --rounds must each be at least 2 (a barrier needs two rounds)")
    res = {"card": device.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "programs": programs, "iterations": args.iterations, "interpret": not on_gpu, "results": {}}
    x = jnp.asarray(np.random.default_rng(0).integers(-64, 64, (programs, gb.BLOCK)), jnp.float32)  # exact sums
    spins = args.spins.split(",")
    if not set(spins) <= set(gb.SPINS):
        raise SystemExit(f"bench.py barrier: --spins takes {', '.join(gb.SPINS)}, not {args.spins!r}")
    timing = functools.partial(seconds_per_call, repeat=args.repeat, stat=min)
    for rounds in rounds_list:
        entry = {}
        chain = _chain_loop(rounds, args.iterations, interpret=not on_gpu)
        if not np.array_equal(np.asarray(chain(x)), np.asarray(gb.probe_reference(x, rounds * args.iterations))):
            raise SystemExit(f"bench.py barrier: the chain of {rounds} kernels computes a wrong result")
        entry["chain_us_per_call"] = timing(chain, x) / args.iterations * 1e6
        for spin in spins:
            barrier = _barrier_loop(programs, rounds, args.iterations, not on_gpu, spin)
            got, ok = barrier(x)
            if not (bool(ok) and np.array_equal(np.asarray(got), np.asarray(gb.probe_reference(x, rounds)))):
                raise SystemExit(f"bench.py barrier: with the {spin} spin at {rounds} rounds the barrier "
                                 f"{'let a program read too early' if bool(ok) else 'gave up waiting'}")
            entry[f"barrier_{spin}_us_per_call"] = timing(barrier, x) / args.iterations * 1e6
        res["results"][str(rounds)] = entry
        print(f"{rounds:3d} rounds, µs a call: {rounds} kernels {entry['chain_us_per_call']:7.2f}; one kernel with "
              f"{rounds - 1} barriers " + ", ".join(f"{spin} spin {entry[f'barrier_{spin}_us_per_call']:7.2f}"
                                                    for spin in spins), flush=True)
        save_json(res, args.json)
    if len(rounds_list) > 1:
        lo, hi = str(min(rounds_list)), str(max(rounds_list))
        span = max(rounds_list) - min(rounds_list)

        def slope(key):
            return (res["results"][hi][key] - res["results"][lo][key]) / span

        res["us_per_kernel_boundary"] = slope("chain_us_per_call")
        res["us_per_barrier"] = {spin: slope(f"barrier_{spin}_us_per_call") for spin in spins}
        print(f"one kernel boundary {res['us_per_kernel_boundary']:.2f} µs; one barrier "
              + ", ".join(f"{spin} spin {v:.2f} µs" for spin, v in res["us_per_barrier"].items())
              + f" (slopes from {lo} to {hi} rounds; {programs} programs, {device.device_kind})", flush=True)
    save_json(res, args.json)
    return res
