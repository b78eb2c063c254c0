"""The lm-evaluation-harness model (`gemma4_jax.evals.lm_harness`) on the demo model: each request kind against a
plain computation with the model's own API (unpadded forwards, `model.generate`), the local-file GSM8K task through
`lm_eval.simple_evaluate`, and the command line's bad inputs.

Compiling is most of the cost on the CPU, so the tests share shapes: every scored batch is [4, 16] or [4, 8], the
unpadded references are 14 or 15 tokens long, and every generation is 4 prompts of 129-240 tokens, 16 new ones."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows  # noqa: E402

from gemma4_jax.errors import ConfigError  # noqa: E402
from gemma4_jax.evals import lm_harness  # noqa: E402
from gemma4_jax.evals.gsm8k import DataError  # noqa: E402

pytestmark = pytest.mark.xdist_group("lm_eval")  # one worker: one demo model, and the compiled shapes shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "/work/shared/data/gsm8k"
needs_data = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "test.jsonl")), reason="GSM8K data not present")
MAX_NEW = 16
LONG = "Sam has 5 apples and 3 pears. He buys 4 more apples and gives 2 pears to Tom. " * 5 + "How many apples now?"


@pytest.fixture(scope="module")
def demo():
    import gemma4_jax

    return gemma4_jax.load(dtype="float32", progress=False)


@pytest.fixture(scope="module")
def lm(demo):
    return lm_harness.Gemma4LM(model=demo, batch_size=4)


def _req(kind, *args):
    return Instance(kind, {}, args, 0)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _reference(model, ids, n):
    """(sum of log p of the last n of `ids`, all greedy?) from one unpadded forward over `ids`."""
    logits = model.logits(np.array([ids]))[0]  # [T, V]; row t predicts ids[t + 1]
    rows, targets = logits[len(ids) - 1 - n:len(ids) - 1], np.array(ids[len(ids) - n:])
    return float(_log_softmax(rows)[np.arange(n), targets].sum()), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_equals_unpadded_log_softmax(demo, lm):
    tok = demo.tokenizer
    greedy_ctx = "Tom has 3 pens. He buys 4 more."
    g = int(demo.logits(np.array([tok.encode(greedy_ctx)]))[0, -1].argmax())
    greedy_text = tok.decode([g])
    assert tok.encode(greedy_ctx + greedy_text) == tok.encode(greedy_ctx) + [g]  # the test's own premise
    pairs = [("Sam has 5 apples.", " He eats 2."), ("", " Tom has 3 pens and 2 cups."),
             ("Tom has 3 pens.", " He buys 4 more."), ("Tom has 3 pens. ", "He buys 4 more."),
             (greedy_ctx, greedy_text), ("Sam has 5 apples.", " He eats two")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)  # batches of 4
    assert got[3] == got[2]  # the context's trailing space belongs to the continuation
    lengths = set()
    for (ctx, cont), (logp, greedy) in zip(pairs, got, strict=True):
        if ctx.endswith(" "):
            continue
        ids = tok.encode(ctx + cont)  # BOS once, then the whole text
        n = len(ids) - len(tok.encode(ctx))  # an empty context is BOS alone
        lengths.add(len(ids))
        want, want_greedy = _reference(demo, ids, n)
        assert logp == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy, (ctx, cont)
    assert lengths == {14, 15}  # rows of two lengths share a batch, right-padded to 16
    assert [greedy for _, greedy in got] == [False, False, False, False, True, False]


def test_loglikelihood_rolling_predicts_the_first_token_from_bos(demo, lm):
    text = "Sam has 5 apples. He eats 2."
    ids = demo.tokenizer.encode(text, add_bos=False)
    assert ids[0] != demo.tokenizer.bos_id and len(ids) == 14
    want, _ = _reference(demo, [demo.tokenizer.bos_id, *ids], len(ids))  # every token, the first given BOS alone
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text), _req("loglikelihood_rolling", "")],
                                   disable_tqdm=True)
    assert got[0] == pytest.approx(want, abs=1e-4) and got[1] == 0.0


def test_loglikelihood_rolling_windows_score_each_token_once(demo):
    lm8 = lm_harness.Gemma4LM(model=demo, batch_size=4, max_length=8)
    text = "Sam has 5 apples and 3 pears. He gives 2 apples to Tom and eats one."
    ids = demo.tokenizer.encode(text, add_bos=False)
    windows = list(get_rolling_token_windows(ids, demo.tokenizer.bos_id, 8, 1))  # lm_eval's definition
    assert len(windows) == 4 and sum(len(pred) for _, pred in windows) == len(ids)
    assert all(len(inp) == 8 for inp, _ in windows) and windows[0][0][0] == demo.tokenizer.bos_id
    logits = demo.logits(np.array([inp for inp, _ in windows]))  # [4, 8, V], no padding
    want = sum(_log_softmax(lg[8 - len(pred):])[np.arange(len(pred)), pred].sum()
               for lg, (_, pred) in zip(logits, windows, strict=True))
    assert lm8.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)[0] == pytest.approx(
        want, abs=1e-4)


def _cut(text, until):
    for s in until:
        text = text.split(s)[0] if s else text
    return text


def test_generate_until_equals_greedy_generate(demo, lm, monkeypatch):
    tok, stops = demo.tokenizer, set(demo.stop_tokens)
    contexts = ["Sam has 5 apples.", LONG, "Q: 2+2?", "Question: Tom has 3 pens. He buys 4 more.\nAnswer:"]
    untils = ["####", ["\n"], [], [".", "?"]]  # (not longest first: the model sorts them, and puts them back)
    requests = [_req("generate_until", c, {"until": u, "max_gen_toks": MAX_NEW, "do_sample": False, "temperature": 0.0})
                for c, u in zip(contexts, untils, strict=True)]
    got = lm.generate_until(requests, disable_tqdm=True)
    prompts = [tok.encode(c) for c in contexts]
    assert 128 < max(map(len, prompts)) <= 240  # the end-to-end test's generation shapes
    news = demo.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    texts = [tok.decode(o[:-1] if o and o[-1] in stops else o) for o in news]
    assert got == [_cut(t, [u] if isinstance(u, str) else u) for t, u in zip(texts, untils, strict=True)]
    assert any(g != t for g, t in zip(got, texts, strict=True))  # some stop string did cut

    # Too long a prompt keeps BOS and its last max_length - max_gen_toks - 1 tokens.
    budget = 150 - MAX_NEW
    fitted = [p if len(p) <= budget else [p[0], *p[len(p) - budget + 1:]] for p in prompts]
    assert fitted != prompts
    seen = []

    def spy(batch, **kwargs):
        seen.extend(batch)
        return generate(batch, **kwargs)

    generate = demo.generate_continuous  # generate_until's engine
    monkeypatch.setattr(demo, "generate_continuous", spy)
    got = lm_harness.Gemma4LM(model=demo, batch_size=4, max_length=150).generate_until(requests, disable_tqdm=True)
    monkeypatch.undo()
    assert sorted(seen) == sorted(fitted)
    news = demo.generate(fitted, max_new_tokens=MAX_NEW, temperature=0.0)
    texts = [tok.decode(o[:-1] if o and o[-1] in stops else o) for o in news]
    assert got == [_cut(t, [u] if isinstance(u, str) else u) for t, u in zip(texts, untils, strict=True)]


def test_bad_settings_are_one_sentence(demo, lm):
    def gen(kwargs):
        return lm.generate_until([_req("generate_until", "Q: 2+2?", kwargs)], disable_tqdm=True)

    for kwargs, words in (({"num_beams": 4}, "num_beams"), ({"do_sample": True, "temperature": 0.0}, "temperature"),
                          ({"max_gen_toks": 4096}, "max_length"), ({"until": 3}, "until")):
        with pytest.raises(ConfigError, match=words):
            gen(kwargs)
    for args, words in (("foo=1", "foo"), ("batch_size=auto", "batch_size"), ("max_gen_toks=0", "max_gen_toks"),
                        ("seed=-1", "^seed must be between 0 and 2"), ("seed=x", "^seed must be an integer, got 'x'")):
        with pytest.raises(ConfigError, match=words):
            lm_harness.Gemma4LM.create_from_arg_string(args)  # refused before loading anything
    with pytest.raises(ConfigError, match="context"):
        lm_harness.Gemma4LM(model=demo, max_length=10**6)
    with pytest.raises(DataError, match="gsm8k_dir"):
        lm_harness.gsm8k_dataset(path="x")  # lm_eval passes the model args along with the metadata
    # The model args win over the command line's batch size; the options lm_eval passes every model are accepted.
    made = lm_harness.Gemma4LM.create_from_arg_obj({"model": demo, "batch_size": 2},
                                                   {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert made.batch_size == 2
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert lm.apply_chat_template(messages) == demo.tokenizer.apply_chat_template(messages)


@needs_data
def test_gsm8k_local_task_end_to_end(lm):
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=lm_harness.TASKS_DIR, include_defaults=False, metadata={"gsm8k_dir": DATA})
    out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], task_manager=tasks, limit=3, num_fewshot=0,
                                  gen_kwargs=f"max_gen_toks={MAX_NEW}", bootstrap_iters=0, log_samples=True)
    metrics = out["results"]["gsm8k_local"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert math.isfinite(metrics[key]) and 0 <= metrics[key] <= 1, metrics
    with open(os.path.join(DATA, "test.jsonl")) as f:
        questions = [json.loads(next(f))["question"] for _ in range(3)]
    samples = [s for s in out["samples"]["gsm8k_local"] if s["filter"] == "strict-match"]  # one per filter
    samples.sort(key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == questions  # read from the local file
    assert all(s["resps"][0][0] for s in samples)  # the model wrote something


def test_command_line_bad_input_is_one_sentence(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    for args, words in (([f"path={tmp_path / 'nope'}"], "not a directory"), (["foo=1"], "foo"),
                        (["seed=x"], "error: seed must be an integer, got 'x'")):
        r = subprocess.run([sys.executable, "-m", "gemma4_jax.evals.lm_harness", "--model_args", *args,
                            "--tasks", "gsm8k_local"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and words in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
