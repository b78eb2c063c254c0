"""Summarise a `jax.profiler` trace: where the device time goes, by kernel.

    python tools/trace_summary.py TRACE_DIR [--top 25]

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes (the newest
under TRACE_DIR), keeps the complete events of the device processes (`/device:GPU:…`; on a CPU-only trace, the
XLA threads), and prints the busiest kernel names: total µs, share of all device time, count, mean µs. Used by
`bench.py generate --profile` to put the profile's evidence into its JSON without shipping the trace.
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


def summarise(path: str, top: int = 25) -> dict:
    """{'device_busy_us', 'span_us', 'kernels': [{name, total_us, share, count, mean_us}, ...]} of one trace."""
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {p for p, n in procs.items() if "GPU" in n or "/device:" in n}

    def on_device(e) -> bool:
        if gpu:
            return e["pid"] in gpu
        return "XLA" in threads.get((e["pid"], e.get("tid")), "")  # CPU-only: the XLA runtime threads

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("ph") != "X" or not on_device(e):
            continue
        name = re.sub(r"\.\d+$", "", e["name"])  # fusion.12 and fusion.13 are one kind of kernel
        totals[name][0] += e.get("dur", 0.0)
        totals[name][1] += 1
        start, end = min(start, e["ts"]), max(end, e["ts"] + e.get("dur", 0.0))
    busy = sum(t for t, _ in totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"trace": path, "device_busy_us": busy, "span_us": max(0.0, end - start),
            "kernels": [{"name": n[:160], "total_us": round(t, 1), "share": t / busy if busy else 0.0, "count": c,
                         "mean_us": round(t / c, 2)} for n, (t, c) in rows]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    s = summarise(newest_trace(args.trace_dir), args.top)
    print(f"{s['trace']}\ndevice busy {s['device_busy_us'] / 1e3:.1f} ms over a {s['span_us'] / 1e3:.1f} ms span")
    for k in s["kernels"]:
        print(f"{k['total_us']:>12.1f} µs {100 * k['share']:5.1f} % {k['count']:>7} × {k['mean_us']:>9.2f} µs "
              f" {k['name']}")


if __name__ == "__main__":
    main()
