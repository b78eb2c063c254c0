"""Continuous batching: a fixed number of decode slots, each sequence in one until it ends, then the next prompt.

Static batches (`loop.generate_tokens`) run until their longest answer ends: the slots of answers that ended
early decode nothing useful. Here `slots` sequences decode together; after every chunk of `chunk` steps the host
looks at which ended (a stop token, or their own token limit), takes their tokens, and prefills the next prompts
into those slots (each prompt alone, batch 1, into a fresh one-row cache that replaces the slot's row) while the
other slots keep their state. Every slot has its own position, step count and limit, so prompts and answers of
any lengths share one compiled decode program.

Greedy decoding gives the tokens `generate` gives for the same prompt (each row of a decode step is computed on
its own: masks come from each slot's positions). With sampling, each sequence draws from its own key
(`seed` folded with the prompt's index), so samples differ from those of a static batch.

With `shared_prefix`, the tokens every prompt begins with (a few-shot block) are prefilled once; each prompt's
cache row starts as a copy of that one and only its own tokens are computed (`loop.extend`: they attend over the
prefix's cache, ring buffers included).

pp = 1 only (the pipeline's ring has its own batch). The whole job shares one cache length: the longest prompt
plus its limit, rounded up as `generate` rounds it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..model.text import merge
from .cache import KVCache, init_cache
from .loop import DecodeState, bucket, decode_step, extend, prefill, sample
from .options import Sampling
from .programs import program


@jax.tree_util.register_dataclass
@dataclass
class SlotState(DecodeState):
    """`loop.DecodeState` with every field per slot (donated between calls): step [S] the slot's tokens so far,
    key [S] its PRNG key, done [S] its sequence ended (or the slot is free), and limit [S] its token limit."""

    limit: jax.Array


def _sample_rows(logits_sv, keys_s, step_s, sampling: Sampling):
    """One token per slot, each from its own key folded with its step (greedy: the argmax, keys unused)."""
    if sampling.temperature == 0.0:
        return sample(logits_sv, keys_s[0], sampling)
    return jax.vmap(lambda lg, k, n: sample(lg[None], jax.random.fold_in(k, n), sampling)[0])(
        logits_sv, keys_s, step_s)


@program(static_argnums=(0, 4, 5, 6), donate_argnums=(2,), decode=True)
def slots_chunk(graphdef, params, state: SlotState, stop_ids, sampling: Sampling, impl: str = "auto",
                steps: int = 8) -> SlotState:
    """`steps` decode steps of every slot; a slot whose sequence ended keeps its state (its row still computes,
    and writes nothing anyone reads)."""
    model = merge(graphdef, params)
    rows = jnp.arange(state.token.shape[0])

    def body(st: SlotState, _):
        logits, cache = decode_step(model, st.cache, st.token, st.pos, impl)
        live = ~st.done
        tok = _sample_rows(logits, st.key, st.step, sampling)
        col = jnp.minimum(st.step, st.out.shape[1] - 1)
        out = st.out.at[rows, col].set(jnp.where(live, tok, st.out[rows, col]))
        n = live.astype(jnp.int32)
        done = st.done | (live & (jnp.isin(tok, stop_ids) | (st.step + 1 >= st.limit)))
        return SlotState(cache, jnp.where(live, tok, st.token), st.pos + n, done, out, st.step + n, st.key,
                         st.limit), None

    return jax.lax.scan(body, state, None, length=steps)[0]


@program(static_argnums=(8,), donate_argnums=(0,))
def _insert(state: SlotState, one: KVCache, logits_1v, slot, length, limit, stop_ids, key, sampling: Sampling):
    """A prefilled prompt into slot `slot`: its cache row, its first token (sampled as `generate` samples it),
    position, step 1 and limit."""
    tok = _sample_rows(logits_1v, key[None], jnp.zeros((1,), jnp.int32), sampling)[0]
    cache = jax.tree.map(lambda big, row: jax.lax.dynamic_update_index_in_dim(big, row[0], slot, 0), state.cache, one)
    out = state.out.at[slot].set(jnp.zeros_like(state.out[slot]).at[0].set(tok))
    ended = jnp.isin(tok, stop_ids) | (limit <= 1)
    return SlotState(cache, state.token.at[slot].set(tok), state.pos.at[slot].set(length),
                     state.done.at[slot].set(ended), out, state.step.at[slot].set(1), state.key.at[slot].set(key),
                     state.limit.at[slot].set(limit))


@jax.jit
def _copy(tree):
    """A fresh copy of every array of `tree` (one program, not one per array)."""
    return jax.tree.map(jnp.copy, tree)


def run_slots(graphdef, params, cfg, prompts: Sequence[Sequence[int]], limits: Sequence[int], *, slots: int,
              context: int, dtype, sampling: Sampling, seed: int, stop_ids: tuple[int, ...], impl: str = "auto",
              chunk: int = 8, on_done: Callable[[int, list[int]], None] | None = None, shared_prefix: bool = False,
              stats: dict | None = None) -> list[list[int]]:
    """The new tokens of every prompt (prompt i gets at most `limits[i]`, ends after its first stop token, kept),
    decoded `slots` at a time with continuous batching. `on_done(i, tokens)` is called as each one ends.
    `stats`, when given, receives `prefix_tokens` and `prefill_tokens` (prompt tokens computed) beside
    `prompt_tokens` (what prefilling every prompt whole computes)."""
    n = len(prompts)
    if len(limits) != n:
        raise ConfigError(f"{n} prompts but {len(limits)} token limits")
    if slots < 1 or chunk < 1:
        raise ConfigError("slots and chunk must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if any(m < 1 for m in limits):
        raise ConfigError("every token limit must be at least 1")
    if not n:
        return []
    longest = max(len(p) + m for p, m in zip(prompts, limits, strict=True))
    if longest > context:
        raise ConfigError(f"a prompt plus its new tokens ({longest}) exceeds the context of {context}")
    max_len = min(bucket(longest), context)
    width = bucket(max(limits), 8)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    base = jax.random.key(seed)
    state = SlotState(init_cache(cfg, slots, max_len, dtype), jnp.zeros((slots,), jnp.int32),
                      jnp.zeros((slots,), jnp.int32), jnp.ones((slots,), bool), jnp.zeros((slots, width), jnp.int32),
                      jnp.zeros((slots,), jnp.int32), jax.random.split(base, slots), jnp.ones((slots,), jnp.int32))
    shared = common_prefix(prompts) if shared_prefix else 0
    if shared:
        ids = np.zeros((1, min(bucket(shared), context)), np.int32)
        ids[0, :shared] = prompts[0][:shared]
        _, prefix_cache = prefill(graphdef, params, jnp.asarray(ids), jnp.asarray([shared], jnp.int32),
                                  init_cache(cfg, 1, max_len, dtype), impl=impl)
    if stats is not None:
        stats.update(prefix_tokens=shared, prompt_tokens=sum(map(len, prompts)),
                     prefill_tokens=shared + sum(len(p) - shared for p in prompts))

    def prefill_one(p: Sequence[int]):
        """Last-token logits [1,V] and the one-row cache of prompt p (its shared prefix copied, not computed)."""
        rest = p[shared:]
        ids = np.zeros((1, min(bucket(len(rest)), context)), np.int32)
        ids[0, :len(rest)] = rest
        if shared:
            one = _copy(prefix_cache)  # extend donates its cache: the prefix's stays
            return extend(graphdef, params, jnp.asarray(ids), jnp.asarray([shared], jnp.int32),
                          jnp.asarray([len(rest)], jnp.int32), one, impl=impl)
        return prefill(graphdef, params, jnp.asarray(ids), jnp.asarray([len(rest)], jnp.int32),
                       init_cache(cfg, 1, max_len, dtype), impl=impl)

    pending = collections.deque(range(n))
    held: list[int | None] = [None] * slots  # the prompt each slot decodes
    results: list[list[int] | None] = [None] * n

    def harvest(done: np.ndarray, step: np.ndarray, out: np.ndarray) -> None:
        for s, i in enumerate(held):
            if i is not None and done[s]:
                results[i] = out[s, :step[s]].tolist()
                held[s] = None
                if on_done is not None:
                    on_done(i, _cut(results[i], stop_ids))

    while pending or any(i is not None for i in held):
        for s in range(slots):
            if held[s] is None and pending:
                i = pending.popleft()
                logits, one = prefill_one(prompts[i])
                state = _insert(state, one, logits, jnp.int32(s), jnp.int32(len(prompts[i])), jnp.int32(limits[i]),
                                stops, jax.random.fold_in(base, i), sampling)
                held[s] = i
        done, step = np.asarray(state.done), np.asarray(state.step)
        if all(i is None or done[s] for s, i in enumerate(held)):  # every held sequence ended at its first token
            harvest(done, step, np.asarray(state.out))
            continue
        state = slots_chunk(graphdef, params, state, stops, sampling, impl, chunk)
        done, step = np.asarray(state.done), np.asarray(state.step)
        if any(i is not None and done[s] for s, i in enumerate(held)):
            harvest(done, step, np.asarray(state.out))
    return [_cut(r, stop_ids) for r in results]


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one of its own (0 for a single prompt)."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _cut(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    for j, x in enumerate(tokens):
        if x in stop_ids:
            return tokens[:j + 1]
    return tokens
