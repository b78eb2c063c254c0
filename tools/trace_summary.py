"""Summarise a `jax.profiler` trace: where the device time goes, by kernel.

    python tools/trace_summary.py TRACE_DIR [--top 25] [--anchor REGEX]

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes (the newest
under TRACE_DIR), keeps the complete events of the device processes (`/device:GPU:…`; on a CPU-only trace, the
XLA threads), and prints the busiest kernel names (total µs, share of all device time, count, mean µs), the same
by op class (`op_class`: GEMMs, attention, reductions, elementwise, copies, ...) and the device's idle time inside
the span (the gaps between kernels: launch overhead where the host cannot keep up). `per_step` turns two summaries
(a generation of n tokens and one of 1) into the cost of one decode step by class. `gaps` finds what runs between
consecutive *anchor* kernels (a MoE model's expert kernels, which stream most of a step's bytes): with the kernels
of a CUDA graph overlapping, the time when no anchor runs is what the rest of the step adds to the anchors, and the
kernels inside those windows are the chain to shorten. Used by `bench.py generate --profile` to put the profile's
evidence into its JSON without shipping the trace.

A GPU trace names XLA's fused kernels only by their HLO instruction (`fusion_2972`). With `--hlo DUMP_DIR`, an XLA
dump of the same run's optimised programs (`XLA_FLAGS=--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text`; `bench.py
generate --profile-hlo` sets it), each listed kernel also shows what it computes: the named scopes and ops of the
instructions it runs (`hlo_scopes`; the model's scopes are `layer_*/attention`, `mlp`, `per_layer_input`, ...).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def newest_trace(directory: str) -> str:
    found = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"no perfetto_trace.json.gz under {directory}")
    return max(found, key=os.path.getmtime)


# (class, pattern) in order: the first pattern found in a kernel's name decides its class.
OP_CLASSES = (
    ("moe", r"moe"),
    ("attention", r"attention|flash|fmha|softmax"),
    ("gemv_pallas", r"^(rmsnorm_)?gemv_"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|dot|matmul|triton_"),
    ("copy", r"memcpy|memset|copy|dynamic_update_slice|dynamic_slice|concatenate|pad"),
    ("gather_scatter", r"gather|scatter"),
    ("reduction", r"reduce|reduction"),
    ("elementwise", r"loop_|fusion|convert|multiply|add|select|broadcast"),
)


def op_class(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in OP_CLASSES if re.search(pattern, low)), "other")


def _idle_us(intervals: list[tuple[float, float]]) -> float:
    """The time inside the span of `intervals` that none of them covers (kernels on several streams overlap)."""
    idle, reach = 0.0, None
    for s, e in sorted(intervals):
        if reach is not None and s > reach:
            idle += s - reach
        reach = e if reach is None else max(reach, e)
    return idle


def read_trace(path: str) -> list[dict]:
    """The raw events of one perfetto trace (read once; `device_events` and `host_spans` take them)."""
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def device_events(events: list[dict]) -> list[tuple[float, float, str]]:
    """(start µs, duration µs, kernel name) of every complete event on the device, in start order (a GPU trace: the
    `/device:…` processes; a CPU-only trace, or one whose device processes hold no event, as where programs ran on
    the CPU of a machine with GPUs: the XLA runtime threads)."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    busy = {e["pid"] for e in events if e.get("ph") == "X"}
    gpu = {p for p, n in procs.items() if ("GPU" in n or "/device:" in n) and p in busy}

    def on_device(e) -> bool:
        if gpu:
            return e["pid"] in gpu
        return "XLA" in threads.get((e["pid"], e.get("tid")), "")

    return sorted((float(e["ts"]), float(e.get("dur", 0.0)), e["name"]) for e in events
                  if e.get("ph") == "X" and on_device(e))


def bursts(events: list[tuple[float, float, str]], gap_us: float) -> list[list[tuple[float, float, str]]]:
    """`events` split wherever the device was idle for more than `gap_us`: the work of programs that the host ran
    one at a time with a pause between them, one burst each."""
    out: list[list[tuple[float, float, str]]] = []
    reach = None
    for e in events:
        if reach is None or e[0] - reach > gap_us:
            out.append([])
        out[-1].append(e)
        reach = e[0] + e[1] if reach is None else max(reach, e[0] + e[1])
    return out


