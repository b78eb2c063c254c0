"""Evaluations: GSM8K (`gsm8k`, used by `tools/eval_gsm8k.py`) and the lm-evaluation-harness model "gemma4-jax"
(`lm_harness`, with its task configs in `tasks/`; needs the `eval` extra)."""
