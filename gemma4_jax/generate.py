"""`python -m gemma4_jax.generate`: generate text from one prompt (streamed) or many (batched).

Thin command line over `gemma4_jax.load(...).generate(...)`. Prompts come from `--prompt` or stdin
(UTF-8, one per line; a blank line gets an empty output line, so outputs stay in line with inputs).
Timing goes to stderr, text to stdout; with `--show-thoughts`, the thoughts go to stderr as one `[thoughts] …`
line per prompt. Flags are checked before the model loads. Bad flags or input end with one sentence on stderr
and exit status 2 (usage) or 1 (everything else); Ctrl-C ends with 130; a reader that closes the pipe early
(`| head`) ends it quietly with 141.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gemma4_jax

from .chat import ThoughtStream, split_thoughts
from .cli import (
    HelpFormatter,
    add_cluster_args,
    add_compile_cache_args,
    exit_now,
    on_interrupt_exit,
    out_of_memory,
    quiet_broken_pipe,
    use_compile_cache,
)
from .errors import ConfigError, Gemma4Error
from .generation.options import check_context, check_sampling
from .tokenizer import StreamDecoder

THOUGHTS_LABEL = "[thoughts] "  # what opens a prompt's line of thoughts on stderr (--show-thoughts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma4_jax.generate", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF or converted checkpoint directory (default: the embedded demo model)")
    p.add_argument("--prompt", nargs="*", default=None,
                   help="prompt text(s) (default: read stdin, one prompt per line)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the chat template (default: on)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", default=argparse.SUPPRESS,
                      help="raw text instead of the chat template (BOS is still added once)")
    p.add_argument("--think", action="store_true",
                   help="the template's thinking mode: the model thinks before answering; only the answer is printed")
    p.add_argument("--show-thoughts", action="store_true", help="with --think: also print the thoughts, on stderr")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --temperature > 0: sample only among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --temperature > 0: nucleus sampling, only among the most likely tokens whose "
                        "probabilities add up to P, in (0, 1] (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts from stdin decoded together (continuous batching: a prompt's slot takes the next "
                        "prompt as soon as its answer ends); answers are written in input order as they complete")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "cudnn", "pallas", "interpret"],
                   help="attention: on GPU the fastest measured of Pallas kernels, cuDNN and XLA per call (auto), "
                        "or one forced")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameters and activations (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (single) prompt; repeat for several; placed at the prompt's <|image|> "
                        "markers, else first")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a mono 16 kHz 16-bit .wav for the prompt; repeat for several")
    p.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image")
    add_compile_cache_args(p)
    add_cluster_args(p)
    return p


def utf8(raw: bytes, where: str) -> str:
    """`raw` decoded as UTF-8, or one ConfigError sentence naming `where` and the first byte that is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_prompts(args: argparse.Namespace, stdin, err) -> list[str]:
    """The prompts: `--prompt` texts (UTF-8; none may be blank), or stdin's lines (UTF-8; blank lines kept as '')."""
    if args.prompt:
        for i, text in enumerate(args.prompt, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # argv's undecodable bytes arrive as surrogate escapes: name the first
                try:
                    utf8(os.fsencode(text), f"prompt {i}")
                except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (a caller of run())
                    pass
                raise ConfigError(f"prompt {i} is not UTF-8 text") from None
            if not text.strip():
                raise ConfigError(f"prompt {i} is empty")
        return list(args.prompt)
    if stdin.isatty():
        err.write("reading prompts from stdin, one per line; Ctrl-D to end\n")
        err.flush()
    raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    if isinstance(raw, bytes):
        raw = utf8(raw, "stdin")
    prompts = raw.splitlines()
    if not any(p.strip() for p in prompts):
        raise ConfigError("no prompt given: pass --prompt TEXT or write prompts to stdin")
    return prompts


def check_args(args: argparse.Namespace) -> None:
    """Everything about the flags that can be checked before the model loads (minutes, for a real one)."""
    from .parallel.cluster import check_cluster_args

    check_cluster_args(args)
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        flag = "--top-k" if args.top_k is not None else "--top-p"
        raise gemma4_jax.ConfigError(f"{flag} samples, so it needs --temperature above 0 (0 is greedy)")
    if args.pp < 1:
        raise gemma4_jax.ConfigError(f"--pp must be at least 1, got {args.pp}")
    if args.batch_size < 1:
        raise gemma4_jax.ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.show_thoughts and not args.think:
        raise gemma4_jax.ConfigError("--show-thoughts needs --think")
    if (args.think or args.show_thoughts) and not args.chat:
        raise gemma4_jax.ConfigError("--think and --show-thoughts need the chat template: drop --no-chat")
    for kind, paths in (("image", args.image), ("audio", args.audio)):
        for path in paths:
            if not os.path.isfile(path):
                raise gemma4_jax.ConfigError(f"{kind} file {path!r} does not exist")


class ThoughtLine:
    """Streamed thoughts written the way the batched path writes a whole prompt's: `[thoughts] …` and a newline
    (`close()`), without the channel's leading and trailing whitespace (`split_thoughts` strips it); nothing when
    there are none."""

    def __init__(self, write):
        self.write, self.open, self.held = write, False, ""

    def push(self, piece: str) -> None:
        text = self.held + piece
        if not self.open:
            text = text.lstrip()
            if not text:
                return
            self.write(THOUGHTS_LABEL)
            self.open = True
        body = text.rstrip()
        self.held = text[len(body):]  # trailing whitespace: written only if more thoughts follow it
        if body:
            self.write(body)

    def close(self) -> None:
        if self.open:
            self.write("\n")
        self.open, self.held = False, ""


def run(args: argparse.Namespace, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> int:
    check_args(args)
    prompts = read_prompts(args, stdin, err)
    use_compile_cache(args.compile_cache)
    if not gemma4_jax.join_cluster(args):  # the other hosts compute in step with process 0; only it prints
        out = err = open(os.devnull, "w")  # noqa: SIM115
    t0 = time.perf_counter()
    model = gemma4_jax.load(args.model, pp=args.pp, dtype=args.dtype, attn_impl=args.attn_impl)
    if model.tokenizer is None:
        raise gemma4_jax.ConfigError(f"{model.path} has no tokenizer.json, so text prompts cannot be encoded")
    tok = model.tokenizer
    soft = None
    todo = [i for i, p in enumerate(prompts) if p.strip()]  # blank stdin lines get an empty output line
    texts = [prompts[i] for i in todo]
    if args.image or args.audio:
        ids, soft = model.media_prompt(texts, args.image, args.audio, args.image_tokens, args.chat)
    else:
        ids = [tok.encode_chat(p, args.think) if args.chat else tok.encode(p) for p in texts]
    check_context([len(p) for p in ids], args.max_new_tokens, model.context, who=lambda i: f"prompt {todo[i] + 1}",
                  new="--max-new-tokens")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    stops = set(model.stop_tokens)
    first: list[float] = []
    start = time.perf_counter()
    streaming = len(prompts) == 1  # at --pp > 1 too: the pipeline's ring streams a chunk of tokens per call

    def answer_of(text: str) -> str:  # with the chat template, the thought channel is not the answer
        if not args.chat:
            return text
        thoughts, answer = split_thoughts(text)
        if thoughts and args.show_thoughts:
            err.write(f"{THOUGHTS_LABEL}{thoughts}\n")
        return answer

    if streaming:
        text = StreamDecoder(tok)
        ended = []
        thought_line = ThoughtLine(err.write)

        def answer(piece: str) -> None:  # the thoughts' line ends where the answer begins
            thought_line.close()
            out.write(piece)

        shown = ThoughtStream(answer, thought_line.push if args.show_thoughts else None) if args.chat else None
        emit = shown.push if shown else out.write

        def stream(block: np.ndarray) -> None:
            if not first:
                first.append(time.perf_counter())
            for t in block[0].tolist():
                if ended or t in stops:
                    ended.append(t)
                    continue
                emit(text.push([t]))
            out.flush()

        outs = model.generate(ids, on_tokens=stream, soft_tokens=soft, **sampling)
        emit(text.flush())
        if shown:
            shown.flush()
        thought_line.close()  # thoughts with no answer after them
        out.write("\n")
    else:  # stdin: continuous batching, each answer written once those before it are
        texts_out: list[str | None] = [None] * len(prompts)
        for i, p in enumerate(prompts):
            if not p.strip():
                texts_out[i] = ""
        shown = [0]

        def done(j: int, o: list[int]) -> None:
            texts_out[todo[j]] = answer_of(tok.decode([t for t in o if t not in stops])).replace("\n", "\\n")
            while shown[0] < len(prompts) and texts_out[shown[0]] is not None:
                out.write(texts_out[shown[0]] + "\n")
                shown[0] += 1
            out.flush()

        outs = model.generate_continuous(ids, slots=args.batch_size, on_done=done, **sampling)
    out.flush()  # a reader that went away (`| head`) is found here, not in the interpreter's final flush
    end = time.perf_counter()
    n = sum(len(o) for o in outs)
    ttft = f"time to first token {first[0] - start:.3f}s; " if streaming and first else ""
    err.write(f"loaded in {start - t0:.2f}s; {ttft}{n} tokens in {end - start:.2f}s "
              f"({n / max(end - start, 1e-9):.1f} tokens/s)\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Gemma4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing more to say, and nowhere to say it
        return quiet_broken_pipe()
    except Exception as e:
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"error: {oom}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    on_interrupt_exit(130)  # Ctrl-C anywhere (a compile, a gc callback) ends the process at once, with 130
    status = main()
    if status == 130:
        exit_now(status)
    sys.exit(status)