def host_spans(events: list[dict], prefix: str) -> list[tuple[float, float]]:
    """(start µs, end µs) of every complete event whose name starts with `prefix`, in start order: the spans of
    the `jax.profiler.TraceAnnotation`s a host thread wrapped around its work."""
    return sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                  if e.get("ph") == "X" and str(e.get("name", "")).startswith(prefix))


def in_spans(events: list[tuple[float, float, str]], spans: list[tuple[float, float]],
             pad_us: float) -> list[list[tuple[float, float, str]]]:
    """`events` grouped by the span (widened by `pad_us` on each side) that each starts in; events outside every
    span belong to none (work the host did not ask for in a span, such as a thread pool waking up)."""
    return [[e for e in events if s - pad_us <= e[0] <= end + pad_us] for s, end in spans]


def kernel_kind(name: str) -> str:
    """A kernel's name without XLA's instance suffix: fusion.12 and fusion.13 are one kind of kernel."""
    return re.sub(r"\.\d+$", "", name)


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_HLO_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SCOPE_NOISE = {"while", "body", "cond", "closed_call", "eval_jaxpr", "checkpoint", "remat", "pjit"}


def _scope(op_name: str) -> str:
    """An op_name without the program's wrappers (jit(...), while/body, eval_jaxpr, ...), layer numbers as
    layer_*: 'jit(decode_chunk)/while/body/layer_10/mlp/mul' → 'layer_*/mlp/mul'."""
    parts = [p for p in op_name.split("/") if p not in _SCOPE_NOISE and not p.startswith("jit(")]
    return re.sub(r"\blayer_\d+\b", "layer_*", "/".join(parts))


def _scopes(op_name: str | None) -> list[str]:
    return [s] if op_name and (s := _scope(op_name)) else []


def _hlo_computations(lines: list[str]) -> dict[str, list[tuple[str, str | None, list[str]]]]:
    """{computation: [(instruction, op_name or None, the computations it calls)]} of an HLO module's text."""
    comps: dict[str, list[tuple[str, str | None, list[str]]]] = {}
    current = None
    for line in lines:
        if (c := _HLO_COMPUTATION.match(line)) and not _HLO_INSTRUCTION.match(line):
            current = comps.setdefault(c[1], [])
        elif current is not None and (i := _HLO_INSTRUCTION.match(line)):
            op = None if " parameter(" in line else _HLO_OP_NAME.search(line)  # a parameter's: an argument's name
            called = [n.strip().lstrip("%") for m in _HLO_CALLS.finditer(line)
                      for n in m[1].strip("{}").split(",") if n.strip()]
            current.append((i[1], op[1] if op else None, called))
    return comps


def _instruction_scopes(comps: dict[str, list[tuple[str, str | None, list[str]]]],
                        limit: int) -> dict[str, list[str]]:
    """{instruction: the distinct scopes of it and of what it calls, recursively} over a module's computations."""
    memo: dict[str, list[str]] = {}

    def inside(comp: str, seen: frozenset) -> list[str]:
        if comp not in memo:
            found: list[str] = []
            for _, op, called in comps.get(comp, []):
                found += _scopes(op)
                for c in called:
                    found += inside(c, seen | {comp}) if c not in seen else []
            memo[comp] = list(dict.fromkeys(found))
        return memo[comp]

    table = {}
    for instructions in comps.values():
        for name, op, called in instructions:
            found = _scopes(op) + [s for c in called for s in inside(c, frozenset())]
            table[name] = list(dict.fromkeys(found))[:limit]
    return table


def hlo_scopes(dump_dir: str, limit: int = 16) -> dict[str, dict[str, list[str]]]:
    """{module: {instruction: scopes}} from the optimised HLO text of an XLA dump (the files
    `*after_optimizations.txt`): for each instruction, the distinct `_scope`s of its own op_name and of every
    instruction in the computations it calls (a fusion's body, recursively), in order, at most `limit`. A module
    compiled more than once keeps its newest compile (the highest module number: a profile taken last runs it)."""
    out: dict[str, dict[str, list[str]]] = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), reverse=True):
        with open(path) as f:
            lines = f.read().splitlines()
        if lines and lines[0].startswith("HloModule ") and (module := lines[0].split()[1].rstrip(",")) not in out:
            out[module] = _instruction_scopes(_hlo_computations(lines[1:]), limit)
    return out


