"""Joining a multi-host run from the command-line tools (`python -m gemma4_jax.generate`, `tools/eval_gsm8k.py`).

Every host runs the same command with `--pp` = all devices; `jax.distributed.initialize` joins them, each
builds only its own pipeline stages, and only process 0 prints and writes files (the others compute in step).
The command lines reach `join_cluster` as `gemma4_jax.join_cluster` (a lazy attribute: their `--help` and flag
checks do not wait for JAX); `add_cluster_args` is plain argparse.
"""

from __future__ import annotations

import argparse

import jax

from ..errors import ConfigError


def check_cluster_args(args: argparse.Namespace) -> None:
    """The cluster flags' one rule, checked before anything else happens (the CLIs call it with their other
    checks)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")


def join_cluster(args: argparse.Namespace) -> bool:
    """`jax.distributed.initialize` when the arguments ask for it; True when this process is the one that
    prints and writes (process 0, or the only process)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in explicit):
        return True
    check_cluster_args(args)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return jax.process_index() == 0
