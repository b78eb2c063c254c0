"""Convert a Hugging Face Gemma 4 checkpoint into per-stage orbax checkpoints.

    python tools/convert_checkpoint.py --hf-dir HF_DIR --out OUT_DIR [--pp N | --layer-split 0,a,...,L]
                                       [--dtype float32|bfloat16] [--overwrite]

Each pipeline stage gets only its layers (and its columns of the per-layer embedding table); the
embedding goes to the first stage and a copy of it, the tied head, with the final norm to the last.
The default split minimises the parameter bytes per device. See gemma4_jax/checkpoint/staged.py for the format.
--out may not be empty, the source, a folder inside or holding it, or the current or home directory; --overwrite
replaces only an earlier conversion (a directory with the converter's manifest.json), once the new one is complete.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def os_error_in(err: BaseException) -> str | None:
    """The operating system's complaint behind `err` — an OSError, one that orbax wrapped in another exception
    or an exception group, or tensorstore's "[os_error_code='N']" — as its strerror, else None."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and (e.strerror or e.errno):
            return e.strerror or os.strerror(e.errno)
        if code := re.search(r"os_error_code='(\d+)'", str(e)):
            return os.strerror(int(code.group(1)))
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _stderr_to(stream, current) -> None:
    """Point stderr, and the logging handlers that write to it (absl's, set up when orbax is imported), from
    `current` to `stream`."""
    for logger in (logging.getLogger(), logging.getLogger("absl")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is current:
                handler.setStream(stream)
    sys.stderr = stream


def main(argv=None, exiting: bool = False) -> int:
    """The command. `exiting`: the process ends right after a failure (`exit_now`), so orbax's threads stay
    silenced until then instead of printing after the error sentence."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face Gemma 4 checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--pp", type=int, default=None,
                       help="number of stages, split by parameter bytes per device (default 1)")
    split.add_argument("--layer-split", default=None, help="explicit stage boundaries, e.g. 0,21,42")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="stored dtype (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from gemma4_jax.checkpoint.staged import check_output, convert
    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.parallel.stages import parse_layer_split

    real_err, noise = sys.stderr, io.StringIO()
    try:
        check_output(args.hf_dir, args.out, args.overwrite)  # before anything is read
        stages = None
        if args.layer_split is not None:
            if not os.path.isdir(args.hf_dir):
                raise Gemma4Error(f"{args.hf_dir} is not a directory")
            stages = parse_layer_split(args.layer_split, Gemma4Config.from_json(args.hf_dir).num_layers)
        # While writing, orbax's background threads print their own tracebacks when the file system fails;
        # they go to `noise`, shown only if the failure is not one this command explains in a sentence.
        _stderr_to(noise, real_err)
        m = convert(args.hf_dir, args.out, stages, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                    progress=not args.no_progress, log=lambda s: print(s, file=real_err), progress_file=real_err)
        _stderr_to(real_err, noise)
        real_err.write(noise.getvalue())
    except Gemma4Error as err:
        _stderr_to(real_err, noise)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _stderr_to(real_err, noise)
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # a file system that refuses (read-only, full, over a size limit), maybe wrapped
        os_err = os_error_in(err)
        if os_err is None or not exiting:
            _stderr_to(real_err, noise)
        if os_err is None:
            real_err.write(noise.getvalue())
            raise
        print(f"error: cannot write {os.path.abspath(args.out)}: {os_err}; nothing was written", file=real_err)
        return 1
    total = sum(s["bytes_on_disk"] for s in m["stages"])
    print(f"wrote {m['num_stages']} stage(s), {total / 2**30:.2f} GiB, to {os.path.abspath(args.out)} "
          f"in {m['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from gemma4_jax.cli import exit_now

    status = main(exiting=True)
    if status:
        exit_now(status)  # after a failure orbax's threads would print again during the interpreter's shutdown
    sys.exit(status)
