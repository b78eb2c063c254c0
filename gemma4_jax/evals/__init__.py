"""Evaluations: GSM8K (`gsm8k`), used by `tools/eval_gsm8k.py`."""
