"""float32 arithmetic as close to exact as torch's: blocked contractions on the CPU (and over attention keys on a GPU),
unmerged products on a GPU and an accurate GELU-tanh.

XLA's CPU backend sums a float32 dot's contraction in one running total: over K = 2816 terms its error is about
2.5× that of a blocked sum (torch's CPU matmul, cuBLAS on a GPU), which is what made our float32 drift from
exact faster than transformers' (docs/design-notes.md, "float32 numerics"). `contract` splits the longest
contracted axis into runs of ACC_BLOCK terms, contracts each run and adds the partials in a loop (one partial
in memory at a time: the head's [T, vocabulary] logits are not multiplied by the block count).

It changes nothing elsewhere: 16-bit operands, other backends, and contractions of at most ACC_BLOCK terms
go straight to `fn`.

`unmerged` keeps float32 products that share an operand apart on a GPU, where XLA would merge them into one
wider product that cuBLAS sums less exactly.

`kernel_dot` is the one product inside the Triton kernels (attention, the skinny projections, the experts):
float32 accumulation, and float32 operands at full precision, where Triton's default would round them to TF32.

`gelu_tanh` is the tanh-approximated GELU (transformers' `gelu_pytorch_tanh`). For float32 it is written as
x·σ(2u) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³), the same function, because XLA's float32 tanh is a fast
approximation (on the CPU 1.6× torch's mean error in this GELU, up to 8× on tanh itself) while exp is as
accurate as torch's; other dtypes keep `jax.nn.gelu`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

ACC_BLOCK = 128
# The backends whose float32 contractions `contract` sums in blocks. ("cpu", "gpu"): on a GPU too, only to measure
# whether a GPU's own sums are what puts a float32 result further from exact (`bench.py towers
# --blocked-sums-on-gpu`). Part of `dispatch.settings()`.
BLOCKED_BACKENDS = ("cpu",)
# The backends whose float32 sums over attention keys `contract` blocks (`backends=KEY_SUM_BACKENDS`: the vision
# tower's probabilities × values, up to 2,520 keys an image). On a GPU too: on an H100 XLA's one product over the
# keys was the vision tower's whole float32 excess over transformers (2.66× its max error, 0.86× with that product
# in float64, 0.63× with every sum blocked; docs/multimodal.md, 2026-12-07). Part of `dispatch.settings()`.
KEY_SUM_BACKENDS = ("cpu", "gpu")


def kernel_dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """a @ b (a @ bᵀ with `trans_b`) inside a Triton kernel: float32 accumulation; float32 operands at full
    precision (IEEE, never TF32)."""
    return plgpu.dot(a, b, trans_b=trans_b, precision=lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)


def contract(fn: Callable[[jax.Array, jax.Array], jax.Array], a: jax.Array, b: jax.Array, a_axis: int,
             b_axis: int, backends: tuple[str, ...] | None = None) -> jax.Array:
    """fn(a, b), a contraction linear in the paired axes a[a_axis] and b[b_axis], computed as a sum over
    blocks of ACC_BLOCK along them when both operands are float32 on a backend in `backends` (by default
    BLOCKED_BACKENDS: the CPU)."""
    k = a.shape[a_axis]
    assert b.shape[b_axis] == k, (a.shape, a_axis, b.shape, b_axis)
    if (a.dtype != jnp.float32 or b.dtype != jnp.float32 or k <= ACC_BLOCK
            or jax.default_backend() not in (BLOCKED_BACKENDS if backends is None else backends)):
        return fn(a, b)
    n, tail = divmod(k, ACC_BLOCK)

    def block(start, size):
        return fn(lax.dynamic_slice_in_dim(a, start, size, a_axis), lax.dynamic_slice_in_dim(b, start, size, b_axis))

    acc = lax.fori_loop(1, n, lambda i, acc: acc + block(i * ACC_BLOCK, ACC_BLOCK), block(0, ACC_BLOCK))
    return acc + block(n * ACC_BLOCK, tail) if tail else acc


# False: `unmerged` leaves float32 products of one input to XLA's dot merger too (only to measure what keeping them
# apart costs: `bench.py generate --dtype float32 --float32-merged`). Part of `dispatch.settings()`.
FLOAT32_APART = True


def unmerged(a: jax.Array, n: int) -> list[jax.Array]:
    """n uses of `a` for n products that must stay apart. For float32 on a GPU, XLA's dot merger joins products
    that share an operand (a layer's queries, keys and values; gate and up) into one wider cuBLAS product, and at
    the merged width cuBLAS sums float32 further from exact: the 768 × 2816 × 8192 product of 26B-A4B's q, k and v
    has 2.5× the error of torch's three (1.37× for each alone; docs/performance.md, "The dot merger"). Here the
    uses come through one optimization barrier, so no two products see the same operand (the text model's
    `norm_linears`, the towers' q/k/v and the vision tower's gate/up). Elsewhere `a`, n times."""
    if a.dtype != jnp.float32 or n < 2 or jax.default_backend() != "gpu" or not FLOAT32_APART:
        return [a] * n
    return list(lax.optimization_barrier((a,) * n))


def einsum(eq: str, a: jax.Array, b: jax.Array, backends: tuple[str, ...] | None = None, **kw) -> jax.Array:
    """`jnp.einsum(eq, a, b, **kw)` for two operands, its longest contracted index blocked by `contract` (on
    `backends`)."""
    ins, out = eq.split("->")
    la, lb = ins.split(",")
    summed = [c for c in la if c in lb and c not in out]
    if not summed:
        return jnp.einsum(eq, a, b, **kw)
    c = max(summed, key=lambda c: a.shape[la.index(c)])
    return contract(lambda x, y: jnp.einsum(eq, x, y, **kw), a, b, la.index(c), lb.index(c), backends)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` for a 2-D `b` (a's last axis against b's first), that axis blocked by `contract`."""
    return contract(jnp.matmul, a, b, a.ndim - 1, 0)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))); for float32 as x / (1 + exp(−2u)) (see the module note)."""
    if x.dtype != jnp.float32:
        return jax.nn.gelu(x, approximate=True)
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
    return x / (1.0 + jnp.exp(-2.0 * u))
