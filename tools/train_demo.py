"""Train the embedded demo model and write it as a Hugging Face checkpoint directory.

    python tools/train_demo.py [--out gemma4_jax/demo_model] [--steps N] [--seed S] [--lr LR]
                               [--init DIR --data-offset K] [--instruction-prob P]

Builds the demo config (gemma4_jax/demo/train.py), trains a BPE tokenizer on synthetic
grade-school problems, trains the model with optax on chat-formatted problems (loss on the answer
only), prints the loss curve, exports config.json / model.safetensors / tokenizer files / chat
template / generation_config.json, reloads the export with `gemma4_jax.load` and prints its greedy
accuracy on held-out problems, with and without the instruction sentence. Deterministic given --seed.
`--init DIR` continues from an earlier export (its weights and tokenizer) with a fresh learning-rate
schedule over new problems (`--data-offset`). `--instruction-prob P` (default 1.0, every prompt has
the instruction as in the first two stages) trains on bare questions for the other 1 - P of prompts.
The shipped model is three such stages; its training.json records each one's command, loss curve
and held-out accuracies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from gemma4_jax.demo import train as dt

    defaults = dt.TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("gemma4_jax", "demo_model"))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.peak_lr)
    p.add_argument("--held-out", type=int, default=defaults.held_out)
    p.add_argument("--init", default=None, help="continue from this earlier export of tools/train_demo.py")
    p.add_argument("--data-offset", type=int, default=0, help="another stream of training problems")
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--instruction-prob", type=float, default=defaults.instruction_prob,
                   help="share of training prompts that end with the instruction sentence; the others are bare "
                        "questions (default %(default)s)")
    args = p.parse_args(argv)
    command = shlex.join(["python", "tools/train_demo.py", *(sys.argv[1:] if argv is None else argv)])
    if args.steps < 1 or args.batch_size < 1 or args.held_out < 1:
        p.error("--steps, --batch-size and --held-out must be at least 1")
    if not 0.0 <= args.instruction_prob <= 1.0:
        p.error("--instruction-prob must be between 0 and 1")
    tc = dataclasses.replace(defaults, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                             peak_lr=args.lr, held_out=args.held_out, data_offset=args.data_offset,
                             warmup=args.warmup, instruction_prob=args.instruction_prob)

    import jax
    import numpy as np

    import gemma4_jax
    from gemma4_jax.checkpoint.export import export_hf, module_params
    from gemma4_jax.demo import arith
    from gemma4_jax.evals.gsm8k import user_text
    from gemma4_jax.tokenizer import Tokenizer

    t0 = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.default_backend()}; {tc}")
    # Tokenizer: merges learnt from the chat-formatted corpus (seed distinct from training data).
    previous, init = None, None
    if args.init:
        from tokenizers import Tokenizer as HFTokenizer

        init = gemma4_jax.load(args.init, dtype="float32", progress=False).module
        tok = HFTokenizer.from_file(os.path.join(args.init, "tokenizer.json"))
        with open(os.path.join(args.init, "training.json")) as f:
            previous = json.load(f)
    else:
        corpus = ["user\n", "model\n"]
        for prob in arith.held_out(tc.seed + 3, tc.tokenizer_corpus):
            corpus += [user_text(prob["question"]), prob["answer"]]
        tok = dt.train_tokenizer(corpus, tc.vocab_size)

    work = tempfile.mkdtemp(prefix="gemma4_demo_")
    try:
        dt.write_tokenizer_files(tok, work)
        tokenizer = Tokenizer(work)
        lengths = [len(dt.encode_example(tokenizer, q)[0]) for q in arith.held_out(tc.seed + 1, 200)]
        print(f"tokenizer: {tok.get_vocab_size()} ids; example lengths {min(lengths)}-{max(lengths)} tokens")

        model, losses = dt.train(tc, tokenizer, init=init)
        print(f"trained {tc.steps} steps in {time.perf_counter() - t0:.0f}s; final loss "
              f"{np.mean(losses[-tc.log_every:]):.4f}")

        export_hf(work, model.cfg, module_params(model),
                  generation_config={"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50],
                                     "do_sample": False})
        with open(os.path.join(work, "training.json"), "w") as f:
            json.dump({"command": command, "train_config": dataclasses.asdict(tc), "init": args.init,
                       "previous_stage": previous,
                       "loss_every_50": [
                round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]}, f, indent=1)

        loaded = gemma4_jax.load(work, dtype="float32", progress=False)
        problems = arith.held_out(tc.seed + 1, tc.held_out)
        acc = dt.held_out_accuracy(loaded, problems)
        bare = dt.held_out_accuracy(loaded, problems, instruction=False)
        print(f"held-out accuracy (greedy, {tc.held_out} synthetic problems): {acc:.3f} with the instruction, "
              f"{bare:.3f} without")
        with open(os.path.join(work, "training.json")) as f:
            info = json.load(f)
        info["held_out_accuracy"] = acc
        info["held_out_accuracy_no_instruction"] = bare
        info["train_seconds"] = round(time.perf_counter() - t0)
        with open(os.path.join(work, "training.json"), "w") as f:
            json.dump(info, f, indent=1)

        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        shutil.copytree(work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