def annotate(kernels: list[dict], args: dict[str, dict], scopes: dict[str, dict[str, list[str]]]) -> int:
    """Add to each kernel of a summary whose instance's `args` (`first_args`, from the dumped modules) name an HLO
    module and instruction found in `scopes` (`hlo_scopes`) its 'hlo': {'op', 'scopes'}; returns how many."""
    found = 0
    for k in kernels:
        a = args.get(k["name"]) or {}
        hit = scopes.get(a.get("hlo_module", ""), {}).get(a.get("hlo_op", ""))
        if hit is not None:
            k["hlo"] = {"op": a["hlo_op"], "scopes": hit}
            found += 1
    return found


def annotate_from_dump(kernels: list[dict], events: list[dict], dump_dir: str) -> int:
    """`annotate` a summary's kernels from an XLA dump (`hlo_scopes`), each as the first instance that a dumped
    module ran; returns how many were found."""
    scopes = hlo_scopes(dump_dir)
    if not scopes:
        return 0
    module = "|".join(re.escape(m) for m in scopes)
    return annotate(kernels, first_args(events, {k["name"] for k in kernels}, module=module), scopes)


def first_args(events: list[dict], names: set[str], limit: int = 300, module: str | None = None) -> dict[str, dict]:
    """The `args` of the first device event of each kernel name in `names` (a fusion's HLO op, scope or module,
    where the profiler records them), each value cut to `limit` characters; with `module` (a regex), of the first
    event whose HLO module matches it."""
    out: dict[str, dict] = {}
    for e in events:
        if e.get("ph") != "X" or not isinstance(e.get("args"), dict):
            continue
        if module and not re.search(module, str(e["args"].get("hlo_module", ""))):
            continue
        n = kernel_kind(str(e.get("name", "")))
        if n in names and n not in out:
            out[n] = {k: str(v)[:limit] for k, v in e["args"].items()}
    return out


def summarise(path: str, top: int = 25, events: list[dict] | None = None) -> dict:
    """{'device_busy_us', 'span_us', 'idle_us', 'kernel_count', 'classes': {class: {total_us, count}},
    'kernels': [{name, class, total_us, share, count, mean_us}, ...]} of one trace (`events`: its raw events where
    the caller has read them already)."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    for ts, dur, raw in device_events(read_trace(path) if events is None else events):
        name = kernel_kind(raw)
        totals[name][0] += dur
        totals[name][1] += 1
        intervals.append((ts, ts + dur))
    busy = sum(t for t, _ in totals.values())
    span = max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else 0.0
    classes: dict[str, dict] = {}
    for n, (t, c) in totals.items():
        k = classes.setdefault(op_class(n), {"total_us": 0.0, "count": 0})
        k["total_us"] += t
        k["count"] += c
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"trace": path, "device_busy_us": busy, "span_us": span, "idle_us": _idle_us(intervals),
            "kernel_count": sum(c for _, c in totals.values()),
            "classes": {k: {"total_us": round(v["total_us"], 1), "count": v["count"]}
                        for k, v in sorted(classes.items(), key=lambda kv: -kv[1]["total_us"])},
            "kernels": [{"name": n[:160], "class": op_class(n), "total_us": round(t, 1),
                         "share": t / busy if busy else 0.0, "count": c, "mean_us": round(t / c, 2)}
                        for n, (t, c) in rows]}


def per_step(long: dict, short: dict, steps: int) -> dict:
    """The cost of one decode step: (a generation of `steps` + 1 tokens − one of 1 token) / steps, from their
    summaries — the prefill and the loop's setup cancel. µs and kernels by class, busy, idle and wall (span)."""
    def diff(key):
        return (long[key] - short[key]) / steps

    classes = {c: {"us": round((v["total_us"] - short["classes"].get(c, {}).get("total_us", 0.0)) / steps, 2),
                   "kernels": round((v["count"] - short["classes"].get(c, {}).get("count", 0)) / steps, 1)}
               for c, v in long["classes"].items()}
    return {"steps": steps, "busy_us": round(diff("device_busy_us"), 1), "idle_us": round(diff("idle_us"), 1),
            "span_us": round(diff("span_us"), 1), "kernels": round(diff("kernel_count"), 1), "classes": classes}


def _anchor_kind(name: str) -> str:
    low = name.lower()
    return next((k for k in ("gate_up", "down") if k in low), name[:40])


