"""Block sizes shared by the kernels: the one rule for fitting a power-of-two block to a dimension, and the
shared-memory budget of a Hopper block that the Mosaic GPU kernels fit their rings into."""

from __future__ import annotations

HOPPER_SMEM_BYTES = 227 * 1024  # H100 / H200 opt-in dynamic shared memory per block


def fit_block(dim: int, want: int) -> int:
    """The largest power of two ≤ want that divides dim (0 when none of at least 16 does: Triton's dot needs 16)."""
    b = want
    while b >= 16:
        if dim % b == 0:
            return b
        b //= 2
    return 0
