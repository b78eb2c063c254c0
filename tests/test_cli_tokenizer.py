"""The tokenizer, the chat format and `python -m gemma4_jax.generate` on a small HF checkpoint."""

import os
import re
import subprocess
import sys

import pytest

import gemma4_jax
from gemma4_jax.testing.tiny import write_tiny_checkpoint
from gemma4_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The published templates' shape for a plain user turn (docs/architecture.md §4).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=3)


def test_chat_ids_match_transformers_tokenizer(tiny_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer(tiny_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_dir, "tokenizer.json"), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>")
    ref.chat_template = TEMPLATE
    want = ref.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    assert ours.encode_chat("What is 2+3?") == list(want)  # built-in format
    with open(os.path.join(tiny_dir, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    try:
        templated = Tokenizer(tiny_dir)
        assert templated.template == TEMPLATE
        assert templated.encode_chat("What is 2+3?") == list(want)  # rendered template
    finally:
        os.remove(os.path.join(tiny_dir, "chat_template.jinja"))
    ids = ours.encode_chat("hi")
    assert ids[0] == 2 and ids.count(2) == 1 and ids[1] == 105  # BOS exactly once, then <|turn>
    assert ours.encode("hi") == [2] + ref.encode("hi", add_special_tokens=False)
    assert ours.decode(ours.encode("a b\nc", add_bos=False)) == "a b\nc"


def test_generate_text_and_stop_ids(tiny_dir):
    model = gemma4_jax.load(tiny_dir, progress=False)
    assert model.stop_tokens == (1, 106, 50)  # config.json, then generation_config.json
    text = model.generate_text(["Hi"], max_new_tokens=6, stop_tokens=())[0]
    ids = model.generate([model.tokenizer.encode_chat("Hi")], max_new_tokens=6, stop_tokens=())[0]
    assert text == model.tokenizer.decode(ids)


def _cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "gemma4_jax.generate", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=300)


def test_cli_streams_one_prompt_and_batches_stdin(tiny_dir):
    model = gemma4_jax.load(tiny_dir, progress=False)
    want = model.generate_text(["Hi", "What is 2+3?"], max_new_tokens=6)
    # float32 as `model` (the CLI's default on a GPU is bfloat16, whose random-weight tokens are others)
    one = _cli("--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "6", "--dtype", "float32")
    assert one.returncode == 0, one.stderr
    assert one.stdout.rstrip("\n") == want[0]
    assert "time to first token" in one.stderr and "tokens/s" in one.stderr
    many = _cli("--model", tiny_dir, "--max-new-tokens", "6", "--dtype", "float32", stdin="Hi\nWhat is 2+3?\n")
    assert many.returncode == 0, many.stderr
    assert many.stdout.splitlines() == [w.replace("\n", "\\n") for w in want]


@pytest.mark.parametrize("args,code,match", [
    (["--top-p", "1.5"], 1, "top_p must be in (0, 1]"),
    (["--temperature", "-2"], 1, "temperature must be"),
    (["--max-new-tokens", "100000"], 1, "exceeds the context"),
    (["--batch-size", "0"], 1, "--batch-size must be at least 1"),
    (["--bogus"], 2, "unrecognized arguments"),
])
def test_cli_bad_flags(tiny_dir, args, code, match):
    r = _cli("--model", tiny_dir, "--prompt", "Hi", *args)
    assert r.returncode == code
    assert match in r.stderr and "Traceback" not in r.stderr


def test_cli_names_the_prompt_too_long_for_the_context(tiny_dir):
    """A stdin line longer than the context ends the batch before any generation with one sentence naming it,
    as an empty --prompt is named ('prompt 2 is empty')."""
    r = _cli("--model", tiny_dir, stdin="Hi\n" + "x " * 600 + "\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [r.stderr.splitlines()[-1]], r.stderr
    assert re.fullmatch(r"error: prompt 2 is \d+ tokens long, more than the context of 512", r.stderr.splitlines()[-1])


def test_cli_missing_model(tmp_path):
    r = _cli("--model", str(tmp_path / "nope"), "--prompt", "Hi")
    assert r.returncode == 1 and "is not a directory" in r.stderr and "Traceback" not in r.stderr
