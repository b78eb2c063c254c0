"""Shared fixtures: real HF checkpoints of the four small random families, built once per session."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, for this run only: the command-line tests start many processes that
# compile the same programs, and test files recompile after `_fresh_compile_caches`; both then load instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="gemma4-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# On a GPU the tests share the card between JAX and torch (transformers' references, float64 for the towers): JAX
# must not take the card's memory up front, or torch runs out on the larger references.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))

from hf_fixtures import FAMILIES, build_hf_model, save_hf, xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(4))  # before anything imports jax

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): the test needs n JAX devices (a pipeline of n stages); skipped, "
                                       "saying so, where fewer are visible (a machine of one GPU)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skip a test that needs more devices than this process sees, before its fixtures load anything. A test
    needs what its `devices` marks say and, if parametrized by `pp`, that many. On the CPU the suite sees four
    (XLA_FLAGS above); on a GPU machine, its GPUs."""
    need = max((m.args[0] for m in item.iter_markers("devices")), default=1)
    pp = getattr(getattr(item, "callspec", None), "params", {}).get("pp")
    if isinstance(pp, int):
        need = max(need, pp)
    if need > 1:
        import jax

        have = len(jax.devices())
        if have < need:
            pytest.skip(f"needs {need} devices, {have} visible (JAX_PLATFORMS=cpu runs it on 4 simulated ones)")


@pytest.fixture(scope="session", autouse=True)
def _float32_by_default():
    """The tests compare `load()`'s default model, float32 on the CPU, with float32 references; on a GPU, where
    `load()` defaults to bfloat16, they keep float32 (in this process; command-line subprocesses keep the CLI's
    default). A no-op on the CPU."""
    import jax

    from gemma4_jax import api

    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() != "cpu":
            mp.setattr(api, "default_dtype", lambda: "float32")
        yield


@pytest.fixture
def float32_as_the_api_runs_it():
    """For tests that call a model's programs directly (prefill, decode steps) in float32: at full float32
    precision on a GPU too, as the API runs them (`api.precision_scope`; JAX's default there is TF32: 2e-3 from the
    full forward on an H100). `pytestmark = pytest.mark.usefixtures("float32_as_the_api_runs_it")`."""
    from gemma4_jax import api

    with api.precision_scope("float32"):
        yield


@pytest.fixture
def on_the_cpu():
    """The test's arrays and programs on the CPU, on a GPU machine too: for interpret-mode kernel tests that check a
    bfloat16 rounding bit for bit. XLA:GPU may keep a fused value in float32 where the program rounds it to
    bfloat16 (its excess-precision default: an H100 ran the router's rounding test, and the add-and-norm kernel's,
    without the rounding), which the compiled kernel never does; the CPU runs such a program as written, as on CI.
    `pytestmark = pytest.mark.usefixtures("on_the_cpu")`, or per test."""
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module", autouse=True)
def _fresh_compile_caches():
    """Drop compiled programs between test files: the suite compiles hundreds of programs (every
    pipeline split is its own), and keeping them all bounds neither memory nor the compiler's heap."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(autouse=True)
def _gpu_interpreter_state_reset():
    """A Mosaic GPU kernel that fails in JAX's GPU interpret mode leaves the interpreter's shared state behind
    (for debugging), and every later interpreted kernel in this worker would then fail on it: one failure
    stays one. A no-op unless a test left that state."""
    yield
    gc = sys.modules.get("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks")
    reset = getattr(gc, "reset_gpu_interpret_mode_state", None)
    if reset is not None and getattr(gc, "_shared_memory", None) is not None:
        reset()


@pytest.fixture(scope="session")
def hf_models():
    """{family: float32 transformers model} with perturbed norms and scalars."""
    return {fam: build_hf_model(fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def hf_dirs(hf_models, tmp_path_factory):
    """{(family, layout): HF directory}. Layouts:
    'causal'  - Gemma4ForCausalLM, `per_layer_config` config, one safetensors file;
    'wrapper' - Gemma4ForConditionalGeneration layout (`model.language_model.`), the published flat
                config form, sharded safetensors with an index.
    """
    out = {}
    for fam, model in hf_models.items():
        base = tmp_path_factory.mktemp(fam)
        out[fam, "causal"] = save_hf(model, str(base / "causal"), form="per_layer")
        out[fam, "wrapper"] = save_hf(model, str(base / "wrapper"), form="flat", wrapper=True,
                                      max_shard_size="100KB")
    return out
