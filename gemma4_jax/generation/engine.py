"""Continuous batching: a fixed number of decode slots, each sequence in one until it ends, then the next prompt.

Static batches (`loop.generate_tokens`) run until their longest answer ends: the slots of answers that ended
early decode nothing useful. Here `slots` sequences decode together; after every chunk of `chunk` steps the host
looks at which ended (a stop token, or their own token limit), takes their tokens, and prefills the next prompts
into those slots (each prompt alone, batch 1, into a fresh one-row cache that replaces the slot's row;
`loop.extend` is the only prefill program) while the other slots keep their state. Every slot has its own
position, step count and limit, so prompts and answers of any lengths share one compiled decode program.

Greedy decoding gives the tokens `generate` gives for the same prompt (each row of a decode step is computed on
its own: masks come from each slot's positions). With sampling, each sequence draws from its own key
(`seed` folded with the prompt's index), so samples differ from those of a static batch.

With `shared_prefix`, the tokens every prompt begins with (a few-shot block) are prefilled once; each prompt's
cache row starts as a copy of that one and only its own tokens are computed (`loop.extend`: they attend over the
prefix's cache, ring buffers included).

With a pipeline (pp > 1) the slots are the rows of its decode ring (`_RingSlots`): the host gives each row its
latest token, position and token budget for a call of the ring, new prompts are prefilled together through the
stages (after the shared prefix: GPipe's `extend` mode) and their cache rows moved into free slots.

The whole job shares one cache length: the longest prompt plus its limit, rounded up as `generate` rounds it.
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
from .cache import KVCache, init_cache, put_rows
from .loop import DecodeState, bucket, decode_step, extend, sample
from .options import Sampling, check_context
from .programs import program

PIECE_MIN = 256
"""The fewest tokens a one-row piece (`_LocalSlots._piece`) is padded to: a batch-1 forward of a few hundred
tokens costs what one of 16 costs on a GPU (the weights' read), while each further length is another
whole-model program to compile (20-40 s on an H200 for E4B). With GSM8K's questions (after the shared prefix)
this leaves one or two lengths instead of four."""

PREFILL_CHUNK = PIECE_MIN
"""The default longest piece of a prompt prefilled between two decode chunks: PIECE_MIN, so that every piece, the
shared prefix's included, is one length and the engine compiles one `extend` program (with pieces of 512, GSM8K's
8-shot prompts took two: the prefix's 512-token pieces and the questions' 256)."""


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
    cache = put_rows(state.cache, one, slot)
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
              stats: dict | None = None, pipeline=None, prefill_chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    """The new tokens of every prompt (prompt i gets at most `limits[i]`, ends after its first stop token, kept),
    decoded `slots` at a time with continuous batching. `on_done(i, tokens)` is called as each one ends.
    `stats`, when given, receives `prefix_tokens` and `prefill_tokens` (prompt tokens computed) beside
    `prompt_tokens` (what prefilling every prompt whole computes). With a `pipeline.Pipeline`, the slots are its
    ring's rows (`_RingSlots`). A prompt longer than `prefill_chunk` tokens (after the shared prefix) is prefilled
    in pieces of that many, one before each decode chunk (each call of the ring) of the other slots, so that a long
    prompt does not stall them."""
    n = len(prompts)
    if len(limits) != n:
        raise ConfigError(f"{n} prompts but {len(limits)} token limits")
    if slots < 1 or chunk < 1 or prefill_chunk < 1:
        raise ConfigError("slots, chunk and prefill_chunk must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if any(m < 1 for m in limits):
        raise ConfigError("every token limit must be at least 1")
    if not n:
        return []
    slots = min(slots, n)  # a slot without a prompt would only cost memory and time
    check_context([len(p) for p in prompts], limits, context)
    longest = max(len(p) + m for p, m in zip(prompts, limits, strict=True))
    max_len = min(bucket(longest), context)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    job = dict(prompts=prompts, limits=limits, slots=slots, max_len=max_len, context=context, sampling=sampling,
               base=jax.random.key(seed), stops=stops, stop_ids=stop_ids, chunk=chunk)
    shared = common_prefix(prompts) if shared_prefix else 0
    if pipeline is not None:
        backend = _RingSlots(pipeline, shared=shared, piece=prefill_chunk, **job)
    else:
        backend = _LocalSlots(graphdef, params, cfg, dtype, impl, shared=shared, piece=prefill_chunk, **job)
    if stats is not None:
        stats.update(prefix_tokens=shared, prompt_tokens=sum(map(len, prompts)),
                     prefill_tokens=shared + sum(len(p) - shared for p in prompts))

    pending = collections.deque(range(n))
    held: list[int | None] = [None] * backend.slots  # the prompt each slot decodes
    results: list[list[int] | None] = [None] * n
    while pending or any(i is not None for i in held):
        free = [s for s in range(backend.slots) if held[s] is None][:len(pending)]
        if free:
            taken = [(s, pending.popleft()) for s in free]
            backend.fill(taken)
            for s, i in taken:
                held[s] = i
        for s, tokens in backend.advance([i is not None for i in held]):
            i, held[s] = held[s], None
            results[i] = _cut(tokens, stop_ids)
            if on_done is not None:
                on_done(i, results[i])
    return results


class _LocalSlots:
    """The slots at pp = 1: one `SlotState` on the device, `slots_chunk` decodes them, each new prompt is prefilled
    alone into a one-row cache that replaces its slot's row (its shared prefix copied, the rest `extend`ed)."""

    def __init__(self, graphdef, params, cfg, dtype, impl, *, prompts, limits, slots, max_len, context, sampling,
                 base, stops, stop_ids, chunk, shared, piece):
        self.graphdef, self.params, self.cfg, self.dtype, self.impl = graphdef, params, cfg, dtype, impl
        self.prompts, self.limits, self.slots, self.max_len, self.context = prompts, limits, slots, max_len, context
        self.sampling, self.base, self.stops, self.chunk, self.shared = sampling, base, stops, chunk, shared
        self.piece = piece
        self.filling: dict[int, tuple] = {}  # slot -> (prompt, its tokens in the cache, the one-row cache)
        width = bucket(max(limits), 8)
        self.state = SlotState(init_cache(cfg, slots, max_len, dtype), jnp.zeros((slots,), jnp.int32),
                               jnp.zeros((slots,), jnp.int32), jnp.ones((slots,), bool),
                               jnp.zeros((slots, width), jnp.int32), jnp.zeros((slots,), jnp.int32),
                               jax.random.split(base, slots), jnp.ones((slots,), jnp.int32))
        if shared:  # in pieces, through the program the prompts' pieces use: no prefill program to compile
            self.prefix_cache = None
            for start in range(0, shared, piece):
                _, self.prefix_cache = self._piece(prompts[0][start:min(shared, start + piece)], start,
                                                   self.prefix_cache)

    def _piece(self, ids: Sequence[int], start: int, one):
        """Tokens `ids` at positions start… into the one-row cache `one` (None: a fresh cache, start 0; else
        donated), through `extend` (from a fresh cache it is a prefill), padded to at least PIECE_MIN tokens:
        (last-token logits [1, V], the cache)."""
        x = np.zeros((1, min(bucket(len(ids), PIECE_MIN), self.context)), np.int32)
        x[0, :len(ids)] = ids
        if one is None:
            one = init_cache(self.cfg, 1, self.max_len, self.dtype)
        return extend(self.graphdef, self.params, jnp.asarray(x), jnp.asarray([start], jnp.int32),
                      jnp.asarray([len(ids)], jnp.int32), one, impl=self.impl)

    def _prefill_step(self, s: int) -> None:
        """The next piece of slot s's prompt; after the last, the prompt goes into its slot."""
        i, done_to, one = self.filling[s]
        p = self.prompts[i]
        stop = min(len(p), done_to + self.piece)
        if one is None and self.shared:
            one = _copy(self.prefix_cache)  # extend donates its cache: the prefix's stays
        logits, one = self._piece(p[done_to:stop], done_to, one)
        if stop < len(p):
            self.filling[s] = (i, stop, one)
            return
        del self.filling[s]
        self.state = _insert(self.state, one, logits, jnp.int32(s), jnp.int32(len(p)), jnp.int32(self.limits[i]),
                             self.stops, jax.random.fold_in(self.base, i), self.sampling)

    def fill(self, taken: list[tuple[int, int]]) -> None:
        """Start the prompts' prefills: a prompt of up to `piece` tokens (after the shared prefix) is prefilled
        now, a longer one's first piece now and one more piece before each later decode chunk."""
        for s, i in taken:
            self.filling[s] = (i, self.shared, None)
            self._prefill_step(s)

    def advance(self, busy: list[bool]) -> list[tuple[int, list[int]]]:
        """The next piece of every prompt still prefilling, then a chunk of decode steps (none when no busy slot
        is decoding); the busy slots that ended, with their tokens."""
        for s in list(self.filling):
            self._prefill_step(s)
        done = np.asarray(self.state.done)
        if not all(done[s] for s in range(self.slots) if busy[s]):
            self.state = slots_chunk(self.graphdef, self.params, self.state, self.stops, self.sampling, self.impl,
                                     self.chunk)
            done = np.asarray(self.state.done)
        ended = [s for s in range(self.slots) if busy[s] and done[s] and s not in self.filling]
        if not ended:
            return []
        step, out = np.asarray(self.state.step), np.asarray(self.state.out)
        return [(s, out[s, :step[s]].tolist()) for s in ended]


