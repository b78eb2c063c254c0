"""Pipeline parallelism: stages on a `pp` mesh axis, one SPMD program under `jax.shard_map`.

Owns the pipeline plan (which layers, caches and transfers each stage has), the stage-stacked
parameters and KV cache (leading axis P sharded over 'pp'), the stage program (a `lax.switch` over
the stages' static layer plans, so stages with different layer sequences share one program and no
padded layer is ever computed), and the three schedules:

  logits / prefill  GPipe: micro-batch m enters stage 0 at tick m and leaves the last stage at
                    tick m + P − 1 (M + P − 1 ticks).
  decode            a ring: with R = max(M, P) slots, at tick t stage s runs micro-batch
                    (t − s) mod R at decode step (t − s) // R; the last stage samples and its packet
                    (the new token ids) wraps round to stage 0. With M ≥ P every stage is busy every
                    tick; a single prompt (M = 1) simply walks the stages.

The packet sent from stage s to s + 1 (ppermute) after every tick:
  x    [b, T, D]  the residual stream after stage s's layers (for the last stage: unused)
  h0   [b, T, D]  the scaled input embedding, from which each stage computes its own per-layer
                  inputs with its own share of the PLE tables (zeros without PLE)
  ids  [b, T]     the tokens (their PLE rows); from the last stage: the sampled next tokens
  kv   {source layer: (k, v) [b, T, K, H]}  the new K/V of every KV-sharing source layer whose
                  readers sit on a later stage; a reader stage keeps a mirror of that layer's cache.
Stage-stacked parameters (leading axis P):
  table [P, V, D]  the embedding on stage 0 and its copy, the tied head, on the last stage (zeros
                   between, only when P ≥ 3); final_norm [P, D]; ple_* the stage's PLE share,
                   padded to the longest stage; stacks {stack: DecoderLayer state, each parameter a
                   tuple of n_max arrays [P, …], one per slot} (KV-shared layers live in their owning
                   kind's stack where shapes allow).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import Gemma4Config
from ..errors import ConfigError
from ..generation.cache import (
    ExtendAttender,
    KVCache,
    LayerCache,
    attend_cache,
    cache_length,
    store_prompt,
    write_token,
)
from ..generation.loop import Sampling, bucket, sample
from ..generation.programs import program
from ..kernels import dispatch
from ..model import text as model
from ..model.text import DecoderLayer, FullAttender, iter_params
from .stages import Path, Stage, stage_of_layer, storage_kinds

F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# The plan: static facts per stage


@dataclass(frozen=True)
class PipelinePlan:
    """Static per-stage layout. Hashable: it is a static argument of the compiled programs."""

    cfg: Gemma4Config
    stages: tuple[Stage, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @functools.cached_property
    def storage_of(self) -> dict[str, str]:
        """{layer kind: the stack it is stored in} (`stages.storage_kinds`)."""
        return storage_kinds(self.cfg)

    @functools.cached_property
    def local(self) -> tuple[tuple[tuple[int, str, int], ...], ...]:
        """Per stage: (layer, stack, slot in the stage's block of that stack) in layer order."""
        out = []
        for s in self.stages:
            seen: dict[str, int] = {}
            row = []
            for layer in s.layers:
                kind = self.storage_of[self.cfg.layers[layer].kind]
                row.append((layer, kind, seen.get(kind, 0)))
                seen[kind] = seen.get(kind, 0) + 1
            out.append(tuple(row))
        return tuple(out)

    @property
    def stacks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.storage_of.values()))

    @functools.cached_property
    def kind_max(self) -> dict[str, int]:
        return {k: max(1, max(sum(1 for _, kk, _ in row if kk == k) for row in self.local)) for k in self.stacks}

    @property
    def layers_max(self) -> int:
        return max(s.stop - s.start for s in self.stages)

    @functools.cached_property
    def xfer(self) -> tuple[int, ...]:
        """KV-sharing source layers with a reader on a later stage (their K/V ride in the packet)."""
        out = set()
        stage = functools.partial(stage_of_layer, self.stages)
        for spec in self.cfg.layers:
            if not spec.owns_kv and stage(spec.kv_source) != stage(spec.index):
                out.add(spec.kv_source)
        return tuple(sorted(out))

    @functools.cached_property
    def cache_slots(self) -> tuple[dict[int, str], ...]:
        """Per stage: {layer whose cache it holds (own K/V, or a mirrored source): slot name}."""
        out = []
        for s in self.stages:
            layers = sorted({sp.kv_source for sp in self.cfg.layers[s.start:s.stop]})
            counts: dict[str, int] = {}
            row = {}
            for layer in layers:
                cls = self.cfg.layers[layer].attn_type
                row[layer] = f"{cls}:{counts.get(cls, 0)}"
                counts[cls] = counts.get(cls, 0) + 1
            out.append(row)
        return tuple(out)

    @functools.cached_property
    def slot_spec(self) -> dict[str, int]:
        """{slot name: a layer whose cache shape it has} over all stages."""
        out = {}
        for row in self.cache_slots:
            for layer, name in row.items():
                out.setdefault(name, layer)
        return out


