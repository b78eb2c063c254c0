"""A barrier across a kernel's whole grid (Pallas, Triton backend), and a probe that times it against the kernel
boundaries a decode step pays today.

A decode step of the small models is a chain of 17-18 dependent kernels a layer (docs/performance.md), most of
them 1-5 µs, so the step costs about 2.5x what its bytes take at the HBM roofline. One kernel that ran a layer's
phases itself would replace each boundary between them with a barrier across its programs: every program adds one
to a counter in global memory (an atomic with acquire-release semantics at GPU scope, after a barrier of its own
threads so that their writes are done), then spins on the counter until all have arrived. That needs every program
resident at once: a grid of at most one program per SM, each small enough to fit.

    round r of the probe: buf[r + 1, p] = buf[r, (p + 1) mod P] + 1       (P programs, R rounds)

Each round reads what another program wrote in the round before, so a missing or broken barrier gives wrong
values. `probe_barrier` runs the R rounds in one kernel with a barrier between them; `probe_chain_round` runs one
round as a kernel of its own, so R calls of it put the boundary XLA keeps between dependent kernels where the
barriers were. In interpret mode (CPU tests) the programs run one after another, so a barrier would wait forever:
there the rounds are the grid's outer axis instead (round r's programs all run before round r + 1's) and no barrier
is taken; the rounds' math is the same code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 256  # float32 values a program carries a round (two per thread at 4 warps)
NUM_WARPS = 4
MAX_SPINS = 1 << 22  # a program that waited this many reads of the counter gives up (the probe reports it)


SPINS = ("atomic", "volatile")


def wait_for_grid(counter_ref, arrivals, spin: str = "atomic"):
    """This program arrives at the barrier and waits until the counter reaches `arrivals` (the number of programs
    times the barriers passed so far, plus what the counter held at the kernel's start). Returns whether the
    counter got there (False: the program gave up after MAX_SPINS reads).

    spin 'atomic': the program reads the counter with an acquiring atomic (one thread, its value handed to the
    others through shared memory: two thread barriers a read); 'volatile': every thread reads it with a plain
    volatile load, and one acquiring atomic follows once it has arrived."""
    plgpu.debug_barrier()  # this program's threads have all written what the other programs will read
    plgpu.atomic_add(counter_ref, 0, jnp.int32(1))  # release: the writes before it are visible to an acquire

    def more(state):
        seen, spins = state
        return (seen < arrivals) & (spins < MAX_SPINS)

    def acquire():
        return plgpu.atomic_add(counter_ref, 0, jnp.int32(0))

    def volatile():
        return plgpu.load(counter_ref, volatile=True)[0]

    read = acquire if spin == "atomic" else volatile
    seen, _ = lax.while_loop(more, lambda state: (read(), state[1] + 1), (read(), jnp.int32(0)))
    if spin != "atomic":
        seen = jnp.maximum(seen, acquire())  # the acquire that makes the others' writes visible to this program
    plgpu.debug_barrier()  # no thread reads before the one that spun has seen everyone arrive
    return seen >= arrivals


def _round(buf_ref, r, p, programs: int):
    """One round of program p: buf[r + 1, p] = buf[r, (p + 1) mod P] + 1. The read is volatile (not from L1): the
    value was written by another SM during this kernel."""
    row = plgpu.load(buf_ref.at[r, (p + 1) % programs], volatile=True)
    buf_ref[r + 1, p] = row + 1.0


def _barrier_kernel(base_ref, counter_in, buf_in, buf_ref, counter_ref, ok_ref, *, rounds: int, programs: int,
                    spin: str):
    del counter_in, buf_in  # aliased to buf_ref and counter_ref
    p = pl.program_id(0)
    ok = jnp.bool_(True)
    for r in range(rounds):
        if r:
            ok &= wait_for_grid(counter_ref, base_ref[0] + r * programs, spin)
        _round(buf_ref, r, p, programs)
    ok_ref[p] = ok.astype(jnp.int32)


def _interpret_kernel(buf_in, buf_ref, *, programs: int):
    del buf_in
    _round(buf_ref, pl.program_id(0), pl.program_id(1), programs)


@functools.partial(jax.jit, static_argnames=("rounds", "spin", "interpret"))
def probe_barrier(buf, counter, base, *, rounds: int, spin: str = "atomic", interpret: bool = False):
    """The probe's R rounds in one kernel over buf [R + 1, P, BLOCK] float32 (row 0 the input), with a barrier
    between rounds. `counter` [1] int32 holds `base` [1] when the call starts (a caller in a loop carries it: each
    call adds (R − 1)·P). `spin`: how a waiting program reads the counter (`wait_for_grid`). Returns (buf, counter,
    ok [P]: 1 where the program saw every barrier pass)."""
    assert spin in SPINS, spin
    n, programs, block = buf.shape
    assert n == rounds + 1 and block == BLOCK, (buf.shape, rounds)
    if interpret:  # the rounds as the grid's outer axis: no program waits on a later one
        out = pl.pallas_call(
            functools.partial(_interpret_kernel, programs=programs), grid=(rounds, programs),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)], out_specs=pl.BlockSpec(memory_space=pl.ANY),
            out_shape=jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0}, interpret=True,
            name="grid_barrier_probe")(buf)
        return out, counter + (rounds - 1) * programs, jnp.ones((programs,), jnp.int32)
    return pl.pallas_call(
        functools.partial(_barrier_kernel, rounds=rounds, programs=programs, spin=spin), grid=(programs,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 3,
        out_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 3,
        out_shape=[jax.ShapeDtypeStruct(buf.shape, buf.dtype), jax.ShapeDtypeStruct((1,), jnp.int32),
                   jax.ShapeDtypeStruct((programs,), jnp.int32)],
        input_output_aliases={2: 0, 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        name="grid_barrier_probe",
    )(base, counter, buf)


def _chain_kernel(src_ref, dst_ref, *, programs: int):
    p = pl.program_id(0)
    dst_ref[p] = src_ref[(p + 1) % programs] + 1.0


@functools.partial(jax.jit, static_argnames=("interpret",))
def probe_chain_round(x, *, interpret: bool = False):
    """One round as its own kernel: out[p] = x[(p + 1) mod P] + 1 over x [P, BLOCK] float32."""
    programs = x.shape[0]
    return pl.pallas_call(
        functools.partial(_chain_kernel, programs=programs), grid=(programs,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)], out_specs=pl.BlockSpec(memory_space=pl.ANY),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        name="grid_chain_probe")(x)


def probe_reference(x, rounds: int):
    """The probe's result after R rounds from x [P, BLOCK]: each round shifts the rows by one and adds 1."""
    return jnp.roll(x, -rounds, axis=0) + rounds
