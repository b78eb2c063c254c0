"""`bench.py queue`: the runs of one GPU call from a queue file, each in its own process, into one JSON file.

    PYTHONPATH=. python3 tools/bench.py queue QUEUE [--budget-s 540] [--json $OUT/queue.json] [--dry-run]

A device call returns at most eight files and ends at its time limit, and a comparison holds only within one call
(docs/gpu-runs.md). So the runs of a call are listed in a queue file (`docs/queues/`) and run here one after another,
each as `python tools/bench.py SUBCOMMAND ARGS --json …` in a fresh process. The runs share JAX's persistent
compilation cache (`--compile-cache`, a folder of the queue's own by default), set as the CLI sets its own
(`cli.compile_cache_env`): a program compiled before loads, however fast it compiled (random init's and the
bandwidth probes' small programs too), generation's programs load as executables without tracing, and XLA tunes
each GEMM fusion once (its autotuning results live in that folder), so a run spends less of the call compiling; its
timings are the compiled program's either way. After every run the
one output file is rewritten whole (through a temporary file), holding each run's command, exit status, seconds,
its own JSON and the end of its log, so that a call cut short still returns every finished run. A run that would
start with less than `--min-left-s` of the budget left is skipped, and each run's timeout is the smaller of its own
and what is left.

Queue file, one item a line (`#` starts a comment):

    set timeout 150                          seconds a run may take from now on (default 150)
    set tree .old-tree                       later runs use that source tree's bench.py and package (`set tree .`:
                                             this one again), for an old commit beside the new in one call
    set generate --prompt-len 128 …          arguments appended to every later `generate` run (replaces the last)
    set card H200                            later runs run only on a card whose name holds that (any case; `cpu`
                                             names a machine without a GPU; `set card any`: every card again); on
                                             another card they are skipped, and a queue none of whose runs can run
                                             here stops before the first with one sentence (exit 1)
    e2b_base generate --preset e2b --batch 1,16
    e2b_two  generate --preset e2b --batch 1,16 --one-row-stream-rows 2
    e2b_xla  XLA_FLAGS=--xla_gpu_… generate --preset e2b --batch 1    (NAME=VALUE words: that run's environment)

A run's name (letters, digits, '.', '_', '-') is unique in the file; the subcommand is one of `bench.py`'s. At the
end a table lists every run; for `generate` runs, decode ms a step and tokens/s per batch, and the ratio to the
queue's first run of the same preset at that batch (put the baseline first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from bench_common import save_json

from gemma4_jax.cli import JAX_CACHE_ENV, PROGRAM_CACHE_ENV, compile_cache_env, writable_compile_cache
from gemma4_jax.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9._-]+")
ENV = re.compile(r"([A-Z_][A-Z0-9_]*)=(.*)")
DEFAULT_TIMEOUT_S = 150.0


@dataclasses.dataclass
class Run:
    name: str
    argv: list[str]  # the subcommand and its arguments, the `set` ones appended
    timeout_s: float
    line: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set for this run's process only
    tree: str = "."  # the source tree whose tools/bench.py and package the run uses, relative to the current directory
    card: str = ""  # the run runs only where the machine's card name holds this (any case); "" on any card

    def command(self) -> str:
        """The run as a shell line, its environment first."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        line = (env + " " if env else "") + "python3 tools/bench.py " + shlex.join(self.argv)
        return line if self.tree == "." else f"(cd {shlex.quote(self.tree)} && PYTHONPATH=. {line})"


class QueueError(ValueError):
    """A queue file that cannot be run; its message is one sentence naming the file and line."""


