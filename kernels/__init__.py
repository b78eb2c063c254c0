"""Pallas kernels: attention for large heads (head_dim up to 512), the routed experts of an MoE FFN, a skinny
matmul for decode-step projections (`gemv`) and the add-and-norm after one (`add_norm`), weights read into L2 ahead
of their projection (`l2_prefetch`), and a probe of a barrier across a kernel's grid (`grid_barrier`), installed as
`gemma4_jax.kernels`.

Model-agnostic: nothing here knows about Gemma. Each kernel file holds the kernel body, its wrapper, a
jitted entry point, a frozen tuning config and a plain-jnp reference (the Mosaic GPU kernels for Hopper,
`flash_attention_mgpu` and `moe_mgpu`, share the Triton ones' references; `mgpu_interpret` runs them in JAX's
GPU interpret mode for CPU tests). The one XLA attention, `flash_attention.xla_attention`, is every attention
kernel's reference and the model's XLA path. `dispatch`
picks a kernel, cuDNN or XLA per call (`resolve` for attention, `resolve_moe` for the experts, `resolve_dense`
for the projections); `tiling.fit_block` fits block sizes to dimensions.
Masks come from positions (`masking.py`).
"""

import sys as _sys

_handed_over = False
if __name__ == "kernels":
    # Imported by its folder's name, from a checkout's root on sys.path (`python -m pytest`, a notebook or
    # `python -m ...` started there), not as `gemma4_jax.kernels`. The top-level name belongs to Hugging Face's
    # `kernels`, which transformers requires and imports: hand the name to that package where it is installed
    # (without this, `from kernels import ...` inside transformers found these files and failed), and stay this
    # package under that name where it is not.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
        _handed_over = True

if not _handed_over:
    from .decode_attention import DecodeConfig, decode_attention, decode_attention_reference
    from .dispatch import IMPLS, attention, kernel_supports, resolve, resolve_moe
    from .flash_attention import FlashConfig, flash_attention, flash_attention_reference
    from .moe import MoeConfig, moe_experts, moe_experts_reference

__all__ = [
    "DecodeConfig", "FlashConfig", "IMPLS", "MoeConfig", "attention", "decode_attention", "decode_attention_reference",
    "flash_attention", "flash_attention_reference", "kernel_supports", "moe_experts", "moe_experts_reference",
    "resolve", "resolve_moe",
]
