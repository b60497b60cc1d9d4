"""MIND-SSC: the modality-independent self-similarity context descriptor (Heinrich et al., MICCAI 2013).

Twelve channels per voxel: for each of the 12 pairs of 6-neighbours (offsets of +-dilation along
one axis) that are sqrt(2)*dilation apart, the patch SSD of the image at the two offsets, with
patches of side 2*radius+1. The SSDs are normalised per voxel (minus their minimum, divided by
their mean) and mapped through exp(-x). Edge voxels are replicated, as in ConvexAdam, and the
channels are in ConvexAdam's order so that features can be compared number for number.
"""

from __future__ import annotations

import functools
import itertools

import jax

import jax.numpy as jnp
import numpy as np

from ..ops.native import kernels
from ..ops.filters import avg_pool, box_filter

# The six neighbours as positions in a 3x3x3 stencil (ConvexAdam's order) and the channel permutation
# ConvexAdam applies "to have the same ordering as the C++ code".
_SIX = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])
_CHANNEL_ORDER = [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]


def mind_pairs(dilation: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of voxel offsets compared by MIND-SSC, in output channel order."""
    pairs = []
    for i, j in itertools.product(range(6), range(6)):
        if i > j and np.sum((_SIX[i] - _SIX[j]) ** 2) == 2:
            pairs.append((tuple(int(v) for v in (_SIX[i] - 1) * dilation), tuple(int(v) for v in (_SIX[j] - 1) * dilation)))
    return [pairs[k] for k in _CHANNEL_ORDER]


def mind_ssc(image: jnp.ndarray, radius: int = 1, dilation: int = 2) -> jnp.ndarray:
    """MIND-SSC features (12, X, Y, Z) of a 3-D image (X, Y, Z), values in (0, 1]."""
    d = dilation
    padded = jnp.pad(image, d, mode="edge")
    shape = image.shape

    def shifted(offset):
        return padded[tuple(slice(d + o, d + o + n) for o, n in zip(offset, shape))]

    ssd = jnp.stack([(shifted(a) - shifted(b)) ** 2 for a, b in mind_pairs(d)])
    ssd = box_filter(ssd, 2 * radius + 1, mode="edge")
    mind = ssd - ssd.min(axis=0, keepdims=True)
    variance = mind.mean(axis=0, keepdims=True)
    mean_variance = variance.mean()
    # Clamp as ConvexAdam does; the floor also keeps a constant image (variance 0) finite.
    variance = jnp.clip(variance, jnp.maximum(mean_variance * 1e-3, 1e-12), jnp.maximum(mean_variance * 1e3, 1e-12))
    return jnp.exp(-mind / variance)


def mind_ssc_pooled(image: jnp.ndarray, radius: int = 1, dilation: int = 2, factor: int = 1,
                    slab: int = 16) -> jnp.ndarray:
    """``avg_pool(mind_ssc(image), factor)``, (12, X//factor, Y//factor, Z//factor), without the
    full-resolution descriptor: in CPU programs a kernel (:func:`kernels.mind_ssc_pooled`),
    elsewhere :func:`_mind_ssc_pooled_jax`, slab by slab."""
    jax_path = functools.partial(_mind_ssc_pooled_jax, radius=radius, dilation=dilation, factor=factor, slab=slab)
    return kernels.mind_ssc_pooled(image, radius, mind_pairs(dilation), factor, jax_path)


def _mind_ssc_pooled_jax(image: jnp.ndarray, radius: int, dilation: int, factor: int, slab: int) -> jnp.ndarray:
    """``avg_pool(mind_ssc(image), factor)`` computed slab by slab along axis 0 to bound memory.

    The full-resolution 12-channel descriptor and its temporaries (several GB for a LUMIR image)
    never exist at once: each slab of `slab` rows is computed with a halo, normalised with the
    volume-wide variance bound (the clamp uses the mean over the whole image, as ConvexAdam does),
    and pooled. Equal to the unsliced computation (tested).
    """
    x_size, y_size, z_size = image.shape
    slab = max(factor, (slab // factor) * factor)
    n_slabs = -(-x_size // slab)
    d, r = dilation, radius
    padded = jnp.pad(image, d, mode="edge")
    pairs = mind_pairs(d)

    def raw_slab(start):
        # SSD rows of this slab plus r rows each side, replicated at the image edges as ConvexAdam
        # replicates the SSD volume before its box filter
        rows = jnp.clip(start - r + jnp.arange(slab + 2 * r), 0, x_size - 1)

        def shifted(offset):
            part = jnp.take(padded, rows + d + offset[0], axis=0)
            return part[:, d + offset[1]: d + offset[1] + y_size, d + offset[2]: d + offset[2] + z_size]

        ssd = jnp.stack([(shifted(a) - shifted(b)) ** 2 for a, b in pairs])
        ssd = box_filter(ssd, 2 * r + 1, axes=(-2, -1), mode="edge")
        return sum(ssd[:, k: k + slab] for k in range(2 * r + 1)) / (2 * r + 1)  # valid along axis 0

    def mind_of(ssd):
        return ssd - ssd.min(axis=0, keepdims=True)

    # Three passes over a stored stack: a loop's output is written once, whereas XLA would fuse the
    # patch SSDs into every consumer (minimum, variance, descriptor) and compute them three times.
    starts = jnp.arange(n_slabs) * slab
    ssds = jax.lax.map(raw_slab, starts)  # (n, 12, slab, Y, Z)
    variances = jax.lax.map(lambda ssd: mind_of(ssd).mean(axis=0), ssds)  # (n, slab, Y, Z)
    valid_rows = (starts[:, None] + jnp.arange(slab)[None]) < x_size
    mean_variance = jnp.sum(jnp.where(valid_rows[:, :, None, None], variances, 0.0)) / (x_size * y_size * z_size)
    low = jnp.maximum(mean_variance * 1e-3, 1e-12)
    high = jnp.maximum(mean_variance * 1e3, 1e-12)

    def finish(args):
        ssd, variance = args
        return avg_pool(jnp.exp(-mind_of(ssd) / jnp.clip(variance, low, high)[None]), factor)

    pooled = jax.lax.map(finish, (ssds, variances))  # (n, 12, slab/f, Y/f, Z/f)
    pooled = jnp.moveaxis(pooled, 1, 0).reshape((12, n_slabs * (slab // factor)) + pooled.shape[3:])
    return pooled[:, : x_size // factor]
