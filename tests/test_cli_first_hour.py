"""What a new user meets in the first hour with the command lines and the API, each as it must behave: one
sentence and a non-zero exit for bad input (no traceback, nothing left on disk), exit 130 on Ctrl-C without a
crash, the pipeline's answer without padding, whole characters when streaming.

The commands run as subprocesses on the embedded demo model (vocabulary 512, byte-level tokens for characters
outside its training text).
"""

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.demo import demo_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Sam has $50. He buys 3 books for $8 each. How much money does Sam have left?"


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")


def _run(argv, stdin=None, text=True, preexec_fn=None, timeout=300):
    return subprocess.run([sys.executable, *argv], input=stdin, text=text, capture_output=True, env=_env(),
                          timeout=timeout, preexec_fn=preexec_fn, cwd=ROOT)


def _gen(*args, stdin=None, text=True):
    return _run(["-m", "gemma4_jax.generate", *args], stdin=stdin, text=text)


def _one_sentence(r, code: int, match: str, log_lines: bool = False):
    """Exit `code`, no traceback, and stderr one 'error: …' sentence (after the command's own log lines, where
    `log_lines`: the converter prints the split it writes)."""
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and match in errors[0] and (log_lines or len(lines) == 1), err
    assert lines[-1] == errors[0], err


@pytest.fixture(scope="module")
def demo():
    return gemma4_jax.load(progress=False)