def make_mesh(pp: int) -> jax.sharding.Mesh:
    """Axis 'pp' over the first `pp` devices of all processes (`jax.devices()` lists them process by process).
    Every process must own at least one stage: it runs the same programs and holds its stages' parameters."""
    devices = jax.devices()[:pp]
    idle = sorted({d.process_index for d in jax.devices()} - {d.process_index for d in devices})
    if idle:
        raise ConfigError(f"pp={pp} uses the first {pp} of {len(jax.devices())} devices, leaving process(es) "
                          f"{idle} without a stage; with {jax.process_count()} processes use pp = "
                          f"{len(jax.devices())} (every device) or start fewer processes")
    return jax.sharding.Mesh(np.array(devices), ("pp",))


# ---------------------------------------------------------------------------------------------
# Parameters: stage-local trees, stacked over stages


def is_slot_tuple(x) -> bool:
    """A stage-stack parameter held as one array per slot (`stage_tree`), indexed like a stack."""
    return isinstance(x, tuple)


def kind_graphdef(cfg: Gemma4Config, kind: str, n: int, dtype):
    """The abstract stage stack of `n` layers of `kind` (the pipeline's layout)."""
    return nnx.eval_shape(lambda: DecoderLayer(cfg, cfg.kind_spec(kind), dtype, nnx.Rngs(0), stack=n))


def stage_tree(plan: PipelinePlan, s: int, leaves: dict[Path, jax.Array], dtype, device) -> dict:
    """Stage s's uniform parameter tree on `device` from its logical leaves (layout in parallel/stages.py)."""
    cfg, stage = plan.cfg, plan.stages[s]
    with jax.default_device(device):
        put = lambda a: jax.device_put(jnp.asarray(a, dtype), device)  # noqa: E731
        table = leaves.get(("embed",)) if stage.first else leaves.get(("head",))
        tree = {"table": put(table) if table is not None else jnp.zeros((cfg.vocab_size, cfg.hidden_size), dtype),
                "final_norm": put(leaves[("final_norm",)]) if stage.last else jnp.zeros((cfg.hidden_size,), dtype)}
        if cfg.ple_dim:
            n, p = stage.stop - stage.start, cfg.ple_dim
            pad = plan.layers_max - n
            tree["ple_norm"] = put(leaves[("ple_norm",)])
            tree["ple_table"] = jnp.pad(put(leaves[("ple_table",)]), ((0, 0), (0, pad * p)))
            proj = jnp.stack([put(leaves[("layers", str(i), "ple_model_proj")]) for i in stage.layers], axis=1)
            tree["ple_proj"] = jnp.pad(proj, ((0, 0), (0, pad), (0, 0)))
        stacks = {}
        for kind in plan.stacks:
            layers = [layer for layer, k, _ in plan.local[s] if k == kind]
            module = kind_graphdef(cfg, kind, plan.kind_max[kind], dtype)
            for path, var in iter_params(module):
                shape = var.get_value().shape
                # A KV-shared layer stored with its owning kind has no K/V weights: zeros, never read.
                # One array per slot, not a stack: a slice of a stacked weight inside the stage program is a
                # device-to-device copy on the GPU every tick (as it was for the model's layers). Padding slots are
                # zeros, never computed.
                parts = [put(leaves[key]) if (key := ("layers", str(layer), *path)) in leaves
                         else jnp.zeros(shape[1:], dtype) for layer in layers]
                parts += [jnp.zeros(shape[1:], dtype) for _ in range(shape[0] - len(parts))]
                var.set_value(tuple(parts))
            stacks[kind] = nnx.split(module)[1]
        tree["stacks"] = stacks
    return tree


def stack_stages(plan: PipelinePlan, trees: dict[int, dict], mesh) -> dict:
    """This process's stage trees {stage: tree on that stage's device} -> one tree of global arrays [P, ...]
    sharded P('pp'). With several processes (hosts), each passes only the stages on its own devices."""

    devices = list(mesh.devices.flat)
    order = sorted(trees)

    def glue(*parts):
        shape = (len(devices), *parts[0].shape)
        blocks = [jax.device_put(a[None], devices[s]) for s, a in zip(order, parts, strict=True)]
        return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P("pp")), blocks)

    return jax.tree.map(glue, *[trees[s] for s in order])


def local_stages(mesh) -> list[int]:
    """The stages whose device belongs to this process."""
    mine = {d.id for d in jax.local_devices()}
    return [s for s, d in enumerate(mesh.devices.flat) if d.id in mine]


