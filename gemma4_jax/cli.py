"""What the command lines share: the flags of a multi-host run and of the compilation cache, and how they end
(Ctrl-C, the process exit, a device that ran out of memory).

After Ctrl-C, a normal interpreter shutdown can crash inside XLA's threads (a segmentation fault, exit 139,
seen when the interrupt lands while a decode chunk compiles), and a KeyboardInterrupt raised inside one of
JAX's garbage-collection callbacks is printed and ignored. So the CLIs take SIGINT themselves and leave through
`os._exit` once their own output is flushed and their files are closed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys


def exit_now(code: int) -> None:
    """Flush stdout and stderr, then end the process with `code` without the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


def on_interrupt_exit(code: int = 130, message: str | None = None) -> None:
    """From now on, Ctrl-C ends the process at once with `code` (after `message` on stderr, if given). For
    commands that hold nothing half-written when interrupted (generation streams to stdout)."""

    def handler(signum, frame):
        try:
            sys.stdout.write("\n") if message is None else sys.stderr.write(message + "\n")
        except Exception:  # interrupted inside a write of the same stream
            pass
        exit_now(code)

    signal.signal(signal.SIGINT, handler)


class InterruptFlag:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so that a loop can check `raise_if_set()`
    between steps: an interrupt that landed inside a callback whose exceptions are ignored still stops it."""

    def __init__(self):
        self.set = False
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.set = True
        raise KeyboardInterrupt

    def raise_if_set(self) -> None:
        if self.set:
            raise KeyboardInterrupt


def out_of_memory(err: BaseException) -> str | None:
    """The one sentence a command line prints when XLA could not allocate device memory (its runtime error with
    RESOURCE_EXHAUSTED: a batch, a context or a model too large for the device), or None for any other error.
    The flags it names are the ones both command lines take."""
    text = str(err)
    if type(err).__name__ not in ("JaxRuntimeError", "XlaRuntimeError") or "RESOURCE_EXHAUSTED" not in text:
        return None
    asked = re.search(r"allocat\w* (\d+) bytes", text)
    size = f" (an allocation of {int(asked[1]) / 2**30:.1f} GiB failed)" if asked else ""
    return (f"out of device memory{size}: use a smaller --batch-size or --max-new-tokens, shorter prompts, "
            "or more devices with --pp")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    hosts = p.add_argument_group("several hosts (run the same command on each; use --pp = all devices)")
    hosts.add_argument("--distributed", action="store_true",
                       help="join a multi-host run with jax.distributed.initialize() (cluster auto-detection)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="the coordinator's address (implies --distributed; needs --num-processes, --process-id)")
    hosts.add_argument("--num-processes", type=int, default=None)
    hosts.add_argument("--process-id", type=int, default=None)


COMPILE_CACHE_ENV = "GEMMA4_JAX_COMPILE_CACHE"


def default_compile_cache() -> str:
    """$GEMMA4_JAX_COMPILE_CACHE ('off' turns the cache off), else JAX's own $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/gemma4_jax/jax (~/.cache/gemma4_jax/jax)."""
    for name in (COMPILE_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR"):
        if os.environ.get(name):
            return os.environ[name]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemma4_jax", "jax")


def add_compile_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=default_compile_cache(), metavar="DIR",
                   help=f"JAX's persistent compilation cache: a later run of the same model and shapes loads its "
                        f"programs instead of compiling them ('off': gemma4-jax sets none; environment: "
                        f"{COMPILE_CACHE_ENV})")


def use_compile_cache(path: str | None) -> None:
    """Keep JAX's compiled programs in `path` across processes (None or 'off': leave JAX's setting alone). Every
    program is kept, however fast it compiled; generation's own programs also as executables in `path/programs`
    (`generation.programs`: a later run loads them without tracing). Works before JAX is imported (through its
    environment variables, so a command line's flag checks need not import it) and after (through its config)."""
    if not path or path == "off":
        return
    os.environ["GEMMA4_JAX_PROGRAM_CACHE"] = os.path.join(os.path.abspath(path), "programs")
    settings = {"jax_compilation_cache_dir": os.path.abspath(path), "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    jax = sys.modules.get("jax")
    for name, value in settings.items():
        if jax is None:
            os.environ[name.upper()] = str(value)
        else:
            jax.config.update(name, value)

