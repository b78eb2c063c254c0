"""What the command lines share: their help layout, the flags of a multi-host run and of the compilation cache, and
how they end (Ctrl-C, a reader that closed the pipe, the process exit, a device that ran out of memory).

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
import tempfile

from .errors import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each flag's default, unless its help text already says it in words ('(default: …)')."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def exit_now(code: int) -> None:
    """Flush stdout and stderr, then end the process with `code` without the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


# A reader that went away (`… | head`) ends a command line quietly with 141 = 128 + SIGPIPE, the status a shell
# reports for any program that a closed pipe ended (`yes | head`): under `set -o pipefail` the output was cut short.
BROKEN_PIPE_STATUS = 141


def quiet_broken_pipe() -> int:
    """After a BrokenPipeError: point stdout and stderr, where they still hold output that cannot be written, at
    /dev/null (so that the interpreter's final flush does not raise again), and return BROKEN_PIPE_STATUS."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # its pipe is closed: what is left in its buffer goes nowhere
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):
                pass
    os.close(devnull)
    return BROKEN_PIPE_STATUS


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
    # the size as the CPU says it ("allocate 4398046511104 bytes") or the GPU's allocator ("allocate 4.00TiB")
    asked = re.search(r"allocat\w* (\d+(?:\.\d+)?) ?(bytes|[KMGT]iB)\b", text)
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    size = f" (an allocation of {float(asked[1]) * scale[asked[2]] / 2**30:.1f} GiB failed)" if asked else ""
    return (f"out of device memory{size}: use a smaller --batch-size or --max-new-tokens, shorter prompts, "
            "or more devices with --pp")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    hosts = p.add_argument_group("several hosts (run the same command on each; use --pp = all devices)")
    hosts.add_argument("--distributed", action="store_true",
                       help="join a multi-host run with jax.distributed.initialize() (cluster auto-detection)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="the coordinator's address (implies --distributed; needs --num-processes, --process-id)")
    hosts.add_argument("--num-processes", type=int, default=None, help="how many processes the run has")
    hosts.add_argument("--process-id", type=int, default=None,
                       help="this process's rank, 0 to --num-processes - 1 (0 prints)")


COMPILE_CACHE_ENV = "GEMMA4_JAX_COMPILE_CACHE"
JAX_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own, read when it is imported
PROGRAM_CACHE_ENV = "GEMMA4_JAX_PROGRAM_CACHE"  # where `generation.programs` keeps executables (its ENV)
_CACHE_ENVS = (COMPILE_CACHE_ENV, JAX_CACHE_ENV)  # the first one set gives the default


def _cache_env() -> str | None:
    """The environment variable that sets the default cache, if any."""
    return next((name for name in _CACHE_ENVS if os.environ.get(name)), None)


def default_compile_cache() -> str:
    """$GEMMA4_JAX_COMPILE_CACHE ('off' turns the cache off), else JAX's own $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/gemma4_jax/jax (~/.cache/gemma4_jax/jax)."""
    if name := _cache_env():
        return os.environ[name]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemma4_jax", "jax")


def check_cwd() -> None:
    """One sentence where the current directory was removed under the process: relative paths cannot resolve."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise ConfigError("the current directory no longer exists; change to one that does and run again") from None


def probe_write(folder: str) -> None:
    """Make and remove one file in `folder`; OSError where it cannot take a new entry (permissions alone miss
    read-only mounts, /proc and root squash)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".gemma4-jax-write-check-")
    os.close(fd)
    os.remove(probe)


def writable_compile_cache(path: str) -> bool:
    """Whether `path` can hold the cache: made if missing, then one probe file written and removed. A path the user
    chose (the flag, or an environment variable) that cannot is one ConfigError sentence; the built-in default
    that cannot (a read-only home) is False: the run goes on without a cache, as before there was one."""
    try:
        os.makedirs(path, exist_ok=True)
        probe_write(path)
        return True
    except OSError as err:
        env = _cache_env()
        if env is None and path == default_compile_cache():
            return False
        given = f"${env}" if env and os.environ[env] == path else "--compile-cache"
        why = "is a file, not a directory" if os.path.isfile(path) else f"cannot be created or written ({err.strerror})"
        raise ConfigError(f"{given} {path} {why}: give a writable directory, or 'off' for no cache") from None


def add_compile_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=default_compile_cache(), metavar="DIR",
                   help=f"JAX's persistent compilation cache: a later run of the same model and shapes loads its "
                        f"programs instead of compiling them ('off': gemma4-jax sets none; environment: "
                        f"{COMPILE_CACHE_ENV})")


def use_compile_cache(path: str | None) -> None:
    """Keep JAX's compiled programs in `path` across processes (None or 'off': leave JAX's setting alone). Every
    program is kept, however fast it compiled; generation's own programs also as executables in `path/programs`
    (`generation.programs`: a later run loads them without tracing). Works before JAX is imported (through its
    environment variables, so a command line's flag checks need not import it) and after (through its config).
    A `path` that cannot be created or written is one ConfigError sentence (`writable_compile_cache`)."""
    if not path or path == "off" or not writable_compile_cache(path):
        return
    env = compile_cache_env(path)
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ.update(env)
        return
    os.environ[PROGRAM_CACHE_ENV] = env[PROGRAM_CACHE_ENV]
    for name, value in _jax_cache_settings(path).items():
        jax.config.update(name, value)


def _jax_cache_settings(path: str) -> dict[str, str | int]:
    """JAX's settings, by config name, for a cache in `path` that keeps every program however fast it compiled."""
    return {"jax_compilation_cache_dir": os.path.abspath(path), "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": 0}


def compile_cache_env(path: str) -> dict[str, str]:
    """The environment variables that give a new process the cache `use_compile_cache(path)` gives this one (JAX's
    settings and generation's program folder), for a tool that starts processes of its own (`bench.py queue`)."""
    return {PROGRAM_CACHE_ENV: os.path.join(os.path.abspath(path), "programs"),
            **{name.upper(): str(value) for name, value in _jax_cache_settings(path).items()}}

