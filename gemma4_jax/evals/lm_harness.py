"""lm-evaluation-harness model "gemma4-jax": a Gemma 4 checkpoint (or the embedded demo model) as an `lm_eval` LM.

Owns the three request kinds on top of `Gemma4Model`'s public API (`logits`, `generate`, `tokenizer`), the data
loader of the `gsm8k_local` task (`tasks/gsm8k_local.yaml`: lm_eval's `gsm8k` read from local JSON-lines files)
and the command line that registers the model and hands over to lm_eval's own:

    python -m gemma4_jax.evals.lm_harness --model_args path=CKPT,pp=2 --tasks gsm8k_local \\
        --metadata '{"gsm8k_dir": "/data/gsm8k"}' --batch_size 8 [any other lm_eval flag]

From Python: `lm_eval.simple_evaluate(model=Gemma4LM(path=CKPT), tasks=[...])`.

Conventions (those of lm_eval's HF model unless said otherwise):
- BOS once at the front of every context (`tokenizer.encode`; a chat-templated context that already starts with
  `<bos>` keeps that one); an empty context is BOS alone.
- loglikelihood: context and continuation are tokenized together and split at the context's own token count
  (trailing spaces of the context move to the continuation); the result is the sum of log-softmax(logits) over
  the continuation's tokens, and whether every one of them is the argmax.
- loglikelihood_rolling: the text without BOS, its first token predicted from BOS; a text longer than
  `max_length` is scored in lm_eval's disjoint rolling windows (`lm_eval.utils`), each token exactly once.
- Too long an input loses its oldest tokens but keeps a leading BOS (lm_eval's HF model drops BOS with them;
  Gemma is trained to see it first). A prompt for generation gets `max_length - max_gen_toks` tokens.
- Batches: requests sorted longest first, `batch_size` rows per call (a short last batch is filled up with
  padding rows, or copies of its shortest prompt), each row right-padded to a power-of-two length, so that few
  shapes compile. Right padding changes no score: a causal model's logits at a position do not depend on later
  tokens (tested against unpadded forwards).
- generate_until: continuous batching (`model.generate_continuous`, `batch_size` slots, the prompts' common
  few-shot prefix prefilled once) with the checkpoint's stop ids and each request's `max_gen_toks`, the text cut
  at the first of the stop strings. Generation itself does not stop at a stop string: a request runs until its
  end token or its `max_gen_toks`. Greedy text equals `model.generate`'s (float32; bf16 can part within a few
  tokens where the two paths round differently).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  lm_eval fills its registry with its own models only while it is empty
import numpy as np
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

import gemma4_jax

from ..cli import add_compile_cache_args, use_compile_cache
from ..errors import ConfigError, Gemma4Error
from ..generation.options import bucket, check_seed
from .gsm8k import DataError, read_jsonl

MODEL_NAME = "gemma4-jax"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")  # for lm_eval's --include_path
# The generation settings honoured (max_new_tokens: HF's name for max_gen_toks); any other is refused.
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")
# What lm_eval passes to every model; JAX places this one (`pp` picks the devices), so they go unused.
LM_EVAL_OPTIONS = ("device", "max_batch_size", "trust_remote_code")
PAD_ID = 0  # any id would do: padding only ever follows a row's real tokens


def _count(name: str, value) -> int:
    """A positive integer option (lm_eval's command line hands some over as strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = "; give a number of requests per batch" if name == "batch_size" else ""
        raise ConfigError(f"{name} must be a positive integer for {MODEL_NAME}, got {value!r}{hint}")
    return value


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of the (non-empty) stop strings."""
    ends = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[:min(ends)] if ends else text


class Gemma4LM(LM):
    """A Gemma 4 checkpoint as an lm_eval model, registered as "gemma4-jax".

    `path`, `pp`, `dtype`, `attn_impl`, `max_seq_len`, `layer_split` and `progress` go to `gemma4_jax.load` (no
    `path`: the embedded demo model); or pass an already loaded `model`. `batch_size`: requests per forward or
    generate call; `max_length`: tokens of context (default: the model's, `model.context`); `max_gen_toks`: the
    generation length of tasks that give none; `seed`: the sampling seed of tasks that sample.
    """

    def __init__(self, path: str | None = None, pp: int = 1, dtype: str | None = None, attn_impl: str = "auto",
                 max_seq_len: int | None = None, layer_split=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0, progress: bool = True,
                 model=None, **lm_eval_options):
        super().__init__()
        check_options(batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks, seed=seed,
                      **lm_eval_options)
        self.batch_size, self.max_gen_toks, self.seed = _count("batch_size", batch_size), int(max_gen_toks), _seed(seed)
        if model is None:
            model = gemma4_jax.load(path, pp=pp, dtype=dtype, attn_impl=attn_impl, max_seq_len=max_seq_len,
                                    layer_split=layer_split, progress=progress)
        if model.tokenizer is None:
            raise ConfigError(f"{model.path} has no tokenizer.json, so lm_eval's text requests cannot be encoded")
        self.model, self.tokenizer = model, model.tokenizer
        self.max_length = model.context if max_length is None else int(max_length)
        if self.max_length > model.context:
            raise ConfigError(f"max_length {self.max_length} exceeds the model's context of {model.context} tokens")
        # BOS starts every context; it is also the "previous token" of a rolling text's first token.
        self.bos_id = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else model.stop_tokens[0]

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Gemma4LM:
        """As lm_eval's, except that a setting in the model args wins over the command line's defaults (lm_eval
        passes its own `batch_size=1` along even when none was asked for)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Gemma4LM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---------------------------------------------------------------------------------------------
    # Tokens

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS, continuation ids): the whole text tokenized once, split at the context's length."""
        if not context:
            whole = self.tokenizer.encode(continuation)
            return whole[:1], whole[1:]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    def _fit(self, ids: list[int], limit: int) -> list[int]:
        """`ids` cut to `limit` tokens by dropping the oldest, keeping a leading BOS."""
        if len(ids) <= limit:
            return ids
        if ids[0] == self.bos_id and limit > 1:
            return [ids[0], *ids[len(ids) - limit + 1:]]
        return ids[len(ids) - limit:]

    def _pad(self, rows: list[list[int]]) -> np.ndarray:
        """The rows right-padded into one int array [batch_size, T], T a power of two (at most max_length)."""
        t = min(bucket(max(len(r) for r in rows)), self.max_length)
        out = np.full((self.batch_size, t), PAD_ID, np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool):
        """(sum of the continuation's log-probs, greedy?) of each (context ids, continuation ids), in batches
        (`Gemma4Model.token_logprobs`: the scores are computed on the device, only [B, T] comes back)."""
        texts = []
        for ctx, cont in pairs:
            if len(cont) > self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            texts.append(self._fit(ctx + cont, self.max_length + 1))  # inputs: all but the last; targets: all but BOS
        order = sorted(range(len(pairs)), key=lambda i: (-len(texts[i]), texts[i]))
        out: list = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            logp, top = self.model.token_logprobs(self._pad([texts[i][:-1] for i in rows]),
                                                  self._pad([texts[i][1:] for i in rows]))
            for r, i in enumerate(rows):
                n, end = len(pairs[i][1]), len(texts[i]) - 1  # the last n inputs predict the continuation
                out[i] = (float(logp[r, end - n:end].astype(np.float64).sum()), bool(top[r, end - n:end].all()))
            bar.update(len(rows))
        bar.close()
        return out

    # ---------------------------------------------------------------------------------------------
    # lm_eval's requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        out = self._score(pairs, "Running loglikelihood requests", disable_tqdm)
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0], add_bos=False)
            for w in get_rolling_token_windows(token_list=ids, prefix_token=self.bos_id, max_seq_len=self.max_length,
                                               context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows, "Running loglikelihood_rolling requests", disable_tqdm),
                                strict=True):
            totals[n] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _generation(self, kwargs) -> tuple[tuple[str, ...], int, tuple]:
        """(stop strings, max new tokens, sampling items) of one request's generation kwargs."""
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ConfigError(f"{MODEL_NAME} does not support the generation setting(s) {', '.join(unknown)} "
                              f"(it takes {', '.join(GEN_KWARGS)})")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ConfigError(f"until must be a string or a list of strings, got {kwargs['until']!r}")
        max_new = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens"))  # lm_eval's name wins, as in lm_eval
        max_new = _count("max_gen_toks", self.max_gen_toks if max_new is None else max_new)
        if max_new >= self.max_length:
            raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt within max_length {self.max_length}")
        do_sample = kwargs.get("do_sample")
        try:
            temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0) or 0.0)
        except (TypeError, ValueError):
            raise ConfigError(f"temperature must be a number, got {kwargs['temperature']!r}") from None
        if do_sample and temperature <= 0:
            raise ConfigError(f"do_sample=True needs a temperature above 0, got {temperature}")
        if do_sample is False or temperature <= 0:  # greedy, as lm_eval's do_sample=False means
            return tuple(until), max_new, (("temperature", 0.0),)
        top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
        sampling = {"temperature": temperature, "top_k": top_k or None,
                    "top_p": None if top_p is None or float(top_p) >= 1 else float(top_p)}
        return tuple(until), max_new, tuple(sampling.items())

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        plans = [self._generation(kwargs) for _, kwargs in args]  # every request checked before any work
        groups: dict[tuple, list[int]] = {}  # requests that can share a run of the engine
        for i, (_, _, sampling) in enumerate(plans):
            groups.setdefault(sampling, []).append(i)
        stops, out = set(self.model.stop_tokens), [""] * len(args)
        bar = tqdm(total=len(args), desc="Running generate_until requests", disable=disable_tqdm)
        for sampling, idx in groups.items():
            prompts = [self._fit(self.tokenizer.encode(args[i][0]), self.max_length - plans[i][1]) for i in idx]

            def done(j: int, new: list[int], idx=idx) -> None:
                i = idx[j]
                text = self.tokenizer.decode(new[:-1] if new and new[-1] in stops else new)
                out[i] = cut_at_stops(text, plans[i][0])
                self.cache_hook.add_partial("generate_until", args[i], out[i])
                bar.update(1)

            # continuous batching, `batch_size` slots; the few-shot block the prompts share is prefilled once
            self.model.generate_continuous(prompts, max_new_tokens=[plans[i][1] for i in idx], slots=self.batch_size,
                                           seed=self.seed, stop_tokens=self.model.stop_tokens, on_done=done,
                                           shared_prefix=True, **dict(sampling))
        bar.close()
        return out

    # ---------------------------------------------------------------------------------------------
    # Chat templates (lm_eval's --apply_chat_template) and the run's record

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(chat_history), add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return (self.tokenizer.template or "") if chat_template else None

    @property
    def tokenizer_name(self) -> str:
        return os.path.abspath(self.model.path).strip("/").replace("/", "__")

    def get_model_info(self) -> dict:
        run = self.model.run
        return {"model_path": self.model.path, "dtype": run.dtype, "pp": run.pp, "max_length": self.max_length}


