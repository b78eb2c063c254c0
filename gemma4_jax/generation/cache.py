"""The KV cache: ring buffers for sliding layers, full-length buffers for full layers.

Owns the cache pytree, how prefill fills it (prompts of different lengths in one batch), how a
decode step appends one token per sequence, and the attention over it. Only layers that compute
K/V own an entry; KV-shared layers read their source layer's entry and write nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..config import Gemma4Config
from ..kernels import dispatch
from ..model.text import (
    Attender,
    FullAttender,
    Keys,
    Queries,
    attention,
    attention_impl,
    attention_mask,
    kernel_attention,
    takes_new_key,
)
from .programs import program


@jax.tree_util.register_dataclass
@dataclass
class LayerCache:
    """One KV-owning layer's cache.

    k, v:  [B, S, K, H] — S is the sliding window W (ring buffer, slot = position mod W) on sliding
           layers and the maximum length on full layers (slot = position).
    pos:   [B, S] int32 — the position held in each slot, −1 where empty (masked out).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """{source layer index (as str): LayerCache}; donated to the decode step."""

    layers: dict[str, LayerCache]


def cache_length(cfg: Gemma4Config, layer: int, max_len: int) -> int:
    spec = cfg.layers[layer]
    return min(spec.window, max_len) if spec.window is not None else max_len


@program(static_argnums=(0, 1, 2, 3))
def init_cache(cfg: Gemma4Config, batch: int, max_len: int, dtype) -> KVCache:
    """An empty cache (one compiled program, not one per buffer shape: each is a lookup before the first token)."""
    layers = {}
    for spec in cfg.layers:
        if spec.owns_kv:
            s = cache_length(cfg, spec.index, max_len)
            shape = (batch, s, spec.num_kv_heads, spec.head_dim)
            layers[str(spec.index)] = LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                                 jnp.full((batch, s), -1, jnp.int32))
    return KVCache(layers)


def take_rows(cache: KVCache, row0, n: int) -> KVCache:
    """Rows row0 .. row0+n−1 of every entry (`row0` may be traced)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, row0, n, 0), cache)


def put_rows(cache: KVCache, rows: KVCache, row0) -> KVCache:
    """`cache` with its rows from row0 on replaced by `rows` (`row0` may be traced; in place under donation)."""
    return jax.tree.map(lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, row0, 0), cache, rows)


class PrefillAttender(FullAttender):
    """Prefill: attend over the prompt itself, then store each KV layer's entries into the cache.

    `lengths` [B] are the true prompt lengths; tokens past them are padding and never stored.
    """

    def __init__(self, cache: KVCache, pos_bt: jax.Array, lengths_b: jax.Array, impl: str = "auto",
                 blocks_bt: jax.Array | None = None):
        valid = pos_bt < lengths_b[:, None]
        super().__init__(pos_bt, valid, impl, blocks_bt)
        self.cache, self.lengths = KVCache(dict(cache.layers)), lengths_b

    def __call__(self, spec, q, kv):
        out = super().__call__(spec, q, kv)
        if kv is not None:
            key = str(spec.index)
            self.cache.layers[key] = store_prompt(self.cache.layers[key], *kv, self.pos, self.lengths)
        return out


class ExtendAttender(Attender):
    """A chunk of tokens per sequence at positions `pos` [B,T] that continue what the cache holds (a prompt after
    its shared prefix): each layer attends over the cache's keys and the chunk's own, then stores the chunk.

    `lengths` [B]: the chunk's true lengths (tokens past them are padding: never attended, never stored). XLA
    attention over the concatenated keys, masked by positions (empty slots −1, windows); a ring buffer takes only
    the chunk's latest positions, after the chunk attended to what they replace.
    """

    def __init__(self, cache: KVCache, pos_bt: jax.Array, lengths_b: jax.Array, impl: str = "auto"):
        self.cache, self.pos, self.impl = KVCache(dict(cache.layers)), pos_bt, impl
        self.lengths = lengths_b
        self.valid = jnp.arange(pos_bt.shape[1], dtype=jnp.int32)[None, :] < lengths_b[:, None]
        self.keys: dict[int, tuple] = {}  # source layer -> (k, v, key positions) over the cache and the chunk

    def take(self, layer: int, kv) -> None:
        """A KV-owning layer's chunk K/V: its keys are the cache's and the chunk's; the chunk is stored."""
        entry = self.cache.layers[str(layer)]
        k_pos = jnp.concatenate([entry.pos, jnp.where(self.valid, self.pos, -1)], axis=1)
        self.keys[layer] = (jnp.concatenate([entry.k, kv[0].astype(entry.k.dtype)], axis=1),
                            jnp.concatenate([entry.v, kv[1].astype(entry.v.dtype)], axis=1), k_pos)
        self.cache.layers[str(layer)] = store_chunk(entry, *kv, self.pos[:, 0], self.lengths)

    def attend(self, spec, q):
        k, v, k_pos = self.keys[spec.kv_source]
        return attention(q, k, v, attention_mask(self.pos, k_pos, spec.window, k_pos >= 0))

    def __call__(self, spec, q, kv):
        if kv is not None:
            self.take(spec.index, kv)
        return self.attend(spec, q)


