"""GSM8K evaluation: answer extraction, the confidence interval, prompts, the eval script end to end and resume."""

import json
import os
import subprocess
import sys

import pytest

from gemma4_jax.evals import gsm8k
from gemma4_jax.tokenizer import builtin_chat_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "/work/shared/data/gsm8k"
TEST = os.path.join(DATA, "test.jsonl")
needs_data = pytest.mark.skipif(not os.path.exists(TEST), reason="GSM8K data not present")


@pytest.fixture(scope="module")
def demo_model():
    import gemma4_jax
    from gemma4_jax.demo import demo_path

    return gemma4_jax.load(demo_path(), dtype="float32", progress=False)


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50.", "1234.5"),
    ("The total is 18.00 dollars.\n#### 18.00", "18"),
    ("So he lost 4 apples.\n#### -4", "-4"),
    ("3 boxes of 7 is 21.\n#### 21\nThen 99 more words 100", "21"),  # the #### line wins over later numbers
    ("I think it is 3, no wait, the answer is $42.", "42"),  # no ####: the last number
    ("First 12, then 1,000,000.", "1000000"),
    ("#### \nThe answer is 7.", "7"),  # an empty #### line falls back to the last number
    ("#### 5 apples and 3 pears", "5"),
    ("#### 12 #### 13", "13"),  # the last #### counts
    ("It costs .5 dollars", "0.5"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_reference_answers_of_real_data():
    assert gsm8k.reference_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18") == "18"
    assert gsm8k.reference_answer("...\n#### 70,000") == "70000"
    with pytest.raises(gsm8k.DataError):
        gsm8k.reference_answer("no final line")


@pytest.mark.parametrize("correct, total, lo, hi", [
    # Values from the closed form (Wilson 1927) as tabulated by Newcombe (1998), Table I.
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (81, 263, 0.2553, 0.3662), (10, 10, 0.7225, 1.0),
])
def test_wilson_interval(correct, total, lo, hi):
    got = gsm8k.wilson_interval(correct, total)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_few_shot_prompt_matches_gemma_turn_format(demo_model):
    """The shipped chat template, rendered over several turns, equals the Gemma 4 format of docs/architecture.md §4."""
    shots = [{"question": "Q1?", "answer": "It is 2+2=<<2+2=4>>4.\n#### 4"}, {"question": "Q2?", "answer": "#### 5"}]
    text = gsm8k.render_chat(demo_model.tokenizer, gsm8k.chat_messages("Q3?", shots))
    expected = builtin_chat_prompt([
        {"role": "user", "content": "Q1?\n" + gsm8k.INSTRUCTION},
        {"role": "assistant", "content": "It is 2+2=4.\n#### 4"},
        {"role": "user", "content": "Q2?\n" + gsm8k.INSTRUCTION}, {"role": "assistant", "content": "#### 5"},
        {"role": "user", "content": "Q3?\n" + gsm8k.INSTRUCTION}])
    assert text == expected
    assert text.count("<bos>") == 1 and text.endswith("<|turn>model\n")


def _run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_gsm8k.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@needs_data
def test_eval_script_end_to_end(tmp_path):
    out = tmp_path / "res.json"
    r = _run("--data", TEST, "--limit", "3", "--batch-size", "2", "--max-new-tokens", "24", "--out", str(out),
             "--quiet")
    assert r.returncode == 0, r.stderr
    assert "GSM8K accuracy" in r.stdout
    summary = json.loads(out.read_text())
    with open(TEST) as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    assert summary["total"] == 3 and 0 <= summary["correct"] <= 3
    assert summary["accuracy"] == summary["correct"] / 3
    assert summary["ci95"] == pytest.approx(list(gsm8k.wilson_interval(summary["correct"], 3)))
    records = [json.loads(line) for line in open(gsm8k.records_path(str(out)))]
    assert records == summary["records"]
    for rec, row in zip(records, rows, strict=True):
        assert rec["question"] == row["question"]
        assert rec["reference"] == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert rec["extracted"] == gsm8k.extract_answer(rec["output"])
        assert rec["correct"] == (rec["extracted"] == rec["reference"])
        assert rec["output"]  # the demo model wrote something
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary leftovers


@needs_data
def test_resume_after_interruption_gives_the_same_summary(tmp_path, demo_model, monkeypatch):
    import gemma4_jax

    monkeypatch.setattr(gemma4_jax, "load", lambda *a, **k: demo_model)  # one load for the three runs
    kw = dict(limit=5, batch_size=2, max_new_tokens=20, progress=False, log=lambda s: None)
    full = gsm8k.run_eval(None, TEST, out=str(tmp_path / "full.json"), **kw)

    def interrupt(n_done):
        if n_done >= 2:
            raise KeyboardInterrupt

    part = str(tmp_path / "part.json")
    with pytest.raises(KeyboardInterrupt):
        gsm8k.run_eval(None, TEST, out=part, on_batch=interrupt, **kw)
    assert not os.path.exists(part)  # no summary from an interrupted run
    assert len(gsm8k.read_records(gsm8k.records_path(part))) == 2

    batches = []
    resumed = gsm8k.run_eval(None, TEST, out=part, resume=True, on_batch=batches.append, **kw)
    assert batches == [4, 5]  # only the three unfinished questions were generated
    for key in ("accuracy", "correct", "total", "ci95", "records"):
        assert resumed[key] == full[key], key


@needs_data
def test_a_reader_that_closes_the_pipe_ends_the_eval_quietly(tmp_path):
    """`eval_gsm8k.py … | head -c 0`: the summary line meets a closed pipe after the results are written; the
    script exits 141 (as the generate CLI does) with no traceback and no 'Exception ignored', results kept."""
    out = tmp_path / "res.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("PYTHONUNBUFFERED", None)  # block-buffered, as in a shell
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "eval_gsm8k.py"), "--data", TEST, "--limit",
                          "1", "--max-new-tokens", "8", "--out", str(out), "--quiet"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before anything is printed
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error:" not in err, err
    assert json.loads(out.read_text())["total"] == 1


