"""What the command lines share: the flags of a multi-host run, and how they end (Ctrl-C, the process exit).

After Ctrl-C, a normal interpreter shutdown can crash inside XLA's threads (a segmentation fault, exit 139,
seen when the interrupt lands while a decode chunk compiles), and a KeyboardInterrupt raised inside one of
JAX's garbage-collection callbacks is printed and ignored. So the CLIs take SIGINT themselves and leave through
`os._exit` once their own output is flushed and their files are closed.
"""

from __future__ import annotations

import argparse
import os
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


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    hosts = p.add_argument_group("several hosts (run the same command on each; use --pp = all devices)")
    hosts.add_argument("--distributed", action="store_true",
                       help="join a multi-host run with jax.distributed.initialize() (cluster auto-detection)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="the coordinator's address (implies --distributed; needs --num-processes, --process-id)")
    hosts.add_argument("--num-processes", type=int, default=None)
    hosts.add_argument("--process-id", type=int, default=None)
