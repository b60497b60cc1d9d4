"""Separable box filters, average pooling and finite differences as pure JAX array ops.

Box filters are pad + shifted-slice sums (fast on CPU; ``lax.conv`` box filters were ~300x slower
here, see PERFORMANCE.md). All functions act on the last three axes unless told otherwise, so a
(C, X, Y, Z) stack is filtered channel by channel.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from .native import dispatch, kernels

SPATIAL = (-3, -2, -1)


def _shifted_sum(x: jnp.ndarray, size: int, axis: int) -> jnp.ndarray:
    """Sum of `size` consecutive slices along `axis` of an already padded array (valid part only)."""
    n = x.shape[axis] - size + 1
    total = None
    for k in range(size):
        part = _slice(x, k, k + n, axis)
        total = part if total is None else total + part
    return total


def _slice(x: jnp.ndarray, start: int, stop: int, axis: int) -> jnp.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def box_filter(x: jnp.ndarray, size: int = 3, axes=SPATIAL, mode: str = "zeros") -> jnp.ndarray:
    """Centred box average of odd width `size`, same shape as `x`.

    ``mode="zeros"`` equals PyTorch ``avg_pool3d(size, stride=1, padding=size//2)`` (zero padding,
    divisor always size^3); ``mode="edge"`` replicates the border first (MIND-SSC's patch sums).
    """
    if size % 2 != 1:
        raise ValueError(f"box filter size must be odd, got {size}")
    if mode not in ("zeros", "edge"):
        raise ValueError(f"box filter mode must be 'zeros' or 'edge', got {mode!r}")
    if size == 1:
        return x
    axes = tuple(sorted({a % x.ndim for a in axes}))
    jax_path = functools.partial(_box_filter_jax, size=size, axes=axes, mode=mode)
    if x.ndim < 3 or axes[0] < x.ndim - 3 or size > kernels.MAX_BOX_SIZE:  # the kernel's reach
        return jax_path(x)
    native = _native_box_zeros if mode == "zeros" else _native_box_edge
    return dispatch.by_platform(lambda v: native(v, size, axes), jax_path, x)


def _box_kernel(x, size: int, axes, mode: str):
    """The box filter's kernel, or the JAX path where the kernel is not built."""
    return dispatch.on_cpu(lambda v: kernels.box_average(v, size, axes, mode == "edge"),
                           lambda v: _box_filter_jax(v, size, axes, mode), x)


@dispatch.with_vjp(lambda args, cotangent: (_native_box_zeros(cotangent, *args[1:]),), nondiff_argnums=(1, 2))
def _native_box_zeros(x, size: int, axes):
    """The zero-padded box average: its own transpose (symmetric window, fixed divisor), so its
    gradient is the kernel too."""
    return _box_kernel(x, size, axes, "zeros")


@dispatch.jax_gradient(lambda x, size, axes: _box_filter_jax(x, size, axes, "edge"), nondiff_argnums=(1, 2))
def _native_box_edge(x, size: int, axes):
    """The edge-replicated box average, whose transpose is not a box filter: its gradient comes
    from autodiff of the JAX path."""
    return _box_kernel(x, size, axes, "edge")


def _box_filter_jax(x: jnp.ndarray, size: int, axes, mode: str) -> jnp.ndarray:
    """:func:`box_filter` as XLA code (GPU, TPU, CPU without the kernels; differentiated by autodiff)."""
    # Pad every axis once, then sum shifted slices: on CPU a pass that pads is ~2.5x slower than a
    # pass of plain slices (XLA checks the bounds per element). Padding first is exact for both modes,
    # as a sum along one axis commutes with padding along another.
    widths = [(0, 0)] * x.ndim
    for axis in axes:
        widths[axis % x.ndim] = (size // 2, size // 2)
    x = jnp.pad(x, widths, mode="constant" if mode == "zeros" else "edge")
    for axis in axes:
        x = _shifted_sum(x, size, axis) / size
    return x


def avg_pool(x: jnp.ndarray, factor: int, axes=SPATIAL) -> jnp.ndarray:
    """Non-overlapping mean over blocks of `factor` voxels (PyTorch ``avg_pool3d(factor, factor)``:
    trailing voxels that do not fill a block are dropped)."""
    if factor == 1:
        return x
    axes = sorted(a % x.ndim for a in axes)
    for axis in axes:
        n = x.shape[axis] // factor
        x = _slice(x, 0, n * factor, axis)
        x = x.reshape(x.shape[:axis] + (n, factor) + x.shape[axis + 1:]).mean(axis=axis + 1)
    return x


def forward_difference(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """x[i+1] - x[i] along `axis` (one element shorter)."""
    n = x.shape[axis]
    return _slice(x, 1, n, axis) - _slice(x, 0, n - 1, axis)