# Registered by the importable module only: `python -m` also runs this file as `__main__`, whose class lm_eval would
# refuse as a second model under the same name.
if __name__ != "__main__":
    register_model(MODEL_NAME)(Gemma4LM)


def check_options(*, batch_size=8, max_length=None, max_gen_toks=256, seed=0, **options) -> None:
    """The checks of `Gemma4LM`'s own options that need no model (no unknown names, positive counts, the seed)."""
    names = [p for p in inspect.signature(Gemma4LM).parameters if p not in ("model", "lm_eval_options")]
    unknown = sorted(set(options) - set(names) - set(LM_EVAL_OPTIONS))
    if unknown:
        raise ConfigError(f"{MODEL_NAME} has no model argument(s) {', '.join(unknown)} (it takes {', '.join(names)})")
    _count("batch_size", batch_size)
    _count("max_gen_toks", max_gen_toks)
    if max_length is not None:
        _count("max_length", max_length)
    _seed(seed)


def _seed(value) -> int:
    """The sampling seed (lm_eval's command line hands it over as a string), by the generators' own rule."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return check_seed(value)


def gsm8k_dataset(gsm8k_dir: str | None = None, **_metadata):
    """The `gsm8k_local` task's data: `gsm8k_dir`'s test.jsonl and train.jsonl (GSM8K's JSON lines) as a
    `datasets.DatasetDict`. lm_eval calls it with the task's metadata as keywords: the model args and --metadata,
    which carries `gsm8k_dir`."""
    if not gsm8k_dir:
        raise DataError("the gsm8k_local task reads test.jsonl and train.jsonl from a directory: pass it as "
                        "--metadata '{\"gsm8k_dir\": \"DIR\"}' (in Python: TaskManager(metadata={'gsm8k_dir': DIR}))")
    import datasets  # lm_eval's dependency, and slow to import

    splits = {split: read_jsonl(os.path.join(gsm8k_dir, f"{split}.jsonl")) for split in ("train", "test")}
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})


# -------------------------------------------------------------------------------------------------
# The command line


def _model_args(groups: list[list[str]]) -> dict:
    """--model_args as lm_eval reads them: `k=v,k2=v2`, several `k=v`, or a JSON object."""
    out: dict = {}
    for values in groups:
        if values and values[0].lstrip().startswith("{"):
            out.update(json.loads(values[0]))
        else:
            for v in values:
                out.update(simple_parse_args_string(v))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """lm_eval's command line with `--model gemma4-jax` filled in, and `--include_path` this package's tasks unless
    one is given; `--compile-cache DIR` as in the other command lines. The model args are checked (and the
    checkpoint's config read) before lm_eval starts, so that a bad one is one sentence, at once."""
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_compile_cache_args(ours)
    opts, rest = ours.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    rest = rest[1:] if rest[:1] == ["run"] else rest
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    peek.add_argument("--model", "-M")
    peek.add_argument("--model_args", "-a", nargs="+", action="append", default=[])
    peek.add_argument("--include_path")
    if "-h" in rest or "--help" in rest:
        print(f"python -m gemma4_jax.evals.lm_harness: lm_eval with --model {MODEL_NAME} (model args: "
              f"{', '.join(p for p in inspect.signature(Gemma4LM).parameters if p not in ('model', 'lm_eval_options'))}"
              f"), tasks from {TASKS_DIR}, and --compile-cache DIR; lm_eval's flags:\n")
    try:
        seen, _ = peek.parse_known_args(rest)
        if seen.model not in (None, MODEL_NAME):
            raise ConfigError(f"this command runs the {MODEL_NAME} model; drop --model {seen.model}")
        args = _model_args(seen.model_args)
        check_options(**args)
        if args.get("path") is not None:
            from ..checkpoint import open as open_checkpoint  # imports JAX: here, so that --help does not wait

            open_checkpoint(args["path"])
        use_compile_cache(opts.compile_cache)
        saved, sys.argv = sys.argv, ["lm-eval", *([] if seen.model else ["--model", MODEL_NAME]),
                                     *([] if seen.include_path else ["--include_path", TASKS_DIR]), *rest]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
    except argparse.ArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"error: --model_args is not a valid JSON object ({err})", file=sys.stderr)
        return 2
    except Gemma4Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from gemma4_jax.evals.lm_harness import main as _main  # the importable module, whose class is the registered one

    sys.exit(_main())
