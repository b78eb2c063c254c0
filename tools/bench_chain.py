"""`bench.py chain`: the kernels of one compiled decode step, and the longest chain of them that wait on each other.

    PYTHONPATH=. python tools/bench.py chain --preset e2b --batch 1,16 [--layer 5] [--context 256] \
        [--target device|h200] [the decode flags of `bench.py generate`] [--json out.json]

A decode step on the GPU runs as one CUDA graph whose kernels XLA schedules concurrently where their data allow;
its length is then its critical path, a chain of small dependent kernels (docs/performance.md, "Where a decode
step's time goes"). This compiles the step (`generation.loop.decode_logits`: the layers and the head, at a cache
of `--context` slots, random-free: parameters as shapes only) and reads XLA's optimised program: every
instruction of the entry computation that launches work is a kernel (a fusion, a custom call such as a Pallas
kernel, a copy); parameters, constants, bitcasts and tuples are free. For each batch it reports the kernels by
kind, the critical path in kernels (each counts one, whatever it reads), how many of the path's kernels each layer
contributes (the named scope `layer_<i>`), and with `--layer N` the path's kernels in that layer, in order, with
their op names.

`--target device` (the default) compiles for this process's own device. `--target h200` compiles for an H200 on
a machine without a GPU (JAX's deviceless compilation, `dispatch.TARGET_GPU`): it needs jax's CUDA plugin
(`pip install "jax[cuda12]"` beside the project) and `JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` in the
environment. The program is XLA's for that card as this jax's XLA builds it, without autotuning (its GEMMs take
XLA's default backend and tiles, where the card may pick cuBLAS); the card's own jax may fuse a little
differently, so compare settings within one target, and time on the card.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
from bench_common import save_json
from bench_generate import _config, _dispatch, _ints, _programs, add_decode_arguments, apply_decode_settings

# The H200's description for XLA's deviceless GPU compilation (a GpuTargetConfigProto, text format): the card's
# public figures (132 SMs, 4.8 TB/s, 141 GB, 50 MiB L2) and Hopper's per-SM limits.
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 8
}
runtime_version {
  major: 12
  minor: 8
}
device_description_str: "NVIDIA H200"
"""

# Instructions that launch nothing.
FREE = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
                  "replica-id"})


def add_parser(sub) -> None:
    p = sub.add_parser("chain", help="a compiled decode step's kernels and their critical path (no timing)")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json instead of --preset (smoke tests)")
    p.add_argument("--batch", default="1,16", help="batch sizes, each compiled in turn")
    p.add_argument("--context", type=int, default=256, help="cache slots of the step (the keys attention reads)")
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--layer", type=int, default=None, metavar="N", help="list the path's kernels in layer N")
    p.add_argument("--target", default="device", choices=["device", "h200"],
                   help="this process's device, or an H200 compiled for without one (see the module docstring)")
    add_decode_arguments(p)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def entry_instructions(hlo_text: str) -> list[dict]:
    """The entry computation of an optimised HLO module's text, in order: per instruction its name, opcode, kind
    (the fusion's kind and its backend's, or the custom call's target), operands and op name (metadata)."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        raise ValueError("no ENTRY computation in the HLO text")
    body = hlo_text[start + 1:]
    body = body[body.index("\n") + 1:body.index("\n}")]
    out = []
    for line in body.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
        if not m:
            continue
        name, rest = m.groups()
        op = re.match(r"(?:\(.*?\)|\S+) ([a-z][\w-]*)\(", rest)
        opcode = op.group(1) if op else "?"
        head = re.split(r", (?:metadata|calls|backend_config|custom_call_target|to_apply)=", rest)[0]
        kind = opcode
        if opcode == "fusion":
            k = re.search(r"kind=(\w+)", rest)
            backend = re.search(r'"kind":"(\w+)"', rest)
            kind = "fusion:" + (k.group(1) if k else "?") + (":" + backend.group(1) if backend else "")
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            kind = "custom-call:" + (target.group(1) if target else "?")
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out.append({"name": name, "opcode": opcode, "kind": kind,
                    "operands": [a for a in re.findall(r"%([\w.\-]+)", head[head.find("("):]) if a != name],
                    "op_name": op_name.group(1) if op_name else ""})
    return out


def critical_path(instructions: list[dict]) -> list[dict]:
    """The longest chain of kernels each of which reads (through free instructions) the one before, in order:
    one pass in program order, which the entry computation's text already is (operands come first)."""
    by_name = {i["name"]: i for i in instructions}
    length, before = {}, {}
    for ins in instructions:
        best, prev = 0, None
        for a in ins["operands"]:
            if a in length and length[a] > best:
                best, prev = length[a], a
        length[ins["name"]] = best + (ins["opcode"] not in FREE)
        before[ins["name"]] = prev
    if not length:
        return []
    name = max(length, key=length.get)
    path = []
    while name is not None:
        path.append(by_name[name])
        name = before[name]
    return [i for i in reversed(path) if i["opcode"] not in FREE]


