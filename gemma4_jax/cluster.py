"""Joining a multi-host run from the command-line tools (`python -m gemma4_jax.generate`, `tools/eval_gsm8k.py`).

Every host runs the same command with `--pp` = all devices; `jax.distributed.initialize` joins them, each
builds only its own pipeline stages, and only process 0 prints and writes files (the others compute in step).
"""

from __future__ import annotations

import argparse

from .errors import ConfigError


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    hosts = p.add_argument_group("several hosts (run the same command on each; use --pp = all devices)")
    hosts.add_argument("--distributed", action="store_true",
                       help="join a multi-host run with jax.distributed.initialize() (cluster auto-detection)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="the coordinator's address (implies --distributed; needs --num-processes, --process-id)")
    hosts.add_argument("--num-processes", type=int, default=None)
    hosts.add_argument("--process-id", type=int, default=None)


def join_cluster(args: argparse.Namespace) -> bool:
    """`jax.distributed.initialize` when the arguments ask for it; True when this process is the one that
    prints and writes (process 0, or the only process)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in explicit):
        return True
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return jax.process_index() == 0
