"""Compiled programs kept across processes (`gemma4_jax.generation.programs`): a program is traced once, written,
and loaded by a later "process" (nothing left in memory) without tracing; anything that changes what a program
computes is another program; a file that does not load is compiled again."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.generation import programs
from gemma4_jax.kernels import dispatch


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A program store in tmp_path. JAX's persistent cache (the test run's, conftest) takes none of these tests'
    programs: a program it supplied would not be written to the store (`programs._from_jax_cache`)."""
    monkeypatch.setattr(programs, "DIR", str(tmp_path))
    monkeypatch.setattr(programs, "_LOADED", {})
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield tmp_path
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def _new_process():
    programs._LOADED.clear()
    jax.clear_caches()


def test_a_kept_program_is_loaded_without_tracing(store, monkeypatch):
    traces = []

    @programs.program(static_argnums=(1,), static_argnames="scale", donate_argnums=(0,))
    def f(x, n, y=None, scale=1.0):
        traces.append(n)
        return (x * n + y.sum()) * scale

    def call(n=3, size=4, scale=1.0):
        return np.asarray(f(jnp.arange(size, dtype=jnp.float32), n, y=jnp.ones(2), scale=scale))

    want = (np.arange(4.0) * 3 + 2.0) * 1.0
    np.testing.assert_allclose(call(), want)
    assert traces == [3] and len(list(store.glob("*.bin"))) == 1
    _new_process()
    np.testing.assert_allclose(call(), want)
    assert traces == [3], "loaded from the file, not traced again"

    # what changes the program is another program: a static argument, a shape, a static keyword, the sources,
    # the dispatcher's settings, the matmul precision, the process's XLA flags
    call(n=2)
    call(size=5)
    np.testing.assert_allclose(call(scale=2.0), want * 2)
    assert traces == [3, 2, 3, 3]
    assert len(list(store.glob("*.bin"))) == 4
    monkeypatch.setattr(programs, "source_fingerprint", lambda: "other sources")
    _new_process()  # sources change between processes
    call()
    assert len(list(store.glob("*.bin"))) == 5
    monkeypatch.setattr(dispatch, "DENSE_FORCE", "xla")  # read when tracing: JAX's own caches do not see it
    call()
    assert len(list(store.glob("*.bin"))) == 6
    with jax.default_matmul_precision("highest"):  # applied when lowering: a program of its own
        call()
    assert len(list(store.glob("*.bin"))) == 7
    # a process under other XLA flags (read once, when XLA starts) compiles its own program
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=")
    _new_process()
    call()
    assert len(list(store.glob("*.bin"))) == 8
    monkeypatch.setattr(programs, "DECODE_XLA_OPTIONS", {"xla_gpu_enable_triton_gemm": False})  # decode's options
    call()
    assert len(list(store.glob("*.bin"))) == 9


def test_a_file_that_does_not_load_is_compiled_again(store):
    """A corrupt file: the program is compiled again (a right result) and the file rewritten whole. (Loading the
    rewritten file is a later process's business: XLA's CPU client cannot run an executable deserialized in the
    process that compiled the same program twice.)"""
    import pickle

    traces = []

    @programs.program()
    def g(x):
        traces.append(1)
        return x + 1

    g(jnp.zeros(3))
    (path,) = store.glob("*.bin")
    path.write_bytes(b"not a program")
    _new_process()
    np.testing.assert_allclose(np.asarray(g(jnp.zeros(3))), np.ones(3))
    assert len(traces) == 2
    payload, in_tree, out_tree = pickle.loads(path.read_bytes())  # rewritten: an executable and its trees
    assert payload and in_tree.num_leaves == 1 and out_tree.num_leaves == 1
    assert not list(store.glob(".tmp-*")), "no half-written file left"


def test_without_a_folder_a_program_is_a_jitted_function(monkeypatch):
    monkeypatch.setattr(programs, "DIR", None)
    monkeypatch.delenv(programs.ENV, raising=False)
    traces = []

    @programs.program()
    def h(x):
        traces.append(1)
        return x * 2

    h(jnp.ones(2))
    h(jnp.ones(2))
    assert len(traces) == 1 and programs.folder() is None