@functools.cache
def _kind_graphdefs(plan: PipelinePlan, dtype_name: str):
    return {k: nnx.split(kind_graphdef(plan.cfg, k, plan.kind_max[k], jnp.dtype(dtype_name)))[0]
            for k in plan.stacks}


# ---------------------------------------------------------------------------------------------
# KV cache: uniform slots per stage, [P, R, b, S, K, H]


def init_stage_cache(plan: PipelinePlan, mesh, slots: int, b: int, max_len: int, dtype) -> dict[str, LayerCache]:
    """{slot: LayerCache} with k, v [P, R, b, S, K, H] and pos [P, R, b, S] (−1 = empty), sharded P('pp')."""
    sh = NamedSharding(mesh, P("pp"))
    out = {}
    for name, layer in plan.slot_spec.items():
        spec = plan.cfg.layers[layer]
        s = cache_length(plan.cfg, layer, max_len)
        kv_shape = (plan.num_stages, slots, b, s, spec.num_kv_heads, spec.head_dim)
        zeros = lambda shape=kv_shape: jnp.zeros(shape, dtype, device=sh)  # noqa: E731
        pos = lambda shape=kv_shape[:4]: jnp.full(shape, -1, jnp.int32, device=sh)  # noqa: E731
        out[name] = LayerCache(zeros(), zeros(), pos())
    return out


# ---------------------------------------------------------------------------------------------
# The stage program


@jax.tree_util.register_dataclass
@dataclass
class Packet:
    """What a stage hands the next one each tick (a pytree, sent whole by `ppermute`): the stream x [b,t,D], the
    first stage's embedding h0 (the per-layer inputs' context part), the token ids [b,t] (in decode, the sampled
    token going round to stage 0), and {source layer: (K, V)} of KV-sharing sources whose readers sit on later
    stages (E2B/E4B)."""

    x: jax.Array
    h0: jax.Array
    ids: jax.Array
    kv: dict


class _Attender(FullAttender):
    """Attention for one stage and one micro-batch `mb`: no cache (logits), prefill, extend (a chunk after what
    the cache holds: `cache.ExtendAttender` over the micro-batch's rows), or decode.

    The cache entries keep their leading micro-batch axis [R, b, S, K, H]: a decode step writes only the
    new token's slots of micro-batch `mb` and reads that micro-batch's keys, so no tick copies a cache.
    Sources on earlier stages come from the packet (`kv_in`); their mirror caches are filled here.
    """

    def __init__(self, mode, pos, lengths, cache: dict[int, LayerCache] | None, kv_in: dict[int, tuple],
                 impl: str = "auto", mb=None, blocks=None):
        valid = pos < lengths[:, None] if mode == "prefill" else None
        super().__init__(pos, valid, impl, blocks)
        self.mode, self.lengths, self.cache, self.mb = mode, lengths, cache, mb
        if mode == "extend":
            rows = KVCache({str(layer): LayerCache(e.k[mb], e.v[mb], e.pos[mb]) for layer, e in cache.items()})
            self.ext = ExtendAttender(rows, pos, lengths, impl)
        for src, kv in kv_in.items():
            self._own(src, kv)

    def _own(self, layer, kv):
        self.kv_of[layer] = kv
        e, mb = self.cache[layer] if self.cache is not None else None, self.mb
        if self.mode == "prefill":  # the whole prompt: rewrite the micro-batch's slice
            new = store_prompt(LayerCache(e.k[mb], e.v[mb], e.pos[mb]), kv[0], kv[1], self.pos, self.lengths)
        elif self.mode == "extend":
            self.ext.take(layer, kv)
            new = self.ext.cache.layers[str(layer)]
        elif self.mode == "decode":
            self.cache[layer] = write_token(e, kv[0], kv[1], self.pos, mb)
            return
        else:
            return
        self.cache[layer] = LayerCache(e.k.at[mb].set(new.k), e.v.at[mb].set(new.v), e.pos.at[mb].set(new.pos))

    @property
    def raw_queries(self) -> bool:  # decode reads the cache through `attend_cache`, which takes them raw
        return self.mode == "decode" and dispatch.DECODE_QUERY_PROLOGUE

    def __call__(self, spec, q, kv):
        if kv is not None:
            self._own(spec.index, kv if isinstance(kv, tuple) else kv.value())  # decode's raw `Keys`
        if self.mode == "extend":
            return self.ext.attend(spec, q)
        if self.mode != "decode":
            return super().__call__(spec, q, kv)
        e = self.cache[spec.kv_source]
        return attend_cache(self.impl, q, LayerCache(e.k[self.mb], e.v[self.mb], e.pos[self.mb]), self.pos,
                            spec.window)


