"""Pull-resampling of volumes and displacement fields (pure JAX).

Conventions (LUMIR): a displacement ``disp`` has shape (3, X, Y, Z), lives on the output (fixed)
grid, is in voxels, channel c moves along array axis c, and ``warped(x) = volume(x + disp(x))``.
Volumes are (X, Y, Z) or channels-last (X, Y, Z, C) so that one gather fetches all channels.

Out-of-grid modes for trilinear sampling:

- ``"zeros"``: corners outside the grid count as 0 (PyTorch ``grid_sample`` zeros padding);
- ``"border"``: coordinates clamped into the grid (scipy ``map_coordinates(order=1, mode="nearest")``);
- ``"constant"``: 0 when the point is outside [0, n-1], trilinear inside (scipy ``mode="constant"``).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from .native import dispatch, kernels

# float32 products in full precision: GPUs would otherwise run einsum/matmul in TF32 (10-bit
# mantissa), i.e. errors of ~0.1 voxel in affine coordinates and in interpolation weights.
HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("zeros", "border", "constant")
CORNERS = tuple(itertools.product((0, 1), repeat=3))


def identity_grid(shape) -> jnp.ndarray:
    """(3, X, Y, Z) float32 voxel coordinates of every voxel."""
    return jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape], indexing="ij"))


def trilinear_corners(coords: jnp.ndarray, shape, mode: str):
    """For coords (3, ...) return, per corner, (flat index, per-axis weights, validity).

    Shared by :func:`warp` and the fused data term of the refinement, which needs the per-axis
    weights to form analytic gradients.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sizes = [jnp.float32(n - 1) for n in shape]
    inside = None
    if mode == "border":
        coords = jnp.stack([jnp.clip(coords[k], 0.0, sizes[k]) for k in range(3)])
    elif mode == "constant":
        inside = jnp.all(jnp.stack([(coords[k] >= 0.0) & (coords[k] <= sizes[k]) for k in range(3)]), axis=0)
        coords = jnp.stack([jnp.clip(coords[k], 0.0, sizes[k]) for k in range(3)])
    low = jnp.floor(coords)
    frac = coords - low
    low = low.astype(jnp.int32)
    corners = []
    for bits in CORNERS:
        idx = [low[k] + bits[k] for k in range(3)]
        weights = [frac[k] if bits[k] else 1.0 - frac[k] for k in range(3)]
        valid = None
        if mode == "zeros":
            valid = jnp.all(jnp.stack([(idx[k] >= 0) & (idx[k] < shape[k]) for k in range(3)]), axis=0)
        elif mode == "constant":
            valid = inside
        idx = [jnp.clip(idx[k], 0, shape[k] - 1) for k in range(3)]
        flat = (idx[0] * shape[1] + idx[1]) * shape[2] + idx[2]
        corners.append((flat, weights, valid))
    return corners


def sample(volume: jnp.ndarray, coords: jnp.ndarray, mode: str = "border") -> jnp.ndarray:
    """Trilinear samples of `volume` (X,Y,Z) or (X,Y,Z,C) at voxel coordinates `coords` (3, ...)."""
    shape = volume.shape[:3]
    channels = volume.shape[3:]
    flat_volume = volume.reshape((-1,) + channels)
    out = 0.0
    for flat, weights, valid in trilinear_corners(coords, shape, mode):
        w = weights[0] * weights[1] * weights[2]
        if valid is not None:
            w = jnp.where(valid, w, 0.0)
        values = flat_volume[flat]
        out = out + (w[..., None] * values if channels else w * values)
    return out


def warp(volume: jnp.ndarray, disp: jnp.ndarray, mode: str = "border") -> jnp.ndarray:
    """``volume(x + disp(x))`` on the grid of `disp` (trilinear). A 3-D volume takes the CPU kernel
    in CPU programs."""
    if volume.ndim == 3:
        return _warp_channels(volume[None], disp, mode)[0]
    return sample(volume, identity_grid(disp.shape[1:]) + disp, mode)


def warp_field(field: jnp.ndarray, disp: jnp.ndarray, mode: str = "zeros") -> jnp.ndarray:
    """Resample a (3, X, Y, Z) field at ``x + disp(x)`` (used for composition and inverse consistency)."""
    return _warp_channels(field, disp, mode)


@dispatch.jax_gradient(lambda volume, disp, mode: _warp_channels_jax(volume, disp, mode), nondiff_argnums=(2,))
def _warp_channels(volume: jnp.ndarray, disp: jnp.ndarray, mode: str) -> jnp.ndarray:
    """(C, X, Y, Z) `volume` at ``x + disp(x)``: the CPU kernel or :func:`_warp_channels_jax`;
    differentiated through the JAX path."""
    return kernels.warp_channels(volume, disp, mode, functools.partial(_warp_channels_jax, mode=mode))


def _warp_channels_jax(volume: jnp.ndarray, disp: jnp.ndarray, mode: str) -> jnp.ndarray:
    """:func:`kernels.warp_channels` as XLA code: (C, X, Y, Z) volume, channels first."""
    moved = sample(jnp.moveaxis(volume, 0, -1), identity_grid(disp.shape[1:]) + disp, mode)
    return jnp.moveaxis(moved, -1, 0)


def _linear_resize_weights(n_in: int, n_out: int):
    """Source indices and weights of PyTorch ``interpolate(mode='linear', align_corners=False)``."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    low = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (src - low).astype(np.float32)
    return low, high, frac


def resize(x: jnp.ndarray, out_shape, axes=(-3, -2, -1)) -> jnp.ndarray:
    """Separable linear resize of the last three axes, equal to PyTorch trilinear
    ``interpolate(size=out_shape, align_corners=False)`` (exact; no ``jax.image.resize``)."""
    for axis, n_out in zip(axes, out_shape):
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        low, high, frac = _linear_resize_weights(n_in, n_out)
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = jnp.asarray(frac).reshape(shape)
        x = jnp.take(x, jnp.asarray(low), axis=axis) * (1 - frac) + jnp.take(x, jnp.asarray(high), axis=axis) * frac
    return x


def rescale_field(disp: jnp.ndarray, out_shape) -> jnp.ndarray:
    """Resize a (3, ...) voxel displacement to another grid and convert its units to the new voxels.

    Assumes the same physical extent (factor = n_out / n_in per axis), as ConvexAdam does.
    """
    factors = jnp.asarray([o / i for o, i in zip(out_shape, disp.shape[1:])], jnp.float32).reshape(3, 1, 1, 1)
    return resize(disp, out_shape) * factors


def apply_affine(matrix: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
    """``matrix @ [p, 1]`` for points (3, ...) (matrix: 3x4, voxel to voxel)."""
    offset = matrix[:, 3].reshape((3,) + (1,) * (points.ndim - 1))
    return jnp.einsum("ij,j...->i...", matrix[:, :3], points, precision=HIGHEST) + offset


def affine_coordinates(matrix: jnp.ndarray, shape) -> jnp.ndarray:
    """Coordinates (3, X, Y, Z) of ``matrix @ [x, 1]`` for every voxel x (matrix: 3x4, voxel to voxel)."""
    return apply_affine(matrix, identity_grid(shape))


def compose_affine(matrix: jnp.ndarray, disp: jnp.ndarray) -> jnp.ndarray:
    """Total displacement of ``x -> A(x + disp(x))`` with A the 3x4 fixed-voxel-to-moving-voxel map."""
    points = identity_grid(disp.shape[1:]) + disp
    return apply_affine(matrix, points) - identity_grid(disp.shape[1:])
