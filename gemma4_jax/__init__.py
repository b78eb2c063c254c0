"""gemma4-jax: Gemma 4 in JAX/Flax with pipeline parallelism.

The public names (`load`, `Gemma4Model`, …) are imported on first use, so that `import gemma4_jax` (and with it
every command line's start, `--help`, and its checks of flags) does not wait for JAX.
"""

import importlib as _importlib

from .errors import CheckpointError, ConfigError, Gemma4Error

_LAZY = {"load": "api", "Gemma4Model": "api", "RunConfig": "api",
         "Gemma4Config": "config", "LayerSpec": "config", "preset": "config", "join_cluster": "parallel.cluster"}

__all__ = [
    "load", "Gemma4Model", "RunConfig", "Gemma4Config", "LayerSpec", "preset",
    "Gemma4Error", "ConfigError", "CheckpointError",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