def test_bad_inputs_give_one_sentence(tmp_path):
    missing = _run("--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "4"}\n')
    malformed = _run("--data", str(bad), "--out", str(tmp_path / "r.json"))
    no_data = _run("--out", str(tmp_path / "r.json"))
    for r, words in ((missing, "no data file"), (malformed, f"{bad} line 1: a GSM8K answer lacks its '####"),
                     (no_data, "--data FILE.jsonl")):
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and words in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "r.json")


@pytest.mark.parametrize("out, words", [
    ("", "--out is empty"),
    ("adir/sub/", "ends in a slash"),  # a directory that does not exist yet
    ("adir", "adir is a directory"),
    ("nope/r.json", "nope does not exist"),
    ("afile/r.json", "afile is a file, not a directory"),
    ("afile/sub/r.json", "afile is a file, not a directory"),
    pytest.param("ro/r.json", "ro is not writable",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")),
    pytest.param("/proc/r.json", "/proc is not writable",  # no one can create a file there, root included
                 marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")),
])
def test_bad_out_fails_first_and_leaves_nothing(tmp_path, out, words):
    """A bad --out is one sentence before the demo model loads or any question runs, and nothing is left on disk."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "Sam has 5 apples and eats 2. How many are left?", "answer": "5 - 2 = 3\\n#### 3"}\n')
    cwd = tmp_path / "cwd"
    (cwd / "adir").mkdir(parents=True)
    (cwd / "ro").mkdir(mode=0o555)
    (cwd / "afile").write_text("")
    before = sorted(os.walk(tmp_path))
    r = _run("--data", str(data), "--limit", "1", "--max-new-tokens", "4", "--quiet", "--compile-cache", "off",
             "--out", out, cwd=cwd)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.walk(tmp_path)) == before  # no records file, summary or temporary file


@pytest.fixture(scope="module")
def demo_pp2():
    import gemma4_jax
    from gemma4_jax.demo import demo_path

    return gemma4_jax.load(demo_path(), dtype="float32", progress=False, pp=2)


@needs_data
# Zero-shot at pp = 2: test_pipeline's two-process eval (engine records = static pp = 1 records). Few-shot: three
# worked examples at pp = 1 put the shared prefix several times past the demo's 64-token window, one at pp = 2 past
# it once, at a fraction of eight's compile time (the eval's default 8 shots only lengthen the same prefix).
@pytest.mark.parametrize("shots,pp", [(0, 1), (3, 1), (1, 2)])
def test_engine_records_equal_static_batches(tmp_path, demo_model, request, monkeypatch, shots, pp):
    """Continuous batching (`--engine`) writes the same greedy records as static batches, zero-shot and 3-shot
    at pp = 1 and 1-shot through the pipeline's ring at pp = 2; an interrupted engine run resumes to the same
    summary."""
    import gemma4_jax

    model = demo_model if pp == 1 else request.getfixturevalue("demo_pp2")  # built only where pp = 2 runs
    monkeypatch.setattr(gemma4_jax, "load", lambda *a, **k: model)
    kw = dict(limit=2 if shots else 5 if pp == 1 else 3, batch_size=2, max_new_tokens=8 if shots else 20, shots=shots,
              pp=pp,
              progress=False, log=lambda s: None)
    static = gsm8k.run_eval(None, TEST, out=str(tmp_path / "static.json"), **kw)
    engine = gsm8k.run_eval(None, TEST, out=str(tmp_path / "engine.json"), engine=True, **kw)
    assert engine["records"] == static["records"]
    pre = engine["prefill"]  # the shared prompt head (the worked examples with shots) computed once
    n = kw["limit"]  # questions: the prefix computed once instead of n times
    assert 0 < pre["prefix_tokens"] and pre["prefill_tokens"] == pre["prompt_tokens"] - (n - 1) * pre["prefix_tokens"]
    if shots:
        assert pre["prefix_tokens"] > 64 * shots  # past the window once per worked example
    if shots or pp > 1:
        return

    def interrupt(n_done):
        if n_done >= 2:
            raise KeyboardInterrupt

    part = str(tmp_path / "part.json")
    with pytest.raises(KeyboardInterrupt):
        gsm8k.run_eval(None, TEST, out=part, on_batch=interrupt, engine=True, **kw)
    assert len(gsm8k.read_records(gsm8k.records_path(part))) == 2
    resumed = gsm8k.run_eval(None, TEST, out=part, resume=True, engine=True, **kw)
    for key in ("accuracy", "correct", "total", "ci95", "records"):
        assert resumed[key] == static[key], key