class _RingSlots:
    """The slots at pp > 1: the rows of the pipeline's ring (M micro-batches of b rows, M = the stage count
    when there are enough slots, so every stage is busy every tick). The host keeps each row's latest token,
    position, tokens so far and what is left of its limit; a call of the ring decodes up to `chunk` tokens of
    every live row. New prompts are prefilled together through the stages (GPipe) and their cache rows moved
    into their slots' rows."""

    def __init__(self, pipeline, *, prompts, limits, slots, max_len, context, sampling, base, stops, stop_ids,
                 chunk, shared, piece):
        self.pipe, self.prompts, self.limits, self.max_len, self.context = pipeline, prompts, limits, max_len, context
        self.sampling, self.base, self.stops, self.stop_ids = sampling, base, stops, set(stop_ids)
        self.m = pipeline.micro_batches(slots)
        self.per = -(-slots // self.m)
        self.slots = self.m * self.per
        self.width = bucket(chunk + 1, 8)
        self.chunk = self.width - 1  # a compiled ring's width holds the latest token and this many new ones
        self.cache = pipeline.init_cache(self.m, self.per, max_len)
        self.tok = np.zeros(self.slots, np.int32)
        self.pos = np.zeros(self.slots, np.int32)
        self.left = np.zeros(self.slots, np.int32)  # tokens a live row may still get; 0: ended or free
        self.got: list[list[int]] = [[] for _ in range(self.slots)]
        self.ring_key, self.calls = jax.random.fold_in(base, len(prompts)), 0  # prompts' keys fold in 0 … n − 1
        self.shared, self.piece = shared, piece
        self.filling: dict[int, tuple] = {}  # slot -> (prompt, its tokens in the cache, its one-row cache)
        if shared:  # the prefix's one-row cache: each new prompt's rows start as copies of it
            _, self.prefix = pipeline.prefill([prompts[0][:shared]], max_len=max_len,
                                              t=min(bucket(shared), context))

    def _start(self, taken: list[tuple[int, int]], last, rows, per: int) -> None:
        """Prompts whose whole prefill is in `rows` (prompt j at row j of micro-batch-major order, last-token
        logits `last`) into their slots: the cache rows moved, the first tokens sampled."""
        keys = jnp.stack([jax.random.fold_in(self.base, i) for _, i in taken])
        first = np.asarray(_sample_rows(last.reshape(-1, last.shape[-1])[:len(taken)], keys,
                                        jnp.zeros((len(taken),), jnp.int32), self.sampling))
        self.cache = self.pipe.move_rows(self.cache, rows, [(j // per, j % per) for j in range(len(taken))],
                                         [(s // self.per, s % self.per) for s, _ in taken])
        for (s, i), tok in zip(taken, first.tolist(), strict=True):
            self.tok[s], self.pos[s], self.got[s] = tok, len(self.prompts[i]), [tok]
            self.left[s] = 0 if tok in self.stop_ids else self.limits[i] - 1

    def _prefill_step(self, s: int) -> None:
        """The next piece of slot s's long prompt (a one-row cache of its own); after the last, into its slot."""
        i, done_to, rows = self.filling[s]
        p = self.prompts[i]
        stop = min(len(p), done_to + self.piece)
        piece = [p[done_to:stop]]
        t = min(bucket(len(piece[0])), self.context)
        if rows is not None:
            last, rows = self.pipe.prefill(piece, max_len=self.max_len, t=t, into=(rows, done_to))
        else:
            last, rows = self.pipe.prefill(piece, max_len=self.max_len, t=t,
                                           after=(self.prefix, self.shared) if self.shared else None)
        if stop < len(p):
            self.filling[s] = (i, stop, rows)
            return
        del self.filling[s]
        self._start([(s, i)], last, rows, 1)

    def fill(self, taken: list[tuple[int, int]]) -> None:
        """Prompts of up to `piece` tokens (after the shared prefix) are prefilled together now; a longer one
        piece by piece, its first piece now and one more before each later call of the ring."""
        long = [(s, i) for s, i in taken if len(self.prompts[i]) - self.shared > self.piece]
        for s, i in long:
            self.filling[s] = (i, self.shared, None)
            self._prefill_step(s)
        taken = [x for x in taken if x not in long]
        if not taken:
            return
        ps = [self.prompts[i][self.shared:] for _, i in taken]
        ps += [ps[-1]] * (bucket(len(ps), 1) - len(ps))  # a power of two of rows: few programs to compile
        t = min(bucket(max(map(len, ps))), self.context)
        last, rows = self.pipe.prefill(ps, max_len=self.max_len, t=t,
                                       after=(self.prefix, self.shared) if self.shared else None)
        self._start(taken, last, rows, last.shape[1])

    def advance(self, busy: list[bool]) -> list[tuple[int, list[int]]]:
        """The next piece of every long prompt still prefilling, then a call of the ring for the live rows; the
        busy slots that ended, with their tokens."""
        for s in list(self.filling):
            self._prefill_step(s)
        live = np.asarray(busy) & (self.left > 0)
        if live.any():
            want = np.where(live, np.minimum(self.left, self.chunk), 0).astype(np.int32)
            shape = (self.m, self.per)
            out, _, self.cache = self.pipe.decode(self.cache, self.tok.reshape(shape), self.pos.reshape(shape),
                                                  want.reshape(shape), sampling=self.sampling, stops=self.stops,
                                                  key=jax.random.fold_in(self.ring_key, self.calls),
                                                  width=self.width)
            self.calls += 1
            out = np.asarray(out).reshape(self.slots, self.width)
            for s in np.flatnonzero(live):
                new = out[s, 1:1 + want[s]].tolist()
                stop = next((j for j, x in enumerate(new) if x in self.stop_ids), None)
                if stop is not None:
                    new = new[:stop + 1]
                self.got[s] += new
                self.tok[s], self.pos[s] = new[-1], self.pos[s] + len(new)
                self.left[s] = 0 if stop is not None else self.left[s] - len(new)
        return [(s, self.got[s]) for s in range(self.slots)
                if busy[s] and self.left[s] == 0 and s not in self.filling]


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
