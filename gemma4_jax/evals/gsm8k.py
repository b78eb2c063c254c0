"""GSM8K evaluation: prompts, answer extraction, scoring, resumable runs.

Owns the instruction that asks for the final answer after `####` (the demo model is trained on the
same one), zero- and few-shot chat prompts, the answer extraction (`####` line, else the last
number; commas, dollar signs and trailing periods handled), the Wilson confidence interval, the
per-example records file (JSON lines, rewritten atomically after every batch so that `resume`
continues an interrupted run), and the evaluation loop over `Gemma4Model.generate`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

from tqdm.auto import tqdm

import gemma4_jax

from ..chat import split_thoughts
from ..cli import check_cwd, probe_write
from ..errors import Gemma4Error

INSTRUCTION = "Solve step by step and give the final answer after ####."
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: `<<16-3-4=9>>`


class DataError(Gemma4Error):
    """A GSM8K data or records file that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Answers


def normalize_number(text: str) -> str | None:
    """'$1,234.50.' -> '1234.5'; '-7' -> '-7'; None when `text` holds no number."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    raw = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(value.to_integral_value())
    return format(value.normalize(), "f")


def extract_answer(output: str) -> str | None:
    """The model's final answer: the first number after the last `####`, else the last number of the text."""
    if "####" in output:
        tail = output.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0] if tail else ""
        found = normalize_number(line)
        if found is not None:
            return found
    numbers = _NUMBER.findall(output)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(answer: str) -> str:
    """The number after `####` in a GSM8K answer."""
    if "####" not in answer:
        raise DataError("a GSM8K answer lacks its '#### <number>' line")
    found = normalize_number(answer.rsplit("####", 1)[1])
    if found is None:
        raise DataError(f"the GSM8K answer line {answer.rsplit('####', 1)[1].strip()!r} holds no number")
    return found


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (well behaved at 0 and 1, unlike p ± 2σ)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------
# Prompts


def user_text(question: str) -> str:
    """The user turn: the question, then the instruction to end with `#### <number>`."""
    return f"{question.strip()}\n{INSTRUCTION}"


def shot_answer(answer: str) -> str:
    """A train-set answer as a few-shot model turn (calculator annotations removed)."""
    return _CALC.sub("", answer).strip()


def chat_messages(question: str, shots: Sequence[dict] = ()) -> list[dict]:
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": user_text(s["question"])},
                     {"role": "assistant", "content": shot_answer(s["answer"])}]
    return [*messages, {"role": "user", "content": user_text(question)}]


def render_chat(tokenizer, messages: list[dict], enable_thinking: bool = False) -> str:
    """The checkpoint's chat template rendered over several turns (`tokenizer.apply_chat_template`)."""
    return tokenizer.apply_chat_template(messages, enable_thinking=enable_thinking)


def prompt_ids(tokenizer, question: str, shots: Sequence[dict] = (), enable_thinking: bool = False) -> list[int]:
    return tokenizer.encode(render_chat(tokenizer, chat_messages(question, shots), enable_thinking), add_bos=True)


# ---------------------------------------------------------------------------------------------
# Data and records


def read_jsonl(path: str) -> list[dict]:
    """GSM8K-format lines: objects with string `question` and `answer` (ending in `#### <number>`)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"no data file at {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err.__class__.__name__})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {n} is not valid JSON") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise DataError(f"{path} line {n} lacks a string 'question' and 'answer'")
        try:
            reference_answer(row["answer"])
        except DataError as err:
            raise DataError(f"{path} line {n}: {err}") from None
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise DataError(f"{path} holds no GSM8K examples")
    return rows


def load_hf_gsm8k(split: str = "test") -> list[dict]:
    """`openai/gsm8k` (config 'main') through the `datasets` library."""
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]
    except Exception as err:  # any failure (not installed, offline, no cache) has the same remedy
        reason = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        raise DataError(f"could not load openai/gsm8k ({split} split) with the datasets library ({reason}); "
                        f"pass a GSM8K JSON-lines file instead with --data FILE.jsonl") from None


def atomic_write(path: str, text: str) -> None:
    """Write via a temporary file and a rename, so that `path` is never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: leave no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def records_path(out: str) -> str:
    root, ext = os.path.splitext(out)
    return (root if ext == ".json" else out) + ".records.jsonl"