def store_chunk(entry: LayerCache, k_btkh, v_btkh, start_b, lengths_b) -> LayerCache:
    """Store a chunk's K/V [B,T,K,H] (positions start..start+length−1) into a layer's cache: slot j takes the
    latest chunk position p ≡ j (mod S), if any; the other slots keep what they hold."""
    t = k_btkh.shape[1]
    s = entry.k.shape[1]
    j = jnp.arange(s, dtype=jnp.int32)[None, :]
    last = (start_b + lengths_b - 1)[:, None]
    p = j + s * jnp.floor_divide(last - j, s)  # [B,S]: the latest position ≤ last held by slot j
    ok = (p >= start_b[:, None]) & (lengths_b[:, None] > 0)
    src = jnp.clip(p - start_b[:, None], 0, t - 1)
    take = jax.vmap(lambda x, i: x[i])
    return LayerCache(jnp.where(ok[..., None, None], take(k_btkh, src).astype(entry.k.dtype), entry.k),
                      jnp.where(ok[..., None, None], take(v_btkh, src).astype(entry.v.dtype), entry.v),
                      jnp.where(ok, p, entry.pos).astype(jnp.int32))


class DecodeAttender(Attender):
    """One new token per sequence at positions `pos` [B,1]: write K/V into the slot, attend the cache.

    `impl` as for FullAttender; the kernel path masks by the slot positions directly (ring buffers included).
    With `dispatch.DECODE_QUERY_PROLOGUE` on (off by default) it takes the layer's queries, keys and values raw
    (`Queries`, `Keys`): where the decode kernel runs the call it normalises and rotates them itself and, over a
    cache it reads unpadded, attends to the token from its key and value and writes them into the slot in place
    (`model.takes_new_key`); else they are written first, as `value()`.
    On a stream of copied rows (more rows in q than sequences, `generation.loop.decode_step`) it reads and writes
    for the real rows and returns their output alone; the layer copies it back (`model.residual_after`).
    """

    @property
    def raw_queries(self) -> bool:  # the decode kernel normalises and rotates them itself (`model.kernel_attention`)
        return dispatch.DECODE_QUERY_PROLOGUE

    def __init__(self, cache: KVCache, pos_b1: jax.Array, impl: str = "auto"):
        self.cache, self.pos, self.impl = KVCache(dict(cache.layers)), pos_b1, impl

    def __call__(self, spec, q, kv):
        key = str(spec.kv_source)
        entry = self.cache.layers[key]
        b, rows = self.pos.shape[0], q.shape[0]
        if rows != b:  # the step's stream repeats its one sequence (`decode_step`): the cache sees the real row
            q = q.head(b) if isinstance(q, Queries) else q[:b]
            kv = kv if kv is None else kv.head(b) if isinstance(kv, Keys) else (kv[0][:b], kv[1][:b])
        if kv is None:
            return attend_cache(self.impl, q, entry, self.pos, spec.window)  # the real rows: `model.residual_after`
        if isinstance(kv, Keys) and takes_new_key(choice := attention_impl(self.impl, q, entry.k), q, entry.k):
            # the kernel attends to the token from its raw key and value over the cache as it was (the token's slot
            # held nothing visible) and writes them into the slot itself: no cache write on the step's chain
            slot = token_slot(self.pos, entry.pos.shape[-1])
            o, k, v = kernel_attention(choice, q, entry.k, entry.v, self.pos, entry.pos, spec.window, new_key=kv,
                                       new_slot=slot)
            rows = jnp.arange(slot.shape[0])
            self.cache.layers[key] = LayerCache(k, v, entry.pos.at[rows, slot].set(self.pos[:, 0]))
            return o
        # a KV-owning layer writes first; its readers come later in the step
        k, v = kv.value() if isinstance(kv, Keys) else kv
        self.cache.layers[key] = written = write_token(entry, k, v, self.pos)
        return attend_cache(self.impl, q, written, self.pos, spec.window)


