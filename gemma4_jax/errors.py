"""The exceptions users see. Each carries one sentence that names the problem.

Command lines catch `Gemma4Error`, print its message and exit non-zero (no traceback).
"""


class Gemma4Error(ValueError):
    """Base class of every user-facing error of gemma4-jax."""


class ConfigError(Gemma4Error):
    """A config.json (or a preset name, or a run option) that cannot describe a runnable model."""


class CheckpointError(Gemma4Error):
    """A checkpoint that is missing, truncated, malformed or does not match its config."""
