"""Checkpoints on disk: the safetensors reader and writer (`safetensors_io`), the Hugging Face name table and
reader (`hf`), the per-stage orbax converter and its restore (`staged`), and export back to HF (`export`).

`open(path)` tells a Hugging Face directory from a converted one and reads its config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Gemma4Config, read_config_json
from ..errors import CheckpointError
from ..tokenizer import check_side_files
from . import staged


@dataclass(frozen=True)
class Opened:
    """A checkpoint directory, identified: `manifest` is the converter's (None for a Hugging Face directory);
    `raw_config` the config.json as written (its vision/audio parts included)."""

    path: str
    config: Gemma4Config
    raw_config: dict
    manifest: dict | None

    @property
    def converted(self) -> bool:
        return self.manifest is not None


def open(path) -> Opened:  # noqa: A001 (the module's verb, as `builtins.open` is the file's)
    """Identify the checkpoint directory at `path`, read its config and check its side files (generation config,
    tokenizer config, chat template); CheckpointError with one sentence when it is not a directory, a conversion
    that did not finish, or holds a malformed side file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    manifest = staged.read_manifest(path) if staged.is_stage_dir(path) else None
    check_side_files(path)
    raw = manifest["config"] if manifest is not None else read_config_json(path)[0]
    return Opened(path, Gemma4Config.from_hf_dict(raw, name=os.path.basename(os.path.abspath(path))), raw, manifest)