def gaps(events: list[tuple[float, float, str]], anchor: str = r"moe") -> dict:
    """Over `events` in start order (as `device_events` gives them): the windows when no `anchor` kernel runs,
    between the first anchor and the last, grouped by the kinds of
    anchor on either side ("down→gate_up": from one layer's experts to the next's; "gate_up→down": inside one
    layer): per group the windows' count, their total µs, the µs that some kernel covered (the rest is the graph's
    dependency latency), and each kernel name's µs inside the windows (its overlap with them) and count."""
    runs: list[list] = []  # anchors merged where they overlap: [start, end, first name, last name]
    for s, d, n in events:
        if not re.search(anchor, n.lower()):
            continue
        if runs and s <= runs[-1][1]:
            if s + d > runs[-1][1]:
                runs[-1][1], runs[-1][3] = s + d, n
        else:
            runs.append([s, s + d, n, n])
    windows = [(a[1], b[0], f"{_anchor_kind(a[3])}→{_anchor_kind(b[2])}")
               for a, b in zip(runs, runs[1:], strict=False)]
    out: dict[str, dict] = {}
    j = 0
    longest = max((d for _, d, _ in events), default=0.0)
    for ws, we, label in windows:
        g = out.setdefault(label, {"windows": 0, "total_us": 0.0, "busy_us": 0.0, "kernels": {}})
        g["windows"] += 1
        g["total_us"] += we - ws
        while j < len(events) and events[j][0] < ws - longest:
            j += 1  # ended before this window, and so before every later one
        inside = []
        for s, d, n in events[j:]:
            if s >= we:
                break
            lo, hi = max(s, ws), min(s + d, we)
            if hi > lo:
                inside.append((lo, hi))
                k = g["kernels"].setdefault(kernel_kind(n), [0.0, 0])
                k[0] += hi - lo
                k[1] += 1
        g["busy_us"] += (we - ws) - _idle_us(inside + [(ws, ws), (we, we)])
    return out


def per_step_gaps(long: dict, short: dict, steps: int, top: int = 25) -> dict:
    """`gaps` of a generation of `steps` + 1 tokens less those of 1 token, per step: windows, µs, covered µs, and
    the `top` kernels by their µs inside the windows (µs and count per step)."""
    out = {}
    for label, g in long.items():
        s = short.get(label, {"windows": 0, "total_us": 0.0, "busy_us": 0.0, "kernels": {}})
        ks = {n: ((v[0] - s["kernels"].get(n, (0.0, 0))[0]) / steps, (v[1] - s["kernels"].get(n, (0.0, 0))[1]) / steps)
              for n, v in g["kernels"].items()}
        rows = sorted(ks.items(), key=lambda kv: -kv[1][0])[:top]
        out[label] = {"windows": round((g["windows"] - s["windows"]) / steps, 2),
                      "us": round((g["total_us"] - s["total_us"]) / steps, 1),
                      "covered_us": round((g["busy_us"] - s["busy_us"]) / steps, 1),
                      "kernels": [{"name": n[:160], "us": round(u, 2), "count": round(c, 2)} for n, (u, c) in rows]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--anchor", default=None, metavar="REGEX",
                   help="also the windows when no kernel matching REGEX runs (`gaps`), and the kernels inside them")
    p.add_argument("--hlo", default=None, metavar="DUMP_DIR",
                   help="an XLA dump of the same run (--xla_dump_to, --xla_dump_hlo_as_text): what each kernel runs")
    args = p.parse_args(argv)
    path = newest_trace(args.trace_dir)
    events = read_trace(path)
    s = summarise(path, args.top, events)
    if args.hlo:
        annotate_from_dump(s["kernels"], events, args.hlo)
    print(f"{s['trace']}\ndevice busy {s['device_busy_us'] / 1e3:.1f} ms over a {s['span_us'] / 1e3:.1f} ms span "
          f"(idle {s['idle_us'] / 1e3:.1f} ms), {s['kernel_count']} kernels")
    for c, v in s["classes"].items():
        print(f"{v['total_us']:>12.1f} µs {v['count']:>7} ×  [{c}]")
    for k in s["kernels"]:
        print(f"{k['total_us']:>12.1f} µs {100 * k['share']:5.1f} % {k['count']:>7} × {k['mean_us']:>9.2f} µs "
              f" {k['name']}" + (f"  [{k['hlo']['op']}: {', '.join(k['hlo']['scopes'])}]" if "hlo" in k else ""))
    if args.anchor:
        for label, g in gaps(device_events(events), args.anchor).items():
            print(f"{label}: {g['windows']} windows, {g['total_us']:.1f} µs, {g['busy_us']:.1f} µs covered")
            for name, (us, count) in sorted(g["kernels"].items(), key=lambda kv: -kv[1][0])[:args.top]:
                print(f"{us:>12.1f} µs {count:>7} ×  {name}")


if __name__ == "__main__":
    main()