def parse(text: str, path: str, subcommands: set[str]) -> list[Run]:
    """The runs of a queue file's text, in order (see the module docstring); QueueError on the first bad line."""
    runs, extra, timeout, names, tree, card = [], {}, DEFAULT_TIMEOUT_S, set(), ".", ""
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{path}, line {n}"
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as e:
            raise QueueError(f"{where}: {e}.") from None
        if not words:
            continue
        if words[0] == "set":
            if len(words) == 3 and words[1] == "timeout":
                try:
                    timeout = float(words[2])
                except ValueError:
                    timeout = -1.0
                if not timeout > 0:
                    raise QueueError(f"{where}: the timeout must be a positive number of seconds, not {words[2]!r}.")
            elif len(words) == 3 and words[1] == "tree":
                tree = os.path.normpath(words[2])
            elif len(words) == 3 and words[1] == "card":
                card = "" if words[2].lower() == "any" else words[2]
            elif len(words) >= 2 and words[1] in subcommands:
                extra[words[1]] = words[2:]
            else:
                raise QueueError(f"{where}: `set` takes `timeout SECONDS`, `tree DIR`, `card NAME` or a bench.py "
                                 "subcommand and its arguments.")
            continue
        if len(words) < 2:
            raise QueueError(f"{where}: a run is a name and a bench.py subcommand, got {raw.strip()!r}.")
        name, words = words[0], words[1:]
        env = {}
        while words and (assignment := ENV.fullmatch(words[0])):
            env[assignment[1]] = assignment[2]
            words.pop(0)
        if not words:
            raise QueueError(f"{where}: the run {name!r} names no bench.py subcommand.")
        sub = words[0]
        if not NAME.fullmatch(name):
            raise QueueError(f"{where}: a run's name takes letters, digits, '.', '_' and '-' only, not {name!r}.")
        if name in names:
            raise QueueError(f"{where}: the run name {name!r} is used twice.")
        if sub not in subcommands:
            raise QueueError(f"{where}: {sub!r} is not a bench.py subcommand ({', '.join(sorted(subcommands))}).")
        if "--json" in words[1:]:
            raise QueueError(f"{where}: the queue names each run's JSON file itself; drop --json.")
        names.add(name)
        runs.append(Run(name, [sub, *words[1:], *extra.get(sub, [])], timeout, n, env, tree, card))
    if not runs:
        raise QueueError(f"{path}: the queue holds no runs.")
    return runs


