"""Evaluate a Gemma 4 checkpoint on GSM8K (greedy, exact match of the final number).

    python tools/eval_gsm8k.py [--model PATH] [--data FILE.jsonl] [--limit N] [--batch-size B] [--pp N]
           [--max-new-tokens N] [--out RESULTS.json] [--shots K] [--resume]

With no --model it evaluates the embedded demo model; with no --data it tries the `datasets`
library (openai/gsm8k, test split). Writes a JSON summary (accuracy, correct, total, 95 % Wilson
interval, records) to --out and the per-example records, as JSON lines, beside it
(RESULTS.records.jsonl); --resume continues an interrupted run from that file. The logic lives in
`gemma4_jax.evals.gsm8k`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from gemma4_jax.cli import HelpFormatter, add_cluster_args, add_compile_cache_args

    p = argparse.ArgumentParser(prog="tools/eval_gsm8k.py", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="HF or converted checkpoint directory (default: the demo model)")
    p.add_argument("--data", default=None, help="GSM8K JSON-lines file (default: openai/gsm8k via `datasets`)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together (slots, with --engine)")
    p.add_argument("--engine", action="store_true",
                   help="continuous batching: a question's slot takes the next question as soon as its answer ends "
                        "(the same greedy answers as static batches; at --pp > 1 the slots are the ring's rows)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per answer")
    p.add_argument("--out", default="gsm8k_results.json", help="JSON summary (records go beside it)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples from the train set")
    p.add_argument("--shots-data", default=None, help="train-set JSON lines (default: train.jsonl beside --data)")
    p.add_argument("--resume", action="store_true", help="continue from the records of an interrupted run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameters and activations (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--think", action="store_true",
                   help="the template's thinking mode; answers are read after the thought channel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_cache_args(p)
    add_cluster_args(p)  # several hosts: only process 0 writes; --resume needs a file system they share
    return p


def main(argv: list[str] | None = None, interrupts=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.evals.gsm8k import check_out, run_eval

    try:
        check_out(args.out)  # before JAX is imported: a bad --out fails at once, leaving nothing on disk
    except Gemma4Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from gemma4_jax import join_cluster
    from gemma4_jax.cli import out_of_memory, quiet_broken_pipe, use_compile_cache
    from gemma4_jax.parallel.cluster import check_cluster_args

    try:
        check_cluster_args(args)  # before the compile cache changes anything in this process
        use_compile_cache(args.compile_cache)
        writer = join_cluster(args)
        # A Ctrl-C that lands inside a callback whose exceptions are ignored still stops the run after the batch.
        on_batch = (lambda n: interrupts.raise_if_set()) if interrupts is not None else None
        run_eval(args.model, args.data, out=args.out, limit=args.limit, batch_size=args.batch_size, pp=args.pp,
                 max_new_tokens=args.max_new_tokens, shots=args.shots, shots_data=args.shots_data,
                 resume=args.resume, dtype=args.dtype, progress=not args.quiet and writer, write=writer,
                 on_batch=on_batch, thinking=args.think, engine=args.engine)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except Gemma4Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout went away (`| head`) after the results were written: say nothing
        return quiet_broken_pipe()
    except OSError as err:
        print(f"error: {err.strerror or err} ({err.filename})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the finished records are kept: rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as err:
        if (oom := out_of_memory(err)) is None:
            raise
        print(f"error: {oom}; rerun with --resume to keep the finished records", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from gemma4_jax.cli import InterruptFlag, exit_now

    status = main(interrupts=InterruptFlag())
    if status == 130:
        exit_now(status)  # no interpreter shutdown after Ctrl-C: it can crash inside XLA's threads
    sys.exit(status)
