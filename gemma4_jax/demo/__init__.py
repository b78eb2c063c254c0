"""The embedded demo model: a small Gemma 4 trained by `tools/train_demo.py`, shipped in the package.

`demo_path()` is the directory (Hugging Face format: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json, training.json) that
`gemma4_jax.load(None)`, the generate CLI and `tools/eval_gsm8k.py` use when no model is given.
Its chat template writes Gemma 4's turns as the built-in format does (text parts of a message joined); the
demo is not a thinking model, so `--think` / `thinking=True` leave its prompt and its answers unchanged.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")


def demo_path() -> str:
    """Directory of the embedded demo checkpoint."""
    if not os.path.isfile(os.path.join(DEMO_DIR, "model.safetensors")):
        raise CheckpointError(f"the embedded demo model is missing from {DEMO_DIR}; reinstall gemma4-jax or run "
                              f"tools/train_demo.py")
    return DEMO_DIR