def attend_cache(impl: str, q_btnh, entry: LayerCache, pos_bt, window: int | None) -> jax.Array:
    """Decode attention of queries at `pos` over one layer's cache entry (the decode kernel or XLA, by `impl`);
    the slots' own positions mask it (empty slots, ring buffers, the window). q may be raw `Queries`."""
    if (choice := attention_impl(impl, q_btnh, entry.k)) != "xla":
        return kernel_attention(choice, q_btnh, entry.k, entry.v, pos_bt, entry.pos, window)
    q_btnh = q_btnh.value() if isinstance(q_btnh, Queries) else q_btnh
    return attention(q_btnh, entry.k, entry.v, attention_mask(pos_bt, entry.pos, window, entry.pos >= 0))


def store_prompt(entry: LayerCache, k_btkh, v_btkh, pos_bt, lengths_b) -> LayerCache:
    """Prefill: store a prompt's K/V [B,T,K,H] (true lengths [B]) into a layer's cache."""
    b, t = pos_bt.shape
    s = entry.k.shape[1]
    # Slot j holds the latest prompt position p < length with p ≡ j (mod S).
    j = jnp.arange(s, dtype=jnp.int32)[None, :]
    last = lengths_b[:, None] - 1
    p = j + s * jnp.floor_divide(last - j, s)  # [B,S]; < 0 when the slot stays empty
    ok = (p >= 0) & (p < t)
    src = jnp.clip(p, 0, t - 1)
    take = jax.vmap(lambda x, i: x[i])
    return LayerCache(jnp.where(ok[..., None, None], take(k_btkh, src), entry.k),
                      jnp.where(ok[..., None, None], take(v_btkh, src), entry.v),
                      jnp.where(ok, p, -1).astype(jnp.int32))


def token_slot(pos_b1: jax.Array, slots: int) -> jax.Array:
    """The cache slot [B] of one new token a sequence at positions [B,1]: position mod the cache's slots."""
    return pos_b1[:, 0] % slots


def write_token(entry: LayerCache, k_b1kh, v_b1kh, pos_b1, mb=None) -> LayerCache:
    """Decode: write one token's K/V [B,1,K,H] at positions [B,1] (slot = position mod S).

    With `mb`, the entry has a leading micro-batch axis and only that micro-batch's slots are written.
    """
    slot = token_slot(pos_b1, entry.pos.shape[-1])
    rows = jnp.arange(pos_b1.shape[0])
    at = (rows, slot) if mb is None else (mb, rows, slot)
    return LayerCache(entry.k.at[at].set(k_b1kh[:, 0]), entry.v.at[at].set(v_b1kh[:, 0]),
                      entry.pos.at[at].set(pos_b1[:, 0]))
