"""Generation: prefill, a compiled decode loop over a donated state, and sampling.

Owns the sampling rules (greedy, temperature, top-k, top-p, seeded), the jitted prefill and decode
functions (params and cache passed as arguments, never closed over), the loop state, and the
host-side driver `generate_tokens` that pads prompts into length buckets (so new prompt lengths
rarely recompile), checks the context, and streams chunks of tokens when asked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..kernels import dispatch
from ..model.text import merge
from .cache import DecodeAttender, ExtendAttender, KVCache, PrefillAttender, init_cache, put_rows, take_rows
from .options import Sampling, bucket, check_context  # noqa: F401 (re-exported: sampling options and shape buckets live there)
from .programs import program

F32 = jnp.float32


def sample(logits_bv: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids [B] from float32 logits [B,V]."""
    if s.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(F32) / s.temperature
    neg = jnp.finfo(F32).min
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p is not None and s.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < s.top_p, desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """The decode loop's carry (donated between calls).

    cache:  KVCache;  token: [B] last sampled token (fed next);  pos: [B] its position;
    done:   [B] bool, a stop token was sampled;  out: [B, N] generated ids (0 after a stop);
    step:   () number of tokens generated so far;  key: PRNG key of the run.
    """

    cache: KVCache
    token: jax.Array
    pos: jax.Array
    done: jax.Array
    out: jax.Array
    step: jax.Array
    key: jax.Array


def _prefill(graphdef, params, ids_bt, lengths_b, cache: KVCache, impl: str, mm):
    model = merge(graphdef, params)
    b, t = ids_bt.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attender = PrefillAttender(cache, pos, lengths_b, impl, model.blocks(mm))
    x = model.decode_layers(ids_bt, pos, attender, mm)
    last = jnp.take_along_axis(x, (lengths_b - 1)[:, None, None], axis=1)  # [B,1,D]
    return model.head(last)[:, 0], attender.cache


@program(static_argnums=0, static_argnames="impl", donate_argnums=(4,))
def prefill(graphdef, params, ids_bt, lengths_b, cache: KVCache, impl: str = "auto", mm=None):
    """Run the prompts [B,T] (true lengths [B]; soft tokens `mm`, a `model.Multimodal`, merged); fill the
    cache; return last-token logits [B,V]."""
    return _prefill(graphdef, params, ids_bt, lengths_b, cache, impl, mm)


@program(static_argnums=0, static_argnames="impl", donate_argnums=(4,))
def prefill_rows(graphdef, params, ids_rt, lengths_r, cache: KVCache, row0, impl: str = "auto"):
    """`prefill` of R prompts [R,T] into the cache's rows row0 .. row0+R−1 (the other rows untouched); returns
    their last-token logits [R,V]."""
    logits, rows = _prefill(graphdef, params, ids_rt, lengths_r, take_rows(cache, row0, ids_rt.shape[0]), impl, None)
    return logits, put_rows(cache, rows, row0)


# The most prompt tokens (rows × bucketed length) one prefill program computes. A larger batch is prefilled in
# groups of rows into its one cache: a prefill's temporaries grow with its tokens (26B-A4B's experts hold
# float32 [tokens × top-k, D] buffers, 22 GiB at 64 prompts × 4,096), and static batches of 64 GSM8K prompts
# (the 4,096-token bucket) ran out of memory on an H200 with 26B-A4B, while batches of 32 fit. 32K tokens keep
# a group's matmuls large (prefill's MFU is flat from a few thousand tokens).
PREFILL_MAX_TOKENS = 32768