def _stage_fn(plan: PipelinePlan, s: int, mode: str, dtype, graphdefs, impl: str = "auto"):
    """The program of stage s: (params, Packet, cache, pos, lengths, micro-batch index, soft tokens) -> (Packet,
    cache).

    The model's math is `model`'s own functions (embedding, soft tokens, per-layer inputs, the layer loop, the
    head), looked up there at trace time; only the stage bookkeeping (which layers, which cache slots, what the
    packet carries) lives here."""
    cfg, stage = plan.cfg, plan.stages[s]
    slots = plan.cache_slots[s]

    def run(params, packet: Packet, cache, pos, lengths, mb, mm):
        x, h0, ids, kv_in = packet.x, packet.h0, packet.ids, packet.kv
        if stage.first:
            x = model.embed(params["table"], ids, dtype).astype(dtype)
            if mm is not None:  # soft tokens (images, audio) overwrite their placeholders (already pad ids)
                x = model.merge_soft_tokens(x, mm[0], mm[1][mb])
            h0 = x
        ple = None
        if cfg.ple_dim:
            ple = model.per_layer_inputs(cfg, params["ple_table"], params["ple_proj"], params["ple_norm"], ids, h0,
                                         dtype)
        view = {layer: cache[name] for layer, name in slots.items()} if cache is not None else None
        mirrored = {src: kv_in[src] for src in plan.xfer if src in slots and src < stage.start}
        blocks = mm[2][mb] if mm is not None and cfg.bidirectional_vision else None
        att = _Attender(mode, pos, lengths, view, mirrored, impl, mb, blocks)

        def layers():  # each layer's module is built from its kind's stack slice when the loop reaches it
            for j, (layer, kind, slot) in enumerate(plan.local[s]):
                state = jax.tree.map(lambda a, slot=slot: a[slot], params["stacks"][kind], is_leaf=is_slot_tuple)
                yield cfg.layers[layer], nnx.merge(graphdefs[kind], state), j

        x = model.run_layers(layers(), x, ple, pos, att, dtype)
        kv_out = {src: att.kv_of.get(src, kv_in[src]) for src in plan.xfer}
        if cache is not None:
            cache = dict(cache)
            for layer, name in slots.items():
                cache[name] = view[layer]
        return Packet(x, h0, ids, kv_out), cache

    return run


def _head(plan: PipelinePlan, params, x):
    return model.head(plan.cfg, params["final_norm"], params["table"], x)


# ---------------------------------------------------------------------------------------------
# Schedules (run inside shard_map; every array argument is one stage's block)


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _branches(plan, mode, dtype, graphdefs, impl):
    runs = [_stage_fn(plan, s, mode, dtype, graphdefs, impl) for s in range(plan.num_stages)]

    def skip(params, packet, cache, pos, lengths, mb, mm):  # a bubble: nothing runs, nothing changes
        return packet, cache

    return runs + [skip]


def _empty_packet(plan, b, t, dtype):
    cfg = plan.cfg
    kv = {}
    for src in plan.xfer:
        spec = cfg.layers[src]
        z = jnp.zeros((b, t, spec.num_kv_heads, spec.head_dim), dtype)
        kv[src] = (z, z)
    d = jnp.zeros((b, t, cfg.hidden_size), dtype)
    return Packet(d, d, jnp.zeros((b, t), jnp.int32), kv)


def _gpipe(plan: PipelinePlan, mode: str, dtype, impl: str, params, ids, lengths, cache, mm=None, start=None):
    """GPipe over micro-batches: ids [M, b, T]; returns (logits, cache). `mm`: soft tokens (features [1, N, D],
    this stage's block — real on stage 0 only —, slots [M, b, T], blocks [M, b, T]; `model.Multimodal`).

    logits: [M, b, T, V] (mode 'logits') or the last prompt token's [M, b, V] (modes 'prefill' and 'extend': ids
    that continue the cache's rows from positions `start` [M, b]), valid on the last stage.
    """
    graphdefs = _kind_graphdefs(plan, jnp.dtype(dtype).name)
    params = jax.tree.map(lambda a: a[0], params)
    cache = jax.tree.map(lambda a: a[0], cache) if cache is not None else None
    mm = (mm[0][0], mm[1], mm[2]) if mm is not None else None
    n, s = plan.num_stages, jax.lax.axis_index("pp")
    m_count, b, t = ids.shape
    v = plan.cfg.vocab_size
    branches = _branches(plan, mode, dtype, graphdefs, impl)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = jnp.zeros((m_count, b, t, v) if mode == "logits" else (m_count, b, v), F32)

    def tick(i, carry):
        packet, cache, out = carry
        m = i - s
        valid = (m >= 0) & (m < m_count)
        mc = jnp.clip(m, 0, m_count - 1)
        packet = dataclasses.replace(packet, ids=jnp.where(s == 0, ids[mc], packet.ids))
        p = pos if start is None else start[mc][:, None] + pos  # extend: the chunk continues the cache's rows
        packet, cache = jax.lax.switch(jnp.where(valid, s, n), branches, params, packet, cache, p, lengths[mc],
                                       mc, mm)
        x = packet.x
        emit = valid & (s == n - 1)
        if mode == "logits":
            lg = jax.lax.cond(emit, lambda: _head(plan, params, x), lambda: jnp.zeros((b, t, v), F32))
        else:
            last = jnp.take_along_axis(x, (lengths[mc] - 1)[:, None, None], axis=1)
            lg = jax.lax.cond(emit, lambda: _head(plan, params, last)[:, 0], lambda: jnp.zeros((b, v), F32))
        out = jnp.where(emit, out.at[mc].set(lg), out)
        return jax.lax.ppermute(packet, "pp", _ring_perm(n)), cache, out

    carry = (_empty_packet(plan, b, t, dtype), cache, out)
    _, cache, out = jax.lax.fori_loop(0, m_count + n - 1, tick, carry)
    if cache is not None:
        cache = jax.tree.map(lambda a: a[None], cache)
    return out[None], cache