@pytest.mark.devices(2)
def test_decode_programs_compile_with_the_decode_scheduling(monkeypatch):
    """`decode=True` programs reach XLA with `DECODE_SCHEDULING` and `DECODE_XLA_OPTIONS` (an invalid value is
    XLA's error), others do not;
    the decode loop at pp = 1 and the pipeline's ring are decode programs."""
    import gemma4_jax

    monkeypatch.setattr(programs, "DIR", None)
    monkeypatch.delenv(programs.ENV, raising=False)

    @programs.program(decode=True)
    def step(x):
        return x + 1

    @programs.program()
    def other(x):
        return x + 2

    assert programs.compiler_options(True) == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    np.testing.assert_allclose(np.asarray(step(jnp.zeros(2))), 1.0)
    # DECODE_XLA_OPTIONS reach the decode programs alone (a value XLA refuses is its error, naming the option)
    monkeypatch.setattr(programs, "DECODE_XLA_OPTIONS", {"xla_gpu_enable_triton_gemm": "maybe"})
    assert programs.compiler_options(True)["xla_gpu_enable_triton_gemm"] == "maybe"
    with pytest.raises(Exception, match="xla_gpu_enable_triton_gemm"):
        step(jnp.ones(2))
    np.testing.assert_allclose(np.asarray(other(jnp.ones(2))), 3.0)
    monkeypatch.setattr(programs, "DECODE_XLA_OPTIONS", {"xla_gpu_enable_triton_gemm": False})
    np.testing.assert_allclose(np.asarray(step(jnp.ones(2))), 2.0)
    monkeypatch.setattr(programs, "DECODE_XLA_OPTIONS", {})
    monkeypatch.setattr(programs, "DECODE_SCHEDULING", "NOT_A_MODE")
    with pytest.raises(Exception, match="xla_gpu_command_buffer_scheduling_mode"):
        step(jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(other(jnp.zeros(2))), 2.0)

    for pp in (1, 2):
        model = gemma4_jax.load(progress=False, pp=pp)
        prompt = [[2, 10, 11, 12]]
        with pytest.raises(Exception, match="xla_gpu_command_buffer_scheduling_mode"):
            model.generate(prompt, max_new_tokens=4, stop_tokens=())
    monkeypatch.setattr(programs, "DECODE_SCHEDULING", "LHS")  # XLA's default order: a valid setting
    assert len(model.generate(prompt, max_new_tokens=4, stop_tokens=())[0]) == 4


_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from gemma4_jax.generation import programs
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
programs.DIR = sys.argv[2] if len(sys.argv) > 2 else None

@programs.program()
def f(x, y):
    z = jnp.tanh(x @ y) + jnp.cumsum(x, 0)
    return (z.T @ z).reshape(-1)[:7], jnp.broadcast_to(z[0], (5,) + z.shape)

x = jnp.linspace(-1, 1, 64 * 64, dtype=jnp.float32).reshape(64, 64)
got = f(x, x.T)
z = np.tanh(np.asarray(x) @ np.asarray(x).T) + np.cumsum(np.asarray(x), 0)
np.testing.assert_allclose(np.asarray(got[0]), (z.T @ z).reshape(-1)[:7], rtol=1e-4)
# z[0] holds values near 0 that are differences of O(1) terms: an ulp of the terms (1e-7), not of the result
np.testing.assert_allclose(np.asarray(got[1]), np.broadcast_to(z[0], (5,) + z.shape), rtol=1e-5, atol=1e-6)
"""


def test_a_program_from_jax_cache_is_kept_only_as_compiled(tmp_path):
    """A program JAX's persistent cache already holds (an earlier process without the program store compiled it):
    the store does not keep the executable JAX loaded, since XLA's CPU client re-serializes it without its
    functions; so a third process runs right, from JAX's cache."""
    import os
    import subprocess
    import sys

    script = tmp_path / "p.py"
    script.write_text(_SCRIPT)
    jax_cache, store = str(tmp_path / "jax"), tmp_path / "programs"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", programs.ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    for args in ([jax_cache], [jax_cache, str(store)], [jax_cache, str(store)]):
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert not list(store.glob("*.bin")), "the store kept an executable that JAX's cache supplied"
    # with a fresh JAX cache the store keeps the program, and a later process loads and runs it
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script), str(tmp_path / "jax2"), str(store)], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(store.glob("*.bin"))) == 1
