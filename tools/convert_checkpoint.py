"""Convert a Hugging Face Gemma 4 checkpoint into per-stage orbax checkpoints.

    python tools/convert_checkpoint.py --hf-dir HF_DIR --out OUT_DIR [--pp N | --layer-split 0,a,...,L]
                                       [--dtype float32|bfloat16] [--overwrite]

Each pipeline stage gets only its layers (and its columns of the per-layer embedding table); the
embedding goes to the first stage and a copy of it, the tied head, with the final norm to the last.
The default split minimises the parameter bytes per device. See gemma4_jax/stage_checkpoint.py for the format.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face Gemma 4 checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--pp", type=int, default=None,
                       help="number of stages, split by parameter bytes per device (default 1)")
    split.add_argument("--layer-split", default=None, help="explicit stage boundaries, e.g. 0,21,42")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="stored dtype (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.stage_checkpoint import convert
    from gemma4_jax.stages import parse_layer_split

    try:
        stages = None
        if args.layer_split is not None:
            if not os.path.isdir(args.hf_dir):
                raise Gemma4Error(f"{args.hf_dir} is not a directory")
            stages = parse_layer_split(args.layer_split, Gemma4Config.from_json(args.hf_dir).num_layers)
        m = convert(args.hf_dir, args.out, stages, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                    progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    except Gemma4Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    total = sum(s["bytes_on_disk"] for s in m["stages"])
    print(f"wrote {m['num_stages']} stage(s), {total / 2**30:.2f} GiB, to {os.path.abspath(args.out)} "
          f"in {m['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
