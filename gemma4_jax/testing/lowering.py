"""Lowering a program for a CUDA GPU on a machine that may have none: the kernel tests' checks of custom calls,
shapes and untouched weights, and `bench.py chain`'s deviceless compile for an H200."""

from __future__ import annotations

import contextlib

import jax

# A Hopper card, the one generation the kernels are built for. Pallas's Triton lowering reads the compute capability
# from the default device; since jax 0.11, where that is not a GPU, it reads an abstract device from the abstract mesh.
ABSTRACT_GPU = "NVIDIA H200"


def as_for_a_gpu(mesh: jax.sharding.Mesh | None = None):
    """A context in which programs trace and lower for CUDA as on an `ABSTRACT_GPU`: under `mesh`'s abstract mesh
    (a mesh of deviceless target devices), else one of a single abstract GPU; nothing where the default device is
    a GPU already."""
    if mesh is not None:
        return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    if jax.devices()[0].platform == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=ABSTRACT_GPU, num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device))


def lowered_for_the_gpu(fn, *args, **kwargs) -> str:
    """The text of `fn` (a jitted function) traced at `args` (shapes or arrays) and `kwargs` and lowered for CUDA,
    on a machine with or without a GPU (`as_for_a_gpu`)."""
    with as_for_a_gpu():
        return fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
