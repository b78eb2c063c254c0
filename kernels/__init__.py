"""Pallas attention kernels for Gemma 4's large heads, installed as `gemma4_jax.kernels`.

Model-agnostic: nothing here knows about Gemma. Kernels arrive with the [kernels] issue; until then the
model uses the plain XLA attention in `gemma4_jax.model.attention`.
"""
