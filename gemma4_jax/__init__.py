"""gemma4-jax: Gemma 4 in JAX/Flax with pipeline parallelism."""

import os as _os

# In a source checkout `kernels/` sits beside this package and is shipped as `gemma4_jax.kernels`
# (see pyproject.toml). Let `PYTHONPATH=.` runs find it there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)  # noqa: F821

from .api import Gemma4Model, RunConfig, load  # noqa: E402
from .config import Gemma4Config, LayerSpec, preset  # noqa: E402
from .errors import CheckpointError, ConfigError, Gemma4Error  # noqa: E402

__all__ = [
    "load", "Gemma4Model", "RunConfig", "Gemma4Config", "LayerSpec", "preset",
    "Gemma4Error", "ConfigError", "CheckpointError",
]
