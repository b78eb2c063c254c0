"""Pallas kernels: attention for large heads (head_dim up to 512), the routed experts of an MoE FFN and a
skinny matmul for decode-step projections (`gemv`), installed as `gemma4_jax.kernels`.

Model-agnostic: nothing here knows about Gemma. Each kernel file holds the kernel body, its wrapper, a
jitted entry point, a frozen tuning config and a plain-jnp reference (the Mosaic GPU kernels for Hopper,
`flash_attention_mgpu` and `moe_mgpu`, share the Triton ones' references; `mgpu_interpret` runs them in JAX's
GPU interpret mode for CPU tests). The one XLA attention, `flash_attention.xla_attention`, is every attention
kernel's reference and the model's XLA path. `dispatch`
picks a kernel, cuDNN or XLA per call (`resolve` for attention, `resolve_moe` for the experts, `resolve_dense`
for the projections); `tiling.fit_block` fits block sizes to dimensions.
Masks come from positions (`masking.py`).
"""

from .decode_attention import DecodeConfig, decode_attention, decode_attention_reference
from .dispatch import IMPLS, attention, kernel_supports, resolve, resolve_moe
from .flash_attention import FlashConfig, flash_attention, flash_attention_reference
from .moe import MoeConfig, moe_experts, moe_experts_reference

__all__ = [
    "DecodeConfig", "FlashConfig", "IMPLS", "MoeConfig", "attention", "decode_attention", "decode_attention_reference",
    "flash_attention", "flash_attention_reference", "kernel_supports", "moe_experts", "moe_experts_reference",
    "resolve", "resolve_moe",
]