def read_records(path: str) -> list[dict]:
    """Finished records of an earlier run (none when the file does not exist)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"records file {path} line {n} is not valid JSON; delete it to start over") from None
            if not isinstance(rec, dict) or not {"index", "question", "correct"} <= set(rec):
                raise DataError(f"records file {path} line {n} is not a GSM8K record; delete it to start over")
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation loop


def evaluate(model, examples: Sequence[dict], *, batch_size: int = 8, max_new_tokens: int = 256,
             shots: Sequence[dict] = (), records_file: str | None = None, resume: bool = False,
             progress: bool = True, on_batch: Callable[[int], None] | None = None, write: bool = True,
             settings: dict | None = None, thinking: bool = False, engine: bool = False) -> dict:
    """Greedy-generate an answer to every example and score it; returns the summary dict.

    `engine`: continuous batching (`Gemma4Model.generate_continuous`) with `batch_size` slots instead of static
    batches: a question's slot takes the next question as soon as its answer ends, and at pp = 1 the prompt
    tokens all questions share (the few-shot block) are prefilled once (`prefill` in the summary: tokens computed,
    and without the shared prefix). Greedy answers are the same either way; records are written after every
    `batch_size` answers.

    With `thinking`, the template's thinking mode is on and the answer is extracted from the text after the
    thought channel only (the record keeps the thoughts apart).

    With `records_file`, the records so far are rewritten atomically after each batch (unless `write` is
    False: the other hosts of a multi-host run); with `resume`, records already there (matched by index and
    question) are kept and not redone. Every record carries `settings` (what changes an answer: the model and
    its dtype as `run_eval` gives them, max_new_tokens, shots), and `resume` refuses records made with other
    settings.
    `on_batch(n_done)` is called after each batch (tests use it to simulate an interruption).
    """
    if model.tokenizer is None:
        raise DataError("the model has no tokenizer.json, so GSM8K questions cannot be encoded")
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError("--batch-size and --max-new-tokens must be at least 1")
    settings = dict(settings or {}, max_new_tokens=max_new_tokens, shots=len(shots))
    if thinking:
        settings["thinking"] = True
    done: dict[int, dict] = {}
    if resume and records_file:
        for rec in read_records(records_file):
            if rec.get("settings") != settings:
                theirs = rec.get("settings") or "no recorded settings"
                raise DataError(f"records file {records_file} was made with {theirs}, not {settings}; rerun with "
                                f"those settings, or delete it to start over")
            i = rec["index"]
            if isinstance(i, int) and i >= len(examples):
                continue  # past a smaller --limit than the first run's
            if not (isinstance(i, int) and 0 <= i) or examples[i]["question"] != rec["question"]:
                raise DataError(f"records file {records_file} belongs to other data (record {i} does not match); "
                                f"delete it or drop --resume")
            done[i] = rec
    todo = [i for i in range(len(examples)) if i not in done]
    tok, stops = model.tokenizer, set(model.stop_tokens)

    bar = None
    if progress:

        bar = tqdm(total=len(examples), initial=len(done), desc="gsm8k", unit="q")

    def record(i: int, o: list[int]) -> None:
        thoughts, text = split_thoughts(tok.decode([t for t in o if t not in stops]))
        ref = reference_answer(examples[i]["answer"])
        got = extract_answer(text)
        done[i] = {"index": i, "question": examples[i]["question"], "reference": ref, "output": text,
                   "extracted": got, "correct": got is not None and Decimal(got) == Decimal(ref),
                   "settings": settings}
        if thinking:
            done[i]["thoughts"] = thoughts

    def finished(n: int) -> None:  # n more answers recorded
        if records_file and write:
            atomic_write(records_file, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
        if bar is not None:
            correct = sum(r["correct"] for r in done.values())
            bar.update(n)
            bar.set_postfix(acc=f"{correct / len(done):.3f}")
        if on_batch is not None:
            on_batch(len(done))

    t0 = time.perf_counter()
    prefill_stats: dict = {}
    if engine:
        unsaved: list[int] = []

        def on_done(j: int, o: list[int]) -> None:
            record(todo[j], o)
            unsaved.append(j)
            if len(unsaved) >= batch_size:
                finished(len(unsaved))
                unsaved.clear()

        ids = [prompt_ids(tok, examples[i]["question"], shots, thinking) for i in todo]
        model.generate_continuous(ids, max_new_tokens=max_new_tokens, slots=batch_size, on_done=on_done,
                                  shared_prefix=True, stats=prefill_stats)
        if unsaved:
            finished(len(unsaved))
    for start in range(0, len(todo) if not engine else 0, batch_size):
        idx = todo[start:start + batch_size]
        ids = [prompt_ids(tok, examples[i]["question"], shots, thinking) for i in idx]
        outs = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0)
        for i, o in zip(idx, outs, strict=True):
            record(i, o)
        finished(len(idx))
    if bar is not None:
        bar.close()
    records = [done[i] for i in sorted(done)]
    correct = sum(bool(r["correct"]) for r in records)
    total = len(records)
    lo, hi = wilson_interval(correct, total)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "ci95": [lo, hi], "shots": len(shots), "max_new_tokens": max_new_tokens,
            "elapsed_s": round(time.perf_counter() - t0, 2), "records_file": records_file,
            **({"prefill": prefill_stats} if prefill_stats else {}), "records": records}


def check_out(out: str) -> str:
    """The records file beside `out`, once both paths are usable: checked before any work (no data read, no model
    loaded, nothing left on disk), so that a bad --out fails in a second with one sentence, not after the evaluation."""
    check_cwd()
    if not out:
        raise DataError("--out is empty; give a file name such as gsm8k_results.json")
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        what = "is a directory" if os.path.isdir(out) else "ends in a slash, so it names a directory"
        raise DataError(f"--out {out} {what}; give a file name such as {os.path.join(out, 'gsm8k_results.json')}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        above = out_dir
        while not os.path.lexists(above):  # the nearest existing ancestor says why the directory is not there
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise DataError(f"--out {out} cannot be written: {above} is a file, not a directory")
        raise DataError(f"the output directory {out_dir} does not exist; create it or give another --out")
    try:
        probe_write(out_dir)
    except OSError:
        raise DataError(f"the output directory {out_dir} is not writable") from None
    records_file = records_path(out)
    if os.path.isdir(records_file):
        raise DataError(f"the records file {records_file} beside --out is a directory; give another --out")
    return records_file


def run_eval(model_path: str | None, data: str | None, *, out: str, limit: int | None = None, batch_size: int = 8,
             pp: int = 1, max_new_tokens: int = 256, shots: int = 0, shots_data: str | None = None,
             resume: bool = False, dtype: str | None = None, progress: bool = True,
             log: Callable[[str], None] = print, on_batch: Callable[[int], None] | None = None,
             write: bool = True, thinking: bool = False, engine: bool = False) -> dict:
    """What `tools/eval_gsm8k.py` does: load model and data, evaluate, write the summary (atomically).
    `write=False` (the hosts other than process 0) computes the same and writes and logs nothing."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if shots < 0:
        raise DataError(f"--shots must be 0 or more, got {shots}")
    records_file = check_out(out)
    examples = read_jsonl(data) if data else load_hf_gsm8k("test")
    if limit is not None:
        examples = examples[:limit]
    few: list[dict] = []
    if shots:
        beside = os.path.join(os.path.dirname(os.path.abspath(data)), "train.jsonl") if data else None
        source = shots_data or (beside if beside and os.path.exists(beside) else None)
        pool = read_jsonl(source) if source else load_hf_gsm8k("train")
        if len(pool) < shots:
            raise DataError(f"--shots {shots} asks for more examples than the {len(pool)} of the shots file")
        few = pool[:shots]
    model = gemma4_jax.load(model_path, pp=pp, dtype=dtype, progress=progress)  # no path: the demo model
    path = model.path
    summary = evaluate(model, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, shots=few,
                       records_file=records_file, resume=resume, progress=progress, on_batch=on_batch, write=write,
                       settings={"model": os.path.abspath(path), "dtype": model.run.dtype}, thinking=thinking,
                       engine=engine)
    summary = {"model": path, "data": data or "openai/gsm8k:test", "limit": limit, **summary}
    if not write:
        return summary
    atomic_write(out, json.dumps(summary, indent=1) + "\n")
    lo, hi = summary["ci95"]
    log(f"GSM8K accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['total']}; 95% CI "
        f"{lo:.3f}-{hi:.3f}); summary {out}, records {records_file}")
    return summary
