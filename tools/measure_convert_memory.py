"""Measure the converter's peak resident memory on a multi-GB random checkpoint at real shapes.

    python tools/measure_convert_memory.py [--preset e2b] [--layers N] [--pp 2] [--workdir DIR] [--keep]

Writes a random bf16 checkpoint with the published tensor names and shapes (`--layers` trims the
layer count to save disk and time), converts it in a child process while sampling the child's
/proc status, and prints the peak resident set (VmHWM), its anonymous part, the checkpoint and
stage sizes, and the time. Figures for the README come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="e2b")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (default: all)")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)

    from gemma4_jax.config import PRESETS
    from gemma4_jax.testing.synthetic import write_random_checkpoint

    raw = dict(PRESETS[args.preset])
    if args.layers:
        raw["layer_types"] = raw["layer_types"][: args.layers]
        raw["num_kv_shared_layers"] = 0  # a trimmed stack keeps no sharing (its sources may be cut)
        raw["num_hidden_layers"] = args.layers
    work = args.workdir or tempfile.mkdtemp(prefix="g4-convmem-")
    hf, out = os.path.join(work, "hf"), os.path.join(work, "converted")
    t = time.perf_counter()
    size = write_random_checkpoint(hf, raw)
    print(f"random checkpoint: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--hf-dir", hf, "--out", out,
           "--pp", str(args.pp), "--no-progress", "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            s = _status(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.05)

    th = threading.Thread(target=sample)
    th.start()
    rc = proc.wait()
    th.join()
    secs = time.perf_counter() - t
    if rc != 0:
        print(f"conversion failed with exit status {rc}", file=sys.stderr)
        return rc
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    stage_max = max(s["param_bytes"] for s in m["stages"])
    result = {"preset": args.preset, "layers": raw["num_hidden_layers"], "pp": args.pp,
              "checkpoint_gib": round(size / 2**30, 2), "largest_stage_gib": round(stage_max / 2**30, 2),
              "peak_rss_mib": round(peak["VmHWM"] / 2**20), "peak_anon_mib": round(peak["RssAnon"] / 2**20),
              "peak_file_mib": round(peak["RssFile"] / 2**20), "seconds": round(secs, 1)}
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