def _ring(plan: PipelinePlan, sampling: Sampling, dtype, impl: str, width: int, params, cache, first, pos, left,
          stops, key, offset):
    """The decode ring. first [M, b]: each sequence's latest token, not yet fed (from prefill, or the previous
    call's last), at positions `pos` [M, b]; each sequence decodes up to `left` [M, b] (traced, < `width`) more
    tokens, fewer after a stop (0: a free or ended row, computed and never read). Returns (out [M, b, width]:
    `first`, then the new tokens, 0 after a sequence's end; done [M, b]; cache), valid on the last stage.
    `width` is a bucket, so one compiled ring serves every length up to it. The k-th new token of micro-batch m
    is sampled with key (key, m, offset + k + 1): a generation decoded in several calls, each with `offset` the
    tokens decoded before it, samples what one call would."""
    graphdefs = _kind_graphdefs(plan, jnp.dtype(dtype).name)
    params = jax.tree.map(lambda a: a[0], params)
    cache = jax.tree.map(lambda a: a[0], cache)
    n, s = plan.num_stages, jax.lax.axis_index("pp")
    m_count, b = first.shape
    r = max(m_count, n)
    branches = _branches(plan, "decode", dtype, graphdefs, impl)
    # Built by concatenation, not `.at[:m].set`: a full-range set lowers to a scatter with an empty index
    # constant, which XLA's GPU partitioner (Shardy, jax 0.11) crashes on inside shard_map.
    tokbuf = jnp.concatenate([first, jnp.zeros((r - m_count, b), jnp.int32)]) if r > m_count else first
    done = jnp.isin(first, stops) | (left <= 0)
    steps = jnp.max(left)
    total = (steps - 1) * r + m_count + n - 1

    def when(u):
        m, k = u % r, u // r
        return m, k, (u >= 0) & (m < m_count) & (k < steps)

    def body(carry):
        packet, cache, tokbuf, out, done, t = carry
        m, k, valid = when(t - s)
        mc = jnp.clip(m, 0, m_count - 1)
        ids_in = jnp.where(s == 0, tokbuf[m][:, None], packet.ids)
        p = (pos[mc] + k)[:, None]
        packet, cache = jax.lax.switch(jnp.where(valid, s, n), branches, params,
                                       dataclasses.replace(packet, ids=ids_in), cache, p, pos[mc], mc, None)
        emit = valid & (s == n - 1)
        lg = jax.lax.cond(emit, lambda: _head(plan, params, packet.x)[:, 0],
                          lambda: jnp.zeros((b, plan.cfg.vocab_size), F32))
        tok = sample(lg, jax.random.fold_in(jax.random.fold_in(key, mc), offset + k + 1), sampling)
        tok = jnp.where(done[mc], 0, tok)
        out = jnp.where(emit, out.at[mc, :, k + 1].set(tok), out)
        ended = done[mc] | jnp.isin(tok, stops) | (k + 1 >= left[mc])
        done = jnp.where(emit, done.at[mc].set(ended), done)
        sent = jnp.where(s == n - 1, tok[:, None], ids_in)
        packet = jax.lax.ppermute(dataclasses.replace(packet, ids=sent), "pp", _ring_perm(n))
        m_l, _, valid_l = when(t - (n - 1))  # what the last stage just sent round to stage 0
        tokbuf = jnp.where((s == 0) & valid_l, tokbuf.at[m_l].set(packet.ids[:, 0]), tokbuf)
        return packet, cache, tokbuf, out, done, t + 1

    def cond(carry):
        *_, done, t = carry
        finished = jax.lax.psum(jnp.where(s == n - 1, jnp.all(done), False).astype(jnp.int32), "pp") > 0
        return (t < total) & ~finished

    out = jnp.concatenate([first[:, :, None], jnp.zeros((m_count, b, width - 1), jnp.int32)], axis=2)
    carry = (_empty_packet(plan, b, 1, dtype), cache, tokbuf, out, done, jnp.asarray(0, jnp.int32))
    _, cache, _, out, done, _ = jax.lax.while_loop(cond, body, carry)
    return out[None], done[None], jax.tree.map(lambda a: a[None], cache)