def prefill_batch(graphdef, params, ids_bt: np.ndarray, lengths_b, cache: KVCache, impl: str = "auto", mm=None):
    """`prefill`, in groups of rows of at most PREFILL_MAX_TOKENS tokens each when the batch is larger (one
    compiled program for every group: the last group ends at the last row, re-running rows of the one before,
    which write what they wrote). Prompts with soft tokens (`mm`) run in one call."""
    b, t = ids_bt.shape
    rows = max(1, PREFILL_MAX_TOKENS // t)
    if mm is not None or rows >= b:
        return prefill(graphdef, params, jnp.asarray(ids_bt), lengths_b, cache, impl=impl, mm=mm)
    starts = list(range(0, b - rows, rows)) + [b - rows]
    parts, done = [], 0
    for r0 in starts:
        logits, cache = prefill_rows(graphdef, params, jnp.asarray(ids_bt[r0:r0 + rows]), lengths_b[r0:r0 + rows],
                                     cache, jnp.asarray(r0, jnp.int32), impl=impl)
        parts.append(logits[done - r0:])
        done = r0 + rows
    return jnp.concatenate(parts), cache


@program(static_argnums=0, static_argnames="impl", donate_argnums=(5,))
def extend(graphdef, params, ids_bt, start_b, lengths_b, cache: KVCache, impl: str = "auto"):
    """Run chunks [B,T] (true lengths [B]) that continue the cache's sequences from positions `start` [B] (a
    prompt after its shared prefix); store them; return each chunk's last-token logits [B,V]."""
    model = merge(graphdef, params)
    pos = start_b[:, None] + jnp.arange(ids_bt.shape[1], dtype=jnp.int32)[None, :]
    attender = ExtendAttender(cache, pos, lengths_b, impl)
    x = model.decode_layers(ids_bt, pos, attender)
    last = jnp.take_along_axis(x, (lengths_b - 1)[:, None, None], axis=1)
    return model.head(last)[:, 0], attender.cache


def decode_step(model, cache: KVCache, token_b, pos_b, impl: str = "auto"):
    """One token per sequence at positions [B]: logits [B,V] and the updated cache. One sequence may run its layers
    on copies of its row (`dispatch.stream_rows`: XLA fuses a norm of two rows into one kernel, of one row into
    two); the attender writes and reads the cache for the real row only, and the head reads row 0."""
    b = token_b.shape[0]
    rows = dispatch.stream_rows(b, model.cfg.num_experts > 0)
    attender = DecodeAttender(cache, pos_b[:, None], impl)
    x = model.decode_layers(jnp.broadcast_to(token_b, (rows,))[:, None], jnp.broadcast_to(pos_b, (rows,))[:, None],
                            attender)
    return model.head(x[:b])[:, 0], attender.cache


@functools.partial(jax.jit, static_argnums=0, static_argnames="impl", donate_argnums=(2,))
def decode_logits(graphdef, params, cache: KVCache, token_b, pos_b, impl: str = "auto"):
    """Jitted `decode_step` (for tests and teacher-forced scoring)."""
    return decode_step(merge(graphdef, params), cache, token_b, pos_b, impl)


# Decode steps per compiled chunk: the host (streaming) or the device's loop condition (otherwise) looks at the state
# (all stopped? the limit?) once per chunk, never between the steps of one.
DECODE_CHUNK = 16


@program(static_argnums=(0, 5, 6, 7, 8), donate_argnums=(2,), decode=True)
def decode_chunk(graphdef, params, state: DecodeState, limit, stop_ids, sampling: Sampling, impl: str = "auto",
                 steps: int = DECODE_CHUNK, until_done: bool = False) -> DecodeState:
    """`steps` decode steps as a loop with a trip count known when compiling, so no step waits for the host; with
    `until_done`, such chunks again and again until every sequence stopped or `limit` tokens exist.

    A loop whose condition reads the device makes the GPU runtime copy the condition to the host and wait for it
    before it launches the next iteration. Inside a chunk nothing does; `until_done` pays that round trip once per
    chunk, and one call generates everything (a call per chunk from Python costs more on the GPU: the host
    waits for the chunk, then dispatches the next with every parameter as an argument, while the device idles —
    docs/performance.md). Steps from `limit` on are idle: they feed the same token at the same position again (the
    cache write repeats itself) and change nothing the caller reads.
    """
    model = merge(graphdef, params)

    def body(st, _):
        logits, cache = decode_step(model, st.cache, st.token, st.pos, impl)
        live = st.step < limit
        tok = sample(logits, jax.random.fold_in(st.key, st.step), sampling)
        tok = jnp.where(st.done, 0, tok)
        col = jnp.minimum(st.step, st.out.shape[1] - 1)
        out = st.out.at[:, col].set(jnp.where(live, tok, st.out[:, col]))
        done = st.done | (live & jnp.isin(tok, stop_ids))
        n = live.astype(jnp.int32)
        return DecodeState(cache, jnp.where(live, tok, st.token), st.pos + n, done, out, st.step + n, st.key), None

    def chunk(st):
        return jax.lax.scan(body, st, None, length=steps)[0]

    if not until_done:
        return chunk(state)
    return jax.lax.while_loop(lambda st: (st.step < limit) & ~jnp.all(st.done), chunk, state)


@program(static_argnums=(3, 4))
def _first_token(logits_bv, key, stop_ids, sampling: Sampling, n_out: int):
    """The first new token [B] (sampled from the prefill's logits), whether it stops [B], and the output buffer
    [B, n_out] that holds it: one program (each eager op would be one more program to look up before the first
    token shows)."""
    tok = sample(logits_bv, jax.random.fold_in(key, 0), sampling)
    return tok, jnp.isin(tok, stop_ids), jnp.zeros((tok.shape[0], n_out), jnp.int32).at[:, 0].set(tok)


def generate_tokens(graphdef, params, cfg, prompts: list[list[int]], *, max_new_tokens: int, context: int,
                    dtype, sampling: Sampling, seed: int, stop_ids: tuple[int, ...],
                    on_tokens: Callable[[np.ndarray], None] | None = None, chunk: int = 8,
                    pipeline=None, impl: str = "auto", soft_tokens=None,
                    timings: dict | None = None) -> list[list[int]]:
    """Generate for a batch of prompts of any lengths; returns the new tokens of each.

    A sequence ends after its first stop token (kept as its last element). `on_tokens`, when given,
    receives each newly decoded block [B, n] as soon as it is on the host (streaming); decoding then
    runs in compiled chunks of `chunk` tokens instead of one loop. With a `pipeline.Pipeline`, the
    prompts are micro-batched through its stages and decoded in its ring (streamed a ring call of `chunk` tokens
    at a time).
    `soft_tokens(t) -> model.Multimodal` (mask and blocks [B, t] for the prompts right-padded to t tokens)
    merges image and audio features into the prompts. `timings`, when given, receives `prefill_s` (prefill and
    the first token) and `decode_s` (the other tokens), each timed on its own after the device finished the
    step before: never negative, unlike a difference of two generations.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_context([len(p) for p in prompts], max_new_tokens, context)
    longest = max(len(p) for p in prompts)
    b = len(prompts)
    t = min(bucket(longest), context)
    max_len = min(bucket(longest + max_new_tokens), context)
    ids = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    key = jax.random.key(seed)

    if pipeline is not None:
        result = pipeline.generate(prompts, max_new_tokens=max_new_tokens, max_len=max_len, t=t, sampling=sampling,
                                   seed=seed, stop_ids=stop_ids,
                                   mm=soft_tokens(t) if soft_tokens is not None else None, timings=timings,
                                   on_tokens=on_tokens, chunk=chunk)
        return _trim(result, max_new_tokens, stop_ids)
    cache = init_cache(cfg, b, max_len, dtype)
    mm = soft_tokens(t) if soft_tokens is not None else None
    t0 = time.perf_counter()
    logits, cache = prefill_batch(graphdef, params, ids, lengths, cache, impl=impl, mm=mm)
    tok, done, out = _first_token(logits, key, stops, sampling, bucket(max_new_tokens, 8))
    if timings is not None:
        jax.block_until_ready(tok)
        t1 = time.perf_counter()
        timings["prefill_s"] = t1 - t0
    if on_tokens is not None:  # shown before anything of the decode is set up
        on_tokens(np.asarray(tok)[:, None])
    state = DecodeState(cache, tok, lengths, done, out, jnp.asarray(1, jnp.int32), key)
    # Decode in compiled chunks of `steps` tokens: the device loops over them (one call) unless tokens stream; then
    # the host takes each chunk's tokens and decides whether to go on.
    steps = chunk if on_tokens is not None else min(DECODE_CHUNK, bucket(max_new_tokens - 1, 1))
    limit = jnp.asarray(max_new_tokens, jnp.int32)
    if on_tokens is None:
        if max_new_tokens > 1:
            state = decode_chunk(graphdef, params, state, limit, stops, sampling, impl, steps, True)
    else:
        shown, done = 1, bool(np.all(np.asarray(done)))
        while shown < max_new_tokens and not done:
            state = decode_chunk(graphdef, params, state, limit, stops, sampling, impl, steps)
            step, done = int(state.step), bool(np.all(np.asarray(state.done)))
            on_tokens(np.asarray(state.out[:, shown:step]))
            shown = step
    result = np.asarray(state.out)
    if timings is not None:
        timings["decode_s"] = time.perf_counter() - t1  # the transfer of `out` above waited for the device
    return _trim(result[:, :int(state.step)], max_new_tokens, stop_ids)


def _trim(result: np.ndarray, max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row cut after its first stop token and at `max_new_tokens`."""
    outputs = []
    for row in result:
        row = row.tolist()
        if stop_ids:
            for i, x in enumerate(row):
                if x in stop_ids:
                    row = row[: i + 1]
                    break
        outputs.append(row[:max_new_tokens])
    return outputs
