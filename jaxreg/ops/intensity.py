"""Intensity operations on whole images: rescaling to [0, 1], the normalised cross-correlation and
the mapping of one contrast onto another (a conditional-mean table)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def normalise(image: jnp.ndarray) -> jnp.ndarray:
    """Rescale intensities to [0, 1] (min -> 0, max -> 1); a constant image becomes all zeros."""
    low, high = image.min(), image.max()
    return (image - low) / jnp.maximum(high - low, 1e-6)


def ncc(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Normalised cross-correlation (1 = identical up to a linear intensity map), over `mask` if given."""
    weight = jnp.ones_like(a) if mask is None else mask.astype(a.dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    a = (a - jnp.sum(a * weight) / count) * weight
    b = (b - jnp.sum(b * weight) / count) * weight
    return jnp.sum(a * b) / jnp.maximum(jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)), 1e-12)


def _cells(values: jnp.ndarray, bins: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(lower entry, weight of the upper entry) of `values` in [0, 1] on a table axis of `bins` entries."""
    position = jnp.clip(values, 0.0, 1.0) * (bins - 1)
    low = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 2)
    return low, position - low


def _corners(sources: Sequence[jnp.ndarray], shape: Sequence[int]):
    """For each of the 2^n corners of the voxels' table cells: (flat entry index, linear weight)."""
    cells = [_cells(source, bins) for source, bins in zip(sources, shape)]
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
    for corner in itertools.product((0, 1), repeat=len(shape)):
        index, weight = 0, 1.0
        for (low, upper), up, stride in zip(cells, corner, strides):
            index = index + (low + up) * int(stride)
            weight = weight * (upper if up else 1 - upper)
        yield index, weight


def intensity_table(sources: Sequence[jnp.ndarray], target: jnp.ndarray, mask: jnp.ndarray, shape: Sequence[int],
                    smoothing: float = 1.0) -> jnp.ndarray:
    """The mean of `target` inside `mask` at each combination of the `sources`' values: a table of
    `shape` (one axis per source), whose entry i on an axis stands for the value i / (n - 1) of
    that source, each source in [0, 1].

    Each voxel counts towards the corners of its table cell, weighted multilinearly; the counts and
    sums are smoothed along every axis by a Gaussian of `smoothing` entries before dividing, so that
    sparse entries borrow from their neighbours. Where `target` is a function of the sources (two
    contrasts of the same tissues, aligned), the table samples that function, monotonic or not.
    """
    shape = tuple(int(n) for n in shape)
    size = int(np.prod(shape))
    weight = mask.astype(jnp.float32)
    count = jnp.zeros(size, jnp.float32)
    total = jnp.zeros(size, jnp.float32)
    for index, corner_weight in _corners(sources, shape):
        w = (corner_weight * weight).ravel()
        count = count.at[index.ravel()].add(w)
        total = total.at[index.ravel()].add(w * target.ravel())
    count, total = count.reshape(shape), total.reshape(shape)
    if smoothing > 0:
        reach = int(3 * smoothing + 0.5)
        kernel = jnp.exp(-0.5 * (jnp.arange(-reach, reach + 1) / smoothing) ** 2)
        for axis in range(len(shape)):
            count, total = (jnp.apply_along_axis(lambda row: jnp.convolve(row, kernel, "same"), axis, t)
                            for t in (count, total))
    return total / jnp.maximum(count, 1e-3 * jnp.maximum(count.max(), 1e-12))


def apply_table(sources: Sequence[jnp.ndarray], table: jnp.ndarray) -> jnp.ndarray:
    """The :func:`intensity_table` `table` looked up at the `sources`' values (each in [0, 1]),
    interpolated multilinearly."""
    flat = table.ravel()
    return sum(flat[index] * weight for index, weight in _corners(sources, table.shape))