# ---------------------------------------------------------------------------------------------
# Compiled entry points and the host-side driver


@functools.partial(jax.jit, static_argnames=("plan", "mode", "dtype_name", "impl", "mesh"), donate_argnames=("cache",))
def _run_gpipe(params, ids, lengths, cache, mm=None, start=None, *, plan, mode, dtype_name, impl, mesh):
    body = functools.partial(_gpipe, plan, mode, jnp.dtype(dtype_name), impl)
    cache_spec = P("pp") if cache is not None else None
    mm_spec = (P("pp"), P(), P()) if mm is not None else None
    start_spec = P() if start is not None else None
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("pp"), P(), P(), cache_spec, mm_spec, start_spec),
                      out_specs=(P("pp"), cache_spec), check_vma=False)
    out, cache = f(params, ids, lengths, cache, mm, start)
    return _everywhere(mesh, out[plan.num_stages - 1]), cache


def _everywhere(mesh, x):
    """`x` replicated on every stage's device, so that every process (host) can read it."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


@program(static_argnames=("plan", "sampling", "dtype_name", "impl", "mesh", "width"), donate_argnames=("cache",),
         decode=True, keep=False)  # the decode programs' XLA options (generation/programs.py)
def _run_ring(params, cache, first, pos, left, stops, key, offset, *, plan, sampling, dtype_name, impl, mesh, width):
    body = functools.partial(_ring, plan, sampling, jnp.dtype(dtype_name), impl, width)
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("pp"), P("pp"), P(), P(), P(), P(), P(), P()),
                      out_specs=(P("pp"), P("pp"), P("pp")), check_vma=False)
    out, done, cache = f(params, cache, first, pos, left, stops, key, offset)
    return _everywhere(mesh, out[plan.num_stages - 1]), _everywhere(mesh, done[plan.num_stages - 1]), cache


@functools.partial(jax.jit, donate_argnums=(0,))
def _move_rows(cache, rows, src, dst):
    """Rows src [n, 2] (micro-batch, row) of cache `rows` into rows dst [n, 2] of `cache` ([P, M, b, …] leaves,
    the stage axis untouched: each stage moves its own)."""

    def move(big, small):
        for j in range(src.shape[0]):
            big = big.at[:, dst[j, 0], dst[j, 1]].set(small[:, src[j, 0], src[j, 1]])
        return big

    return jax.tree.map(move, cache, rows)


class Pipeline:
    """A model split into stages on the first `pp` devices: parameters placed stage by stage."""

    def __init__(self, cfg: Gemma4Config, stages: tuple[Stage, ...], leaves: list[dict[Path, object]], dtype,
                 impl: str = "auto"):
        self.plan = PipelinePlan(cfg, stages)
        self.impl = impl
        self.mesh = make_mesh(len(stages))
        self.dtype = jnp.dtype(dtype)
        devices = list(self.mesh.devices.flat)
        trees = {}
        for s in local_stages(self.mesh):  # with several processes, each builds only its own stages
            trees[s] = stage_tree(self.plan, s, leaves[s], self.dtype, devices[s])
            leaves[s] = None  # let the stage's unstacked leaves go
        self.params = stack_stages(self.plan, trees, self.mesh)

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    def replicated(self, *arrays):
        """`arrays` placed whole on every stage's device (the shard_map programs' replicated inputs), so
        no input reaches the compiler committed to a single device."""
        rep = NamedSharding(self.mesh, P())

        def put(a):
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
            # From the host's copy, built per device: with several processes a sharding over the whole mesh
            # is not addressable from one of them, and device_put refuses it.
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, rep, lambda index: host[index])

        return tuple(put(a) for a in arrays)

    def micro_batches(self, b: int) -> int:
        return min(b, self.num_stages)

    def soft_tokens(self, mm, ids: np.ndarray, m: int, per: int):
        """(ids with placeholders as pad, the stage programs' soft-token inputs) for `mm` (a
        `model.Multimodal` over ids [B, t]): the features sit on the first stage's device only (zeros of
        the same shape elsewhere, never sent); slots and blocks [M, b, t] go to every stage."""
        if mm is None:
            return ids, None
        b, t = np.asarray(mm.slots).shape
        slots = np.full((m * per, t), -1, np.int32)
        blocks = np.full((m * per, t), -1, np.int32)
        slots[:b], blocks[:b] = np.asarray(mm.slots), np.asarray(mm.blocks)
        ids = np.where(slots.reshape(ids.shape) >= 0, self.plan.cfg.pad_token_id, ids).astype(np.int32)
        devices = list(self.mesh.devices.flat)
        feats = np.asarray(mm.features).astype(self.dtype)
        blocks_p = [jax.device_put(feats[None], devices[s]) if s == 0
                    else jnp.zeros((1, *feats.shape), self.dtype, device=devices[s]) for s in local_stages(self.mesh)]
        feats_p = jax.make_array_from_single_device_arrays((len(devices), *feats.shape),
                                                           NamedSharding(self.mesh, P("pp")), blocks_p)
        return ids, (feats_p, *self.replicated(slots.reshape(m, per, t), blocks.reshape(m, per, t)))

    def logits(self, ids: np.ndarray, mm=None) -> np.ndarray:
        """Float32 logits [B, T, V] of a full causal forward, micro-batched through the stages (soft tokens
        `mm`, a `model.Multimodal`, merged on the first stage)."""
        return np.asarray(self.device_logits(ids, mm), np.float32)[:ids.shape[0]]

    def device_logits(self, ids: np.ndarray, mm=None) -> jax.Array:
        """`logits` left on the devices (on each of them): [B', T, V] with B' ≥ B (the batch padded to whole
        micro-batches; rows past B are padding)."""
        b, t = ids.shape
        m = self.micro_batches(b)
        padded = -(-b // m) * m
        x = np.zeros((padded, t), np.int32)
        x[:b] = ids
        x, soft = self.soft_tokens(mm, x, m, padded // m)
        lengths = np.full((m, padded // m), t, np.int32)
        ids_r, lengths_r = self.replicated(x.reshape(m, padded // m, t), lengths)
        out, _ = _run_gpipe(self.params, ids_r, lengths_r, None, soft, plan=self.plan, mode="logits",
                            dtype_name=self.dtype.name, impl=self.impl, mesh=self.mesh)
        return out.reshape(padded, t, -1)

    def layout(self, b: int) -> tuple[int, int]:
        """(micro-batches M, rows per micro-batch) for `b` sequences."""
        m = self.micro_batches(b)
        return m, -(-b // m)

    def prefill(self, prompts: list[list[int]], *, max_len: int, t: int, mm=None, after=None, into=None):
        """Prefill prompts right-padded to `t` tokens (soft tokens `mm` merged on the first stage) into a fresh
        cache for `max_len` positions: (last-token logits [M, b, V], cache [P, M, b, …]); prompt i is row
        i % b of micro-batch i // b (rows past the prompts are one-token fillers). `after` = (a cache of one row
        holding `start` tokens, start): the prompts continue those tokens, whose keys are copied, not computed.
        `into` = (a cache of this call's layout, e.g. an earlier call's, donated; start): the prompts continue its
        rows from position `start` (a long prompt prefilled piece by piece)."""
        b = len(prompts)
        m, per = self.layout(b)
        ids = np.zeros((m * per, t), np.int32)
        lengths = np.ones((m * per,), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], lengths[i] = p, len(p)
        ids, soft = self.soft_tokens(mm, ids, m, per)
        cache = into[0] if into is not None else init_stage_cache(self.plan, self.mesh, m, per, max_len, self.dtype)
        ids_r, lengths_r = self.replicated(ids.reshape(m, per, t), lengths.reshape(m, per))
        start = None
        if after is not None:
            rows = [(j // per, j % per) for j in range(m * per)]
            cache = self.move_rows(cache, after[0], [(0, 0)] * len(rows), rows)
            (start,) = self.replicated(np.full((m, per), after[1], np.int32))
        elif into is not None:
            (start,) = self.replicated(np.full((m, per), into[1], np.int32))
        return _run_gpipe(self.params, ids_r, lengths_r, cache, soft, start, plan=self.plan,
                          mode="prefill" if start is None else "extend", dtype_name=self.dtype.name, impl=self.impl,
                          mesh=self.mesh)

    def init_cache(self, m: int, b: int, max_len: int) -> dict[str, LayerCache]:
        """An empty cache of `m` micro-batches of `b` rows for `max_len` positions (`init_stage_cache`)."""
        return init_stage_cache(self.plan, self.mesh, m, b, max_len, self.dtype)

    def move_rows(self, cache, rows, src: list[tuple[int, int]], dst: list[tuple[int, int]]):
        """`cache` (donated) with row dst[j] (micro-batch, row) replaced by row src[j] of `rows` (another cache of
        the same length, e.g. `prefill`'s), on every stage."""
        n = bucket(len(src), 1)  # a power of two of pairs (the last one repeated): few programs
        src_a, dst_a = (np.asarray(list(x) + [x[-1]] * (n - len(x)), np.int32).reshape(-1, 2) for x in (src, dst))
        return _move_rows(cache, rows, *self.replicated(src_a, dst_a))

    def decode(self, cache, first, pos, left, *, sampling: Sampling, stops, key, width: int, offset: int = 0):
        """The ring over `cache` (donated): `first` [M, b] the latest tokens at positions `pos` [M, b], `left`
        [M, b] more tokens each, sampled as the tokens after the first `offset` new ones (`_ring`). Returns
        (out [M, b, width], done [M, b], cache)."""
        first, pos, left, stops, key, offset = self.replicated(first, pos, left, stops, key,
                                                               np.asarray(offset, np.int32))
        return _run_ring(self.params, cache, first, pos, left, stops, key, offset, plan=self.plan,
                         sampling=sampling, dtype_name=self.dtype.name, impl=self.impl, mesh=self.mesh, width=width)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, max_len: int, t: int,
                 sampling: Sampling, seed: int, stop_ids: tuple[int, ...], mm=None,
                 timings: dict | None = None, on_tokens=None, chunk: int = 8) -> np.ndarray:
        """New tokens [B, max_new_tokens] (0 after a stop) for prompts right-padded to `t` tokens (soft
        tokens `mm` merged on the first stage). `timings` receives `prefill_s` and `decode_s` (the ring).
        `on_tokens(block [B, n])` streams: the first token, then the ring in calls of `chunk` tokens, each call's
        new tokens as soon as it returns (a row that ended repeats its last token); the tokens, sampled ones
        included, are those of one call."""
        t0 = time.perf_counter()
        b = len(prompts)
        last, cache = self.prefill(prompts, max_len=max_len, t=t, mm=mm)
        m, per = last.shape[:2]
        lengths = np.ones((m * per,), np.int32)
        lengths[:b] = [len(p) for p in prompts]
        key = jax.random.key(seed)
        stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
        first = jnp.stack([sample(last[i], jax.random.fold_in(jax.random.fold_in(key, i), 0), sampling)
                           for i in range(m)])
        if timings is not None:
            jax.block_until_ready((first, cache))
            t1 = time.perf_counter()
            timings["prefill_s"] = t1 - t0
        if on_tokens is None:
            width = bucket(max_new_tokens, 8)  # one compiled ring per power-of-two bucket
            out, _, _ = self.decode(cache, first, lengths.reshape(m, per),
                                    np.full((m, per), max_new_tokens - 1, np.int32), sampling=sampling, stops=stops,
                                    key=key, width=width)
            out = np.asarray(out)[:, :, :max_new_tokens].reshape(m * per, max_new_tokens)
        else:
            out = self._stream(cache, np.asarray(first).reshape(m * per), lengths, (m, per), b,
                               max_new_tokens=max_new_tokens, sampling=sampling, stops=stops, stop_ids=stop_ids,
                               key=key, on_tokens=on_tokens, chunk=chunk)
        if timings is not None:
            timings["decode_s"] = time.perf_counter() - t1
        return out[:b]

    def _stream(self, cache, tok, pos, shape, b, *, max_new_tokens, sampling, stops, stop_ids, key, on_tokens,
                chunk) -> np.ndarray:
        """`generate`'s ring in calls of `chunk` tokens from the first token `tok` [M·b] at positions `pos`,
        handing the first B rows' new tokens to `on_tokens` after each call; returns out [M·b, max_new_tokens]."""
        out = np.zeros((tok.size, max_new_tokens), np.int32)
        out[:, 0] = tok
        on_tokens(out[:b, :1])
        done = np.isin(tok, stop_ids)
        n = 1  # tokens so far, every live row alike
        while n < max_new_tokens and not done[:b].all():
            k = min(chunk, max_new_tokens - n)
            want = np.where(done, 0, k).astype(np.int32)
            ring, _, cache = self.decode(cache, tok.reshape(shape), pos.reshape(shape), want.reshape(shape),
                                         sampling=sampling, stops=stops, key=key, width=bucket(chunk + 1, 8),
                                         offset=n - 1)
            new = np.array(np.asarray(ring).reshape(tok.size, -1)[:, 1:1 + k])  # writable
            for r in np.flatnonzero(~done):  # a row that stops here: its stop token, repeated after it
                hit = np.flatnonzero(np.isin(new[r], stop_ids))
                if hit.size:
                    new[r, hit[0]:] = new[r, hit[0]]
                    done[r] = True
            new[want == 0] = tok[want == 0, None]  # rows that had ended: their last token
            out[:, n:n + k] = np.where(want[:, None] > 0, new, 0)
            on_tokens(new[:b])
            tok, pos, n = new[:, -1].copy(), pos + k, n + k
        return out