@pytest.mark.devices(2)
def test_pp2_prints_exactly_what_pp1_prints():
    one = _gen("--prompt", QUESTION, "--max-new-tokens", "40")
    two = _gen("--prompt", QUESTION, "--max-new-tokens", "40", "--pp", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert "#### 26" in one.stdout and "<pad>" not in two.stdout
    assert two.stdout == one.stdout
    assert "time to first token" in one.stderr and "time to first token" in two.stderr  # both stream


def test_more_stages_than_devices_is_one_sentence():
    """On a machine of one device (here the CPU, made one device): --pp 2 is one sentence naming what it needs and
    sees; through the API, a split that does not match pp is named as such first, on a machine of any size."""
    env = dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "gemma4_jax.generate", "--prompt", "hi", "--max-new-tokens", "2", "--pp",
                        "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    _one_sentence(r, 1, "pp=2 needs 2 devices but only 1 is visible")
    code = ("import gemma4_jax\ntry:\n    gemma4_jax.load(pp=2, layer_split='0,2,4,6')\n"
            "except gemma4_jax.Gemma4Error as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "layer_split 0,2,4,6 makes 3 stages but pp=2" in r.stdout, (r.stdout, r.stderr)


def test_ctrl_c_while_the_next_chunk_compiles_exits_130():
    """SIGINT soon after the first token (the decode loop for the next chunk compiling): exit 130, no signal
    death (the segmentation fault was a crash during the interpreter's shutdown), no traceback."""
    hits = 0
    for delay in (0.0, 0.2, 0.4):
        p = subprocess.Popen([sys.executable, "-m", "gemma4_jax.generate", "--prompt", QUESTION, "--max-new-tokens",
                              "400", "--no-chat"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
        p.stdout.read(1)  # the first streamed character
        time.sleep(delay)
        signaled = p.poll() is None
        if signaled:
            p.send_signal(signal.SIGINT)
            hits += 1
        _, err = p.communicate(timeout=120)
        assert p.returncode == (130 if signaled else 0), (p.returncode, err.decode())
        assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
    assert hits >= 2, "the generation ended before the signal too often to test anything"


def test_blank_stdin_lines_keep_their_place(demo):
    want = demo.generate_text(["What is 2 + 3?", "Tom has 4 apples."], max_new_tokens=12)
    r = _gen("--max-new-tokens", "12", "--batch-size", "1", stdin="What is 2 + 3?\n\nTom has 4 apples.\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == [want[0].replace("\n", "\\n"), "", want[1].replace("\n", "\\n")]
    _one_sentence(_gen(stdin="\n  \n"), 1, "no prompt given")


def test_streaming_never_splits_a_character(demo, monkeypatch, capsys):
    """The demo tokenizer spells é, 😀 and 数 as several byte tokens; streamed one token at a time, the CLI must
    print them whole (token-by-token decoding printed U+FFFD for each piece)."""
    from gemma4_jax import generate as cli
    from gemma4_jax.tokenizer import StreamDecoder

    text = "Jané 😀 ünï 数学"
    ids = demo.tokenizer.encode(text, add_bos=False)
    assert "\ufffd" in "".join(demo.tokenizer.decode([i]) for i in ids)  # the premise: single tokens are partial
    dec = StreamDecoder(demo.tokenizer)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    def fake_generate(self, tokens, *, on_tokens=None, **kw):  # the model "answers" with the text's ids
        for i in ids:
            on_tokens(np.asarray([[i]]))
        on_tokens(np.asarray([[106]]))  # then the end of the turn
        return [ids + [106]]

    from gemma4_jax.api import Gemma4Model

    monkeypatch.setattr(Gemma4Model, "generate", fake_generate)
    args = cli.build_parser().parse_args(["--prompt", "hi"])
    out, err = io.StringIO(), io.StringIO()
    assert cli.run(args, stdin=io.StringIO(), out=out, err=err) == 0
    assert out.getvalue() == text + "\n"


def test_streamed_thoughts_are_one_labelled_line(demo, monkeypatch):
    """`--think --show-thoughts` on one prompt (streamed) writes the thoughts as the batched path writes them,
    `[thoughts] …` on a line of their own (they ran unlabelled into the timing line), the answer alone on stdout;
    thoughts cut off by the token limit end their line too. The model "answers" with the text's ids."""
    from gemma4_jax import generate as cli
    from gemma4_jax.api import Gemma4Model
    from gemma4_jax.chat import split_thoughts

    monkeypatch.setattr(gemma4_jax, "load", lambda *a, **kw: demo)  # the loaded demo model, not a second load
    for said in ("<|channel>thought\nLet me add. \n<channel|>\n\nThe answer is 5.", "<|channel>thought\nstill"):
        ids = demo.tokenizer.encode(said, add_bos=False)

        def fake_generate(self, tokens, *, on_tokens, ids=ids, **kw):  # one token at a time
            for i in ids:
                on_tokens(np.asarray([[i]]))
            return [ids]

        monkeypatch.setattr(Gemma4Model, "generate", fake_generate)
        out, err = io.StringIO(), io.StringIO()
        args = cli.build_parser().parse_args(["--prompt", "hi", "--think", "--show-thoughts"])
        assert cli.run(args, stdin=io.StringIO(), out=out, err=err) == 0
        thoughts, answer = split_thoughts(said)
        assert out.getvalue() == answer + "\n"
        lines = err.getvalue().splitlines()
        assert len(lines) == 2 and lines[0] == f"[thoughts] {thoughts}" and lines[1].startswith("loaded in"), lines


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """`… | head -c 3` on a streamed answer (the pipe closes under the chat template's thought splitter) and
    `… | head -1` on stdin's batch (under a finished answer's line): exit 141 (128 + SIGPIPE, what a shell reports
    for `yes | head`) and nothing on stderr but the loading bar: no traceback, no 'Exception ignored' from the
    interpreter's final flush. Standard output is block-buffered, as in a shell; the two commands run at once."""
    batch = "".join(f"What is {i} + 3?\n" for i in range(40)).encode()
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}
    procs = []
    # the flags of the runs above (pp 1 and the blank lines'), whose compiled programs the cache holds
    for args, stdin in ((["--prompt", QUESTION, "--max-new-tokens", "40"], b""),
                        (["--max-new-tokens", "12", "--batch-size", "1"], batch)):
        p = subprocess.Popen([sys.executable, "-m", "gemma4_jax.generate", *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        p.stdin.write(stdin)
        p.stdin.close()
        procs.append(p)
    for p, first in zip(procs, (lambda f: f.read(3), lambda f: f.readline()), strict=True):
        assert first(p.stdout), p.stderr.read().decode()
        p.stdout.close()  # the reader goes away while more answer is to come
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == 141, err
        assert "Traceback" not in err and "Exception ignored" not in err and "Error" not in err, err
        assert "error:" not in err, err


def test_a_terminal_on_stdin_is_told_what_to_do():
    """With no --prompt and a terminal on stdin, the CLI says it reads prompts (it used to wait in silence)."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "gemma4_jax.generate", "--max-new-tokens", "2"], stdin=slave,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    os.close(slave)
    try:
        os.write(master, b"\x04")  # Ctrl-D at once: no prompt
        _, err = p.communicate(timeout=120)
    finally:
        os.close(master)
    assert b"reading prompts from stdin, one per line; Ctrl-D to end" in err, err.decode()
    assert p.returncode == 1 and b"no prompt given" in err and b"Traceback" not in err


def test_non_utf8_stdin():
    _one_sentence(_gen(stdin=b"\xff\xfeHi\n", text=False), 1, "stdin is not UTF-8")


@pytest.mark.parametrize("args,match", [
    (["--prompt", ""], "prompt 1 is empty"),  # a repeated --prompt replaces the "Hi" below
    (["--prompt", "Hi", "   "], "prompt 2 is empty"),
    (["--attn-impl", "pallas"], "needs a CUDA GPU"),
    (["--seed", "1180591620717411303424"], "seed must be between 0 and 2**63 - 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["--top-p", "1.5", "--model", "/no/such/dir"], "top_p must be in (0, 1]"),  # flags checked before loading
    (["--top-k", "0", "--model", "/no/such/dir"], "top_k must be between 1"),
    # greedy would ignore them without a word
    (["--top-p", "0.9", "--model", "/no/such/dir"], "--top-p samples, so it needs --temperature above 0 (0 is greedy)"),
    (["--top-k", "5", "--temperature", "0", "--model", "/no/such/dir"], "--top-k samples, so it needs --temperature"),
    (["--think", "--no-chat", "--model", "/no/such/dir"], "--think and --show-thoughts need the chat template"),
    (["--show-thoughts", "--model", "/no/such/dir"], "--show-thoughts needs --think"),
    # argv's bytes as the shell passes them ($'caf\xe9'), as stdin's are checked
    (["--prompt", b"caf\xe9", "--model", "/no/such/dir"], "prompt 1 is not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_bad_flags_get_one_sentence(args, match):
    if match == "needs a CUDA GPU":
        import jax

        if jax.default_backend() != "cpu":
            pytest.skip("this machine has the GPU that --attn-impl pallas needs")
    _one_sentence(_gen("--prompt", "Hi", *args), 1, match)


def _help_entries(stdout: str) -> tuple[set[str], dict[str, list[str]]]:
    """The flags of a --help's usage line, and each flag's help texts (one per entry of the options list)."""
    usage, options = stdout.split("\noptions:\n")
    helps = {}  # flag -> [its help text, one per entry]
    for entry in re.findall(r"^  (-.*(?:\n {3,}.*)*)", options, re.M):
        flags, _, text = entry.strip().partition("  ")
        helps.setdefault(flags.split()[0].rstrip(","), []).append(" ".join(text.split()))
    return set(re.findall(r"--[\w-]+", usage)), helps


@pytest.mark.parametrize("argv", [["-m", "gemma4_jax.generate"], ["tools/eval_gsm8k.py"]])
def test_help_shows_the_defaults(argv):
    """Each flag of the usage line has one entry in the list, with a help text that gives its default once at
    most: not `(default: True)` under --no-chat, not a second `(default: None)` after --model's own words."""
    r = _run([*argv, "--help"])
    assert r.returncode == 0 and "(default: 256)" in r.stdout, r.stdout
    flags, helps = _help_entries(r.stdout)
    assert {"--model", "--dtype", "--max-new-tokens", "--compile-cache"} <= flags
    for flag in flags:
        assert len(helps.get(flag, [])) == 1 and helps[flag][0], (flag, helps.get(flag))
        assert helps[flag][0].count("(default") <= 1, (flag, helps[flag])
    if argv[-1] == "gemma4_jax.generate":
        assert "(default: 0.0)" in r.stdout and {"--no-chat", "--top-k", "--top-p"} <= flags
        assert helps["--model"] == ["HF or converted checkpoint directory (default: the embedded demo model)"]
        assert "default" not in helps["--no-chat"][0]


def test_a_compile_cache_that_cannot_be_written_is_refused_before_loading(tmp_path):
    """--compile-cache naming a file, or GEMMA4_JAX_COMPILE_CACHE naming a place no directory can be made: one
    sentence naming where the value came from, before the (missing) model is looked at, and nothing created."""
    (tmp_path / "a_file").write_text("x")
    argv = ["-m", "gemma4_jax.generate", "--prompt", "Hi", "--model", "/no/such/dir"]
    r = _run([*argv, "--compile-cache", str(tmp_path / "a_file")])
    _one_sentence(r, 1, f"--compile-cache {tmp_path / 'a_file'} is a file, not a directory")
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(_env(), GEMMA4_JAX_COMPILE_CACHE="/proc/nope"))
    _one_sentence(r, 1, "$GEMMA4_JAX_COMPILE_CACHE /proc/nope cannot be created or written")
    assert os.listdir(tmp_path) == ["a_file"]


def test_config_with_no_layers(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_path(), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (cfg.get("text_config") or cfg)["num_hidden_layers"] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    _one_sentence(_gen("--model", str(bad), "--prompt", "Hi"), 1, "num_hidden_layers must be at least 1")


def _convert(out, preexec_fn=None):
    return _run(["tools/convert_checkpoint.py", "--hf-dir", demo_path(), "--out", str(out), "--no-progress"],
                preexec_fn=preexec_fn)


def _leftovers(parent, name):
    return [f for f in os.listdir(parent) if name in f]


def test_converter_unwritable_out_and_full_disk(tmp_path):
    (tmp_path / "a_file").write_text("x")
    r = _convert(tmp_path / "a_file" / "out")
    _one_sentence(r, 1, "a_file is a file, not a directory", log_lines=True)
    r = _convert("/proc/gemma4-conv")  # no one can create a file there, root included (its permissions say yes)
    _one_sentence(r, 1, "cannot write /proc/gemma4-conv: /proc is not writable", log_lines=True)

    def small_files():  # every file the converter writes may hold 100 KB: the first stage's table fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = _convert(tmp_path / "full", preexec_fn=small_files)
    _one_sentence(r, 1, "File too large", log_lines=True)
    assert _leftovers(tmp_path, "full") == []


def test_a_removed_current_directory_is_one_sentence(tmp_path):
    """The converter and the eval script, run from a directory removed under them (relative paths cannot resolve):
    one sentence, nothing written."""
    gone = tmp_path / "gone"

    def in_a_removed_directory():
        os.chdir(gone)
        os.rmdir(gone)

    for argv in ([os.path.join(ROOT, "tools/convert_checkpoint.py"), "--hf-dir", demo_path(), "--out", "conv",
                  "--no-progress"],
                 [os.path.join(ROOT, "tools/eval_gsm8k.py"), "--limit", "1", "--quiet"]):
        gone.mkdir()
        r = _run(argv, preexec_fn=in_a_removed_directory)
        _one_sentence(r, 1, "the current directory no longer exists")
        assert os.listdir(tmp_path) == []


def test_converted_directory_is_an_ordinary_directory(tmp_path):
    r = _convert(tmp_path / "conv")
    assert r.returncode == 0, r.stderr
    again = _run(["tools/convert_checkpoint.py", "--hf-dir", str(tmp_path / "conv"), "--out", str(tmp_path / "c2"),
                  "--no-progress"])
    _one_sentence(again, 1, f"--hf-dir {tmp_path / 'conv'} is already a conversion")
    assert not os.path.exists(tmp_path / "c2")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "conv").st_mode & 0o777 == 0o777 & ~umask


def test_eval_out_naming_a_directory_fails_first(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    (tmp_path / "res").mkdir()
    r = _run(["tools/eval_gsm8k.py", "--data", str(data), "--out", str(tmp_path / "res"), "--quiet"])
    _one_sentence(r, 1, "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["q.jsonl", "res"] and os.listdir(tmp_path / "res") == []


def test_resume_refuses_records_made_with_other_settings(tmp_path, demo):
    from gemma4_jax.evals import gsm8k

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 3?", "answer": f"#### {i + 3}"}) + "\n"
                            for i in range(3)))
    out = str(tmp_path / "r.json")
    gsm8k.run_eval(None, str(data), out=out, max_new_tokens=8, progress=False, log=lambda s: None)
    with pytest.raises(gemma4_jax.Gemma4Error, match="was made with .*max_new_tokens.: 8"):
        gsm8k.run_eval(None, str(data), out=out, max_new_tokens=16, resume=True, progress=False, log=lambda s: None)
    with pytest.raises(gemma4_jax.Gemma4Error, match="was made with .*'dtype': 'float32'"):  # answers differ too
        gsm8k.run_eval(None, str(data), out=out, max_new_tokens=8, dtype="bfloat16", resume=True, progress=False,
                       log=lambda s: None)
    again = gsm8k.run_eval(None, str(data), out=out, max_new_tokens=8, resume=True, limit=2, progress=False,
                           log=lambda s: None)  # a smaller --limit with the same settings is fine
    assert again["total"] == 2


def test_api_bad_arguments_are_gemma4_errors(demo):
    with pytest.raises(gemma4_jax.Gemma4Error, match="prompts must be"):
        demo.generate_text(None)
    with pytest.raises(gemma4_jax.Gemma4Error, match="temperature must be a number"):
        demo.generate_text("Hi", temperature="hot")
    with pytest.raises(gemma4_jax.Gemma4Error, match="top_k must be an integer"):
        demo.generate_text("Hi", top_k=3.5)
    with pytest.raises(gemma4_jax.Gemma4Error, match="seed must be"):
        demo.generate([[2, 5]], max_new_tokens=2, seed=-1)
    with pytest.raises(gemma4_jax.Gemma4Error, match="tokens must be"):
        demo.generate("Hi", max_new_tokens=2)


def test_readme_python_examples_run_on_the_demo_model(demo):
    ids = demo.tokenizer.encode("What is 12 + 30?")
    assert len(demo.generate([ids], max_new_tokens=8, stop_tokens=())[0]) == 8
    assert demo.logits(np.array([ids])).shape == (1, len(ids), demo.config.vocab_size)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert 'model.generate([model.tokenizer.encode("What is 12 + 30?")]' in readme


def test_second_run_loads_its_programs_from_the_compile_cache(tmp_path):
    """`--compile-cache DIR`: the first run writes its compiled programs there (generation's own as executables in
    DIR/programs), the second (same model, same shapes) loads every one of them: it adds no entry, and prints the
    same answer. The times to first token of
    both runs are printed (the ratio is recorded in docs/performance.md; no test asserts on a timing)."""
    import re

    cache = tmp_path / "cache"
    argv = ("--prompt", QUESTION, "--max-new-tokens", "12", "--compile-cache", str(cache))
    first = _gen(*argv)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    kept = sorted(p.name for p in (cache / "programs").iterdir())
    assert entries and kept, "the first run cached its programs (JAX's, and generation's executables)"
    assert {k.split("-")[0] for k in kept} >= {"prefill", "_first_token", "decode_chunk", "init_cache"}
    again = _gen(*argv)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries, "the second run compiled something"
    assert sorted(p.name for p in (cache / "programs").iterdir()) == kept, "the second run missed a program"
    assert again.stdout == first.stdout
    ttft = [float(re.search(r"time to first token ([0-9.]+)s", r.stderr).group(1)) for r in (first, again)]
    assert all(t > 0 for t in ttft)
    print(f"time to first token: {ttft[0]:.3f} s, then {ttft[1]:.3f} s from the cache")
    off = _gen(*argv[:-1], "off")
    assert off.returncode == 0 and off.stdout == first.stdout


def test_the_checkouts_kernels_folder_leaves_hugging_faces_kernels_alone():
    """From a checkout's root (on sys.path, as under `python -m pytest` or a notebook started there), the
    folder `kernels/` must not take the top-level name from Hugging Face's `kernels`, which transformers requires
    and imports (`transformers.integrations.hub_kernels` failed with "cannot import name 'CUDAProperties'");
    `gemma4_jax.kernels` stays ours."""
    code = ("import importlib.metadata as m, kernels, gemma4_jax.kernels as g\n"
            "from transformers.integrations import hub_kernels\n"
            "try:\n    m.version('kernels'); installed = True\nexcept m.PackageNotFoundError:\n    installed = False\n"
            "print(installed, kernels.__file__, g.attention.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    installed, path, module = out.stdout.split()
    assert module == "gemma4_jax.kernels.dispatch"
    # Hugging Face's package where it is installed (transformers 5.25 requires it), these files where it is not
    assert (os.path.dirname(os.path.dirname(path)) != ROOT) == (installed == "True")


def _refused_allocation(*args, **kwargs):
    """What a step too large for the device raises: XLA's own RESOURCE_EXHAUSTED (4 TiB asked of the CPU)."""
    import jax.numpy as jnp

    return jnp.zeros((2**40,), jnp.float32).block_until_ready()


@pytest.mark.parametrize("message,gib", [
    ("RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 bytes.", "4096.0"),  # XLA:CPU
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00TiB.", "4096.0"),  # the GPU's allocator
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 33762398024 bytes.", "31.4"),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 512.00MiB.", "0.5"),
])
def test_out_of_memory_names_the_size_either_runtime_gives(message, gib):
    """The sentence names the failed allocation's size whether XLA's runtime gives it in bytes (the CPU) or in
    binary units (the GPU's allocator: an H100 run printed no size before this)."""
    import jax

    from gemma4_jax.cli import out_of_memory

    got = out_of_memory(jax.errors.JaxRuntimeError(message))
    assert got.startswith(f"out of device memory (an allocation of {gib} GiB failed): use a smaller --batch-size")
    assert out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: no size")).startswith("out of device memory:")
    assert out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: Out of memory allocating 8 bytes")) is None


def test_device_out_of_memory_is_one_sentence(tmp_path, monkeypatch, capsys):
    """A device allocation that fails ends both command lines with one sentence naming the size and the flags that
    shrink the work, exit 1, no traceback; any other runtime error still propagates."""
    from gemma4_jax import generate
    from gemma4_jax.evals import gsm8k

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import eval_gsm8k

    monkeypatch.setattr(generate, "run", _refused_allocation)
    assert generate.main(["--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of device memory (an allocation of 4096.0 GiB failed): use a smaller "
                          "--batch-size") and err.count("\n") == 1
    monkeypatch.setattr(gsm8k, "run_eval", _refused_allocation)
    assert eval_gsm8k.main(["--out", str(tmp_path / "r.json"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of device memory (") and "--resume" in err and err.count("\n") == 1

    def other(args):
        raise RuntimeError("not a memory error")

    monkeypatch.setattr(generate, "run", other)
    with pytest.raises(RuntimeError, match="not a memory error"):
        generate.main(["--prompt", "hi"])
