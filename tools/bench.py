"""Benchmarks, one subcommand each: `python tools/bench.py SUBCOMMAND ...` (see --help; attention, barrier, chain,
dense, eval, generate, moe, numerics, pipeline, queue, startup, towers).

Run from the repository root with PYTHONPATH=. on a GPU. Each subcommand lives in its own module
(`tools/bench_<name>.py`) exposing `add_parser(subparsers)`, which sets `func` to run it; what they share (the
timer, the HBM bandwidth probes, the JSON writer, random-weight models) is in `tools/bench_common.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention  # noqa: E402
import bench_barrier  # noqa: E402
import bench_chain  # noqa: E402
import bench_dense  # noqa: E402
import bench_eval  # noqa: E402
import bench_generate  # noqa: E402
import bench_moe  # noqa: E402
import bench_numerics  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_queue  # noqa: E402
import bench_startup  # noqa: E402
import bench_towers  # noqa: E402

MODULES = (bench_attention, bench_barrier, bench_chain, bench_dense, bench_eval, bench_generate, bench_moe,
           bench_numerics, bench_pipeline, bench_queue, bench_startup, bench_towers)


def build_parser() -> argparse.ArgumentParser:
    """bench.py's parser: one subcommand per module of MODULES."""
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.add_parser(sub)
    parser.set_defaults(subcommands=sorted(sub.choices))  # `queue` checks its runs against them
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
