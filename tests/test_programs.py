"""Compiled programs kept across processes (`gemma4_jax.generation.programs`): a program is traced once, written,
and loaded by a later "process" (nothing left in memory) without tracing; anything that changes what a program
computes is another program; a file that does not load is compiled again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.generation import programs
from gemma4_jax.kernels import dispatch


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "DIR", str(tmp_path))
    monkeypatch.setattr(programs, "_LOADED", {})
    return tmp_path


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
    # the dispatcher's settings, the matmul precision
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


def test_decode_programs_compile_with_the_decode_scheduling(monkeypatch):
    """`decode=True` programs reach XLA with `DECODE_SCHEDULING` (an invalid value is XLA's error), others do not;
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
