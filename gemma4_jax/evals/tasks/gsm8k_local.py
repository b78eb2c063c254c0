"""The `!function` target of gsm8k_local.yaml. lm_eval loads it by file path from beside the YAML (lm_eval 0.4.10
looks nowhere else), so it only re-exports the loader of the importable module."""

from gemma4_jax.evals.lm_harness import gsm8k_dataset

__all__ = ["gsm8k_dataset"]
