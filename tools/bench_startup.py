"""`bench.py startup`: time to first token of `python -m gemma4_jax.generate`, a first run against a second on the
same checkpoint and shapes with the compile cache the first filled (issue #19's warm start).

    PYTHONPATH=. python tools/bench.py startup --preset e4b --json out.json

Writes a random bf16 checkpoint of the preset at its real shapes (`testing.synthetic.write_random_checkpoint`,
with the demo model's tokenizer files beside it: its ids are valid in every Gemma 4 vocabulary) into a temporary
folder, then runs the CLI `--runs` times in fresh processes, one prompt each (streaming, so the CLI prints its time
to first token), all with one fresh `--compile-cache` folder. Reported per run: the CLI's load seconds and time to
first token (from its last stderr line), the process's wall seconds, and the answer (every run must print the same
one); then the second run's time to first token over the first's. The temporary folder is removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench_common import Progress, save_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def add_parser(sub) -> None:
    p = sub.add_parser("startup", help="time to first token of the CLI: a first run, then runs from its compile cache")
    p.add_argument("--preset", default="e4b")
    p.add_argument("--config", default=None, help="a config.json instead of a preset (CPU smoke runs)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: the system's)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _raw_config(args) -> dict:
    from gemma4_jax.config import PRESETS

    if not args.config:
        return dict(PRESETS[args.preset])
    with open(args.config) as f:
        raw = json.load(f)
    return raw.get("text_config") or raw


_TIMES = re.compile(r"loaded in ([0-9.]+)s; time to first token ([0-9.]+)s")


def run(args) -> None:
    from gemma4_jax.demo import demo_path
    from gemma4_jax.testing.synthetic import write_random_checkpoint

    res = {"preset": args.config or args.preset, "runs_asked": args.runs, "max_new_tokens": args.max_new_tokens,
           "date": time.strftime("%Y-%m-%d"), "runs": []}
    progress = Progress(res, args.json, time.time())
    work = tempfile.mkdtemp(prefix="g4-startup-", dir=args.workdir)
    try:
        model, cache = os.path.join(work, "model"), os.path.join(work, "cache")
        res["checkpoint_gib"] = round(write_random_checkpoint(model, _raw_config(args)) / 2**30, 3)
        for name in os.listdir(demo_path()):
            if name.startswith(("tokenizer", "chat_template", "generation_config")):
                shutil.copy(os.path.join(demo_path(), name), model)
        progress("write_checkpoint")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "gemma4_jax.generate", "--model", model, "--prompt", PROMPT,
               "--max-new-tokens", str(args.max_new_tokens), "--compile-cache", cache]
        for i in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            times = _TIMES.search(proc.stderr)
            if proc.returncode != 0 or times is None:
                raise SystemExit(f"run {i + 1} of the CLI failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            res["runs"].append({"wall_s": round(wall, 3), "loaded_s": float(times.group(1)),
                                "time_to_first_token_s": float(times.group(2)), "answer": proc.stdout})
            progress(f"run_{i + 1}")
        ttft = [r["time_to_first_token_s"] for r in res["runs"]]
        res["same_answer"] = len({r["answer"] for r in res["runs"]}) == 1
        if len(ttft) > 1:
            res["second_over_first_ttft"] = ttft[1] / ttft[0]
            res["second_over_first_wall"] = res["runs"][1]["wall_s"] / res["runs"][0]["wall_s"]
        save_json(res, args.json)
        print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
        print("time to first token, s:", ttft, "wall, s:", [r["wall_s"] for r in res["runs"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)