def machine_card() -> str:
    """This machine's (first) GPU's name as `nvidia-smi` gives it, or 'cpu' where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0].strip() if names else "cpu"


def runs_here(run: Run, card: str) -> bool:
    """Whether `run` may run on a machine whose card is named `card` (its `set card`, any case)."""
    return run.card.lower() in card.lower()


def _tail(text: str, lines: int = 30) -> list[str]:
    return text.splitlines()[-lines:]


def record(run: Run, status: str, *, rc: int | None = None, wall_s: float = 0.0, timeout_s: float = 0.0,
           result: dict | None = None, log_tail: list[str] = ()) -> dict:
    """What the output file holds of one run."""
    return {"name": run.name, "subcommand": run.argv[0], "command": run.command(), "tree": run.tree,
            "status": status, "rc": rc, "wall_s": round(wall_s, 1), "timeout_s": round(timeout_s, 1),
            "result": result, "log_tail": list(log_tail)}


def run_one(run: Run, timeout_s: float, workdir: str, cache: str) -> dict:
    """One run in its own process (its own process group, killed whole at the timeout), with JAX's compilation cache
    in `cache` ('off': none, whatever the environment says; a run's own environment line decides over both): its
    record."""
    out = os.path.join(workdir, run.name + ".json")
    env = dict(os.environ)
    if cache == "off":
        env.pop(JAX_CACHE_ENV, None)
        env.pop(PROGRAM_CACHE_ENV, None)
    else:  # as the CLI keeps it: every program, and generation's programs as executables too
        env.update(compile_cache_env(cache))
    env.update(run.env)
    if run.tree == ".":
        bench, cwd = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), None
    else:  # another tree's bench, importing that tree's package
        cwd = os.path.abspath(run.tree)
        bench, env["PYTHONPATH"] = os.path.join(cwd, "tools", "bench.py"), cwd
        if not os.path.isfile(bench):
            return record(run, "failed", log_tail=[f"the tree {run.tree!r} holds no tools/bench.py"])
    cmd = [sys.executable, bench, *run.argv, "--json", out]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env, cwd=cwd)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = "timeout"
    result = None
    if os.path.exists(out):  # a run cut short keeps what its phases wrote
        with open(out) as f:
            result = json.load(f)
    return record(run, status, rc=proc.returncode, wall_s=time.time() - t0, timeout_s=timeout_s, result=result,
                  log_tail=_tail(log or ""))


def generate_rows(records: list[dict]) -> list[tuple]:
    """(run, preset, batch, ms a step, tokens/s, ratio to the queue's first run of that preset and batch) for the
    `generate` runs' measured batches, in queue order."""
    rows, first = [], {}
    for rec in records:
        res = rec.get("result") or {}
        if rec.get("subcommand") != "generate":
            continue
        for b, r in (res.get("results") or {}).items():
            ms = r.get("decode_ms_per_token")
            if ms is None:
                continue
            key = (res.get("preset"), b)
            first.setdefault(key, ms)
            preset = os.path.basename(os.path.dirname(str(key[0]))) if str(key[0]).endswith(".json") else key[0]
            rows.append((rec["name"], preset, b, ms, r.get("decode_tokens_s"), ms / first[key]))
    return rows


def table(records: list[dict]) -> str:
    lines = [f"{'run':<28} {'status':<8} {'s':>6}"]
    for rec in records:
        lines.append(f"{rec['name']:<28} {rec['status']:<8} {rec['wall_s']:>6.0f}")
    rows = generate_rows(records)
    if rows:
        lines += ["", f"{'run':<28} {'preset':<10} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'vs first':>8}"]
        lines += [f"{n:<28} {str(p):<10} {b:>5} {ms:>9.3f} {tps or 0:>10.0f} {ratio:>8.3f}"
                  for n, p, b, ms, tps, ratio in rows]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("queue", help="the runs of a queue file, one process each, into one JSON file")
    p.add_argument("queue", help="the queue file (see tools/bench_queue.py; docs/queues/ holds the planned ones)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for the whole queue (a device call's limit less its start; default 540)")
    p.add_argument("--min-left-s", type=float, default=45.0,
                   help="skip a run that would start with less than this left of the budget (default 45)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache for every run (and XLA's GEMM autotuning results): "
                        "default, a folder of this queue's own, removed at its end; DIR keeps one across queues (a "
                        "git-ignored folder of the checkout, such as .bench-cache, stays on a warm device machine "
                        "between calls); 'off': each run compiles and autotunes from scratch")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def run(args) -> dict:
    subcommands = set(args.subcommands) - {"queue"}
    try:
        with open(args.queue) as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"bench.py queue: cannot read the queue file {args.queue!r} ({e.strerror}).") from None
    try:
        runs = parse(text, args.queue, subcommands)
    except QueueError as e:
        raise SystemExit(f"bench.py queue: {e}") from None
    if args.dry_run:
        for r in runs:
            print(f"{r.name}: {r.command()}  (timeout {r.timeout_s:.0f} s)")
        return {}
    if args.compile_cache not in (None, "off"):  # the CLI's rule for a cache folder the user names
        try:
            writable_compile_cache(args.compile_cache)
        except ConfigError as e:
            raise SystemExit(f"bench.py queue: {e}.") from None
    card = machine_card() if any(r.card for r in runs) else ""
    if not any(runs_here(r, card) for r in runs):
        raise SystemExit(f"bench.py queue: no run of {args.queue} runs on this machine's card ({card!r}): they need "
                         f"{' or '.join(sorted({repr(r.card) for r in runs}))} (`set card`).")
    start = time.time()
    res = {"queue": args.queue, "date": time.strftime("%Y-%m-%d"), "budget_s": args.budget_s, "runs": [],
           "compile_cache": args.compile_cache or "the queue's own"}
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as workdir:
        cache = args.compile_cache or os.path.join(workdir, "jax-cache")
        for r in runs:
            left = args.budget_s - (time.time() - start)
            if not runs_here(r, card):
                rec = record(r, "skipped", log_tail=[f"skipped: it needs a card named like {r.card!r}, this machine "
                                                     f"has {card!r}"])
            elif left < args.min_left_s:
                rec = record(r, "skipped", log_tail=[f"skipped: {left:.0f} s of the budget left"])
            else:
                print(f"[{r.name}] {r.command()}", flush=True)
                rec = run_one(r, min(r.timeout_s, left), workdir, cache)
                print(f"[{r.name}] {rec['status']} in {rec['wall_s']:.0f} s", flush=True)
                if rec["status"] != "ok":
                    print("\n".join(rec["log_tail"][-8:]), flush=True)
            res["runs"].append(rec)
            res["wall_s"] = round(time.time() - start, 1)
            save_json(res, args.json)
    print(table(res["runs"]), flush=True)
    return res