def layer_of(op_name: str) -> int | None:
    """The decoder layer whose named scope (`layer_<i>`) an op name is inside, or None."""
    m = re.search(r"(?:^|/)layer_(\d+)/", op_name)
    return int(m.group(1)) if m else None


def layers(instructions: list[dict]) -> dict[str, int | None]:
    """Each instruction's decoder layer: its op name's scope, or, where XLA left no op name (a kernel it
    deduplicated, a free instruction), the one layer its operands belong to (a parameter by its path,
    `layers.<i>....`; its parameters decide where operands disagree)."""
    by_name = {i["name"]: i for i in instructions}
    found: dict[str, int | None] = {}
    for ins in instructions:
        layer = layer_of(ins["op_name"])
        if layer is None and ins["opcode"] == "parameter":
            m = re.search(r"layers_+(\d+)_", ins["name"])
            layer = int(m.group(1)) if m else None
        if layer is None and (ins["opcode"] in FREE or not ins["op_name"]):
            params = {found.get(a) for a in ins["operands"] if by_name[a]["opcode"] == "parameter"} - {None}
            read = params or {found.get(a) for a in ins["operands"]} - {None}
            layer = read.pop() if len(read) == 1 else None
        found[ins["name"]] = layer
    return found


def summarise(hlo_text: str, layer: int | None = None) -> dict:
    """Kernels by kind, the critical path's length and its kernels per layer (and, for `layer`, its kernels there)."""
    instructions = entry_instructions(hlo_text)
    kernels = [i for i in instructions if i["opcode"] not in FREE]
    path = critical_path(instructions)
    layer_at = layers(instructions)
    per_layer = collections.Counter(layer_at[i["name"]] for i in path)
    outside = per_layer.pop(None, 0)
    res = {"kernels": len(kernels), "kinds": dict(collections.Counter(i["kind"] for i in kernels).most_common()),
           "critical_path": len(path), "per_layer": {str(k): v for k, v in sorted(per_layer.items())},
           "outside_layers": outside}
    if layer is not None:
        res["layer"] = layer
        res["layer_chain"] = [[i["kind"], i["op_name"].split(f"layer_{layer}/", 1)[-1] or i["name"]] for i in path
                              if layer_at[i["name"]] == layer]
    return res


def compile_step(cfg, batch: int, context: int, impl: str, target: str) -> str:
    """The optimised HLO text of the decode step of `batch` sequences over a `context`-slot cache (bf16)."""
    from flax import nnx

    from gemma4_jax.generation.cache import init_cache
    from gemma4_jax.generation.loop import decode_logits
    from gemma4_jax.model.text import Gemma4Text

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma4Text(cfg, jnp.bfloat16, nnx.Rngs(0))))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, jnp.bfloat16))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32)
    target_scope = contextlib.nullcontext()
    if target == "h200":
        from jax.experimental import topologies
        from jax.sharding import NamedSharding, PartitionSpec

        try:
            topology = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET_CONFIG,
                                                    topology="1x1x1")
        except Exception as e:  # no CUDA plugin, or one that tried to find a GPU: say what to install and set
            raise SystemExit(f"bench.py chain: --target h200 needs jax's CUDA plugin (pip install \"jax[cuda12]\") "
                             f"and JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 in the environment "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
                             ) from None
        from gemma4_jax.testing.lowering import as_for_a_gpu

        mesh = topologies.make_mesh(topology, (1,), ("x",))
        sharding = NamedSharding(mesh, PartitionSpec())
        state, cache, tok = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                         (state, cache, tok))
        target_scope = as_for_a_gpu(mesh)  # jax >= 0.11's Pallas reads the card from the abstract mesh
    options = _programs().compiler_options(True) or None  # as the decode loop compiles (scheduling, options)
    with target_scope:
        return decode_logits.lower(graphdef, state, cache, tok, tok, impl=impl).compile(options).as_text()


def run(args) -> dict:
    cfg = _config(args)
    batches = _ints(args.batch)
    apply_decode_settings(args)
    dispatch = _dispatch()
    if args.target == "h200":
        dispatch.TARGET_GPU = "H200"
    res = {"preset": args.config or args.preset, "target": args.target if args.target != "device"
           else jax.devices()[0].device_kind, "jax": jax.__version__, "context": args.context,
           "date": time.strftime("%Y-%m-%d"), "settings": dispatch.settings(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "decode_xla_options": _programs().compiler_options(True),
           "results": {}}
    try:
        for b in batches:
            t0 = time.perf_counter()
            text = compile_step(cfg, b, args.context, args.attn_impl, args.target)
            entry = summarise(text, args.layer)
            entry["compile_s"] = time.perf_counter() - t0
            res["results"][str(b)] = entry
            print(f"batch {b}: {entry['kernels']} kernels, {entry['critical_path']} on the critical path "
                  f"({entry['compile_s']:.1f} s)", flush=True)
            save_json(res, args.json)
    finally:
        dispatch.TARGET_GPU = None
    print(json.dumps(res, indent=1), flush=True)
    return res
