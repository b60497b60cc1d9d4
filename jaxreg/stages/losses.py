"""The refinement losses, each with a hand-written gradient: warped feature SSD, intensity SSD plus
local NCC, fold penalty; and the diffusion penalty (autodiff).

Why by hand: XLA's autodiff of a many-channel gather scatters into the features and costs several
times the fused forward pass; for the fold penalty it keeps dozens of full-size intermediates alive.
Each value-and-gradient function below computes both from the same samples, and
:func:`jaxreg.ops.native.dispatch.hand_gradient` makes it the loss's gradient. In CPU programs the
sampling, the feature SSD, the local NCC and the fold penalty run as C++ kernels
(:mod:`jaxreg.ops.native.kernels`); the ``_jax`` functions here are the path everywhere else and the
reference the kernels are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..ops.filters import SPATIAL, box_filter, forward_difference
from ..ops.jacobians import det3
from ..ops.native.dispatch import hand_gradient
from ..ops.native.kernels import (fold_penalty_and_gradient, lncc_and_derivative, trilinear_with_slopes,
                                  warped_ssd_and_gradient)
from ..ops.warp import CORNERS, identity_grid, trilinear_corners


# --------------------------------------------------------------------------------------------
# trilinear sampling with the derivative of the interpolation
# --------------------------------------------------------------------------------------------

def _corner_index(disp, shape):
    """The flat index (8, x, y, z) in a grid of `shape` of the eight trilinear corners of
    ``x + disp(x)``, corner-major (corners outside point at ``prod(shape)``, an all-zero row the
    callers append), and the per-axis weights of each corner."""
    corners = trilinear_corners(identity_grid(disp.shape[1:]) + disp, shape, "zeros")
    outside = shape[0] * shape[1] * shape[2]
    return jnp.stack([jnp.where(valid, flat, outside) for flat, _, valid in corners]), [w for _, w, _ in corners]


def _corner_samples(disp, moving):
    """The eight trilinear corners of `moving` (X, Y, Z) or (X, Y, Z, C) at ``x + disp(x)``:
    (samples (8, x, y, z) + channels, per-axis weights per corner); zeros outside the grid.

    One gather of C-channel rows through one index array, faster on CPU than eight gathers that each
    recompute their indices. Corner-major, because an index that interleaves the 8 corners of each
    cell made a full-resolution step slower.
    """
    channels = moving.shape[3:]
    index, weights = _corner_index(disp, moving.shape[:3])
    flat_moving = jnp.concatenate([moving.reshape((-1,) + channels), jnp.zeros((1,) + channels, moving.dtype)])
    return flat_moving.at[index].get(mode="promise_in_bounds"), weights


def _corner_samples_by_channel(disp, moving):
    """:func:`_corner_samples` of a channels-last (X, Y, Z, C) `moving` as (C, 8, x, y, z): one scalar
    gather per channel through the shared index, instead of one gather of C-float rows."""
    index, weights = _corner_index(disp, moving.shape[:3])
    by_channel = jnp.moveaxis(moving, -1, 0).reshape(moving.shape[-1], -1)
    flat_moving = jnp.pad(by_channel, ((0, 0), (0, 1)))
    return jax.vmap(lambda channel: channel.at[index].get(mode="promise_in_bounds"))(flat_moving), weights


def _corner_slopes(weights, axis: int) -> list:
    """Per corner, the (x, y, z) derivative of its trilinear weight along `axis`."""
    slopes = []
    for bits, w in zip(CORNERS, weights):
        others = [w[j] for j in range(3) if j != axis]
        slopes.append(others[0] * others[1] if bits[axis] else -(others[0] * others[1]))
    return slopes


def _interpolate(corners, weights):
    """The trilinear value at ``x + disp(x)`` and its derivative along each axis, from the eight
    corner samples `corners` (each broadcasting against its per-axis `weights`)."""
    value = sum(w[0] * w[1] * w[2] * corner for corner, w in zip(corners, weights))
    slopes = [sum(s * corner for corner, s in zip(corners, _corner_slopes(weights, axis))) for axis in range(3)]
    return value, slopes


def _sample_with_slopes(disp, moving):
    """The JAX path of :func:`kernels.trilinear_with_slopes` (GPU, TPU, CPU without a compiler):
    `moving` (X, Y, Z) or channels-last (X, Y, Z, C), the value and slopes shaped alike."""
    samples, weights = _corner_samples(disp, moving)
    if samples.ndim > 4:  # channels last: the per-cell weights broadcast over them
        weights = [[w[..., None] for w in corner] for corner in weights]
    return _interpolate(list(samples), weights)


# --------------------------------------------------------------------------------------------
# feature SSD
# --------------------------------------------------------------------------------------------

def _ssd_and_gradient(disp, moving, fixed):
    """:func:`warped_ssd`'s value and gradient: the CPU kernel, or :func:`_ssd_and_gradient_jax`."""
    return warped_ssd_and_gradient(disp, moving, fixed, _ssd_and_gradient_jax)


def _ssd_and_gradient_jax(disp, moving, fixed):
    """Mean over cells of sum over channels of (moving(x+disp) - fixed)^2, and its gradient wrt disp.

    disp (3, x, y, z) in cells; moving, fixed (x, y, z, C) channels-last; zeros outside the grid.
    The value and the exact derivative of the trilinear interpolation come from the same samples.
    CPU programs gather C-channel rows, which is faster there; other platforms gather channel by
    channel, because on a GPU the row gather was several times slower and, next to the fold penalty,
    took XLA minutes to compile.
    """
    return jax.lax.platform_dependent(disp, moving, fixed, cpu=_ssd_and_gradient_rows,
                                      default=_ssd_and_gradient_by_channel)


def _ssd_and_gradient_rows(disp, moving, fixed):
    """:func:`_ssd_and_gradient_jax` from a row gather. The gradient along each axis is residual .
    (derivative of the warped features along it): three reductions over the channels instead of one
    per corner."""
    warped, slopes = _sample_with_slopes(disp, moving)
    return _ssd_from(warped - fixed, slopes, channel_axis=-1)


def _ssd_and_gradient_by_channel(disp, moving, fixed):
    """:func:`_ssd_and_gradient_jax` from one gather per channel, channels first throughout."""
    samples, weights = _corner_samples_by_channel(disp, moving)
    warped, slopes = _interpolate([samples[:, k] for k in range(samples.shape[1])], weights)
    return _ssd_from(warped - jnp.moveaxis(fixed, -1, 0), slopes, channel_axis=0)


def _ssd_from(residual, slopes, channel_axis: int):
    """The mean over cells of the summed squared `residual`, and its gradient from the `slopes`."""
    count = float(residual.size // residual.shape[channel_axis])
    gradient = jnp.stack([jnp.sum(residual * slope, axis=channel_axis) for slope in slopes])
    return jnp.sum(residual * residual) / count, gradient * (2.0 / count)


@hand_gradient(_ssd_and_gradient)
def warped_ssd(disp: jnp.ndarray, moving: jnp.ndarray, fixed: jnp.ndarray) -> jnp.ndarray:
    """Feature SSD of ``moving(x + disp(x))`` against `fixed` (differentiable in `disp` only)."""
    return _ssd_and_gradient(disp, moving, fixed)[0]


# --------------------------------------------------------------------------------------------
# intensity SSD and local NCC (the full-resolution level's data term)
# --------------------------------------------------------------------------------------------

def fixed_window_statistics(fixed: jnp.ndarray, window: int):
    """(fixed, its local mean, its local variance) over `window`^3 boxes: what the local NCC needs of
    the fixed image, computed once per registration instead of once per step."""
    mean, square = box_filter(jnp.stack([fixed, fixed * fixed]), window)
    return fixed, mean, square - mean * mean


LNCC_EPSILON = 1e-5  # keeps flat regions (both local variances ~0) from dividing by zero


def _lncc_and_derivative(warped, fixed_stats, window: int):
    """``1 - mean_x cc(x)`` and its derivative wrt the warped image, cc = local squared NCC of the
    fixed image and `warped` over `window`^3 boxes (zero-padded means): the CPU kernel or
    :func:`_lncc_and_derivative_jax`."""
    jax_path = functools.partial(_lncc_and_derivative_jax, window=window)
    return lncc_and_derivative(warped, *fixed_stats, window, LNCC_EPSILON, jax_path)


def _lncc_and_derivative_jax(warped, fixed, fixed_mean, fixed_var, window: int):
    """:func:`_lncc_and_derivative` as XLA code.

    With A the local covariance and B, C the local variances of fixed and warped, cc = A^2 / (B C + eps).
    The derivative is a sum of box filters, the zero-padded box filter being self-adjoint.
    """
    mean, square, product = box_filter(jnp.stack([warped, warped * warped, fixed * warped]), window)
    cross = product - fixed_mean * mean
    denominator = fixed_var * (square - mean * mean) + LNCC_EPSILON
    cc = cross * cross / denominator
    d_cross = 2.0 * cross / denominator  # d cc / d cross
    d_var = -cc * fixed_var / denominator  # d cc / d (local variance of warped)
    back = box_filter(jnp.stack([d_cross, d_cross * fixed_mean, d_var, d_var * mean]), window)
    count = float(warped.size)
    derivative = -(fixed * back[0] - back[1] + 2.0 * (warped * back[2] - back[3])) / count
    return 1.0 - jnp.sum(cc) / count, derivative


def _intensity_loss_and_gradient(disp, moving, fixed_stats, weights):
    """The full-resolution level's data term and its gradient wrt disp, from ONE gather of the
    moving image: ``ssd_weight * mean (M(x+u) - F)^2 + ncc_weight * (1 - mean local NCC^2)``.

    `moving` (X, Y, Z); `fixed_stats` from :func:`fixed_window_statistics`; `weights` is
    (ssd_weight, ncc_weight, window). The chain rule through the trilinear interpolation uses the
    same corner samples as the value.
    """
    ssd_weight, ncc_weight, window = weights
    fixed = fixed_stats[0]
    warped, slopes = trilinear_with_slopes(disp, moving, _sample_with_slopes)
    loss, derivative = 0.0, 0.0
    if ssd_weight > 0:
        residual = warped - fixed
        loss = ssd_weight * jnp.sum(residual * residual) / warped.size
        derivative = (2.0 * ssd_weight / warped.size) * residual
    if ncc_weight > 0:
        lncc, d_lncc = _lncc_and_derivative(warped, fixed_stats, window)
        loss = loss + ncc_weight * lncc
        derivative = derivative + ncc_weight * d_lncc
    return loss, jnp.stack([derivative * slope for slope in slopes])


@hand_gradient(_intensity_loss_and_gradient, nondiff_argnums=(3,))
def intensity_loss(disp: jnp.ndarray, moving: jnp.ndarray, fixed_stats, weights) -> jnp.ndarray:
    """:func:`_intensity_loss_and_gradient`'s value, differentiable in `disp` only."""
    return _intensity_loss_and_gradient(disp, moving, fixed_stats, weights)[0]


# --------------------------------------------------------------------------------------------
# regularisers
# --------------------------------------------------------------------------------------------

def diffusion_penalty(disp: jnp.ndarray) -> jnp.ndarray:
    """Sum over the three axes of the mean squared forward difference (all channels)."""
    return sum(jnp.mean(forward_difference(disp, axis) ** 2) for axis in SPATIAL)


def _next_along(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """x[i+1] along `axis`, the last element repeated (so a forward difference ends in 0)."""
    n = x.shape[axis]
    return jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)


def _previous_along(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """x[i-1] along `axis`, 0 before the first element."""
    widths = [(1, 0) if a == axis % x.ndim else (0, 0) for a in range(x.ndim)]
    return jnp.pad(jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis), widths)


def _cross(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _fold_penalty_and_gradient(disp, margin):
    """:func:`fold_penalty` and its gradient: the CPU kernel, or :func:`_fold_penalty_and_gradient_jax`."""
    return fold_penalty_and_gradient(disp, margin, _fold_penalty_and_gradient_jax)


def _fold_penalty_and_gradient_jax(disp, margin):
    """:func:`fold_penalty` and its gradient wrt `disp`, one component array at a time.

    Row a of J is the forward difference along axis a (+ e_a); the grid's last slab on each axis is
    masked out, which is the crop to the common interior. d det / d row a is the cross product of
    the other two rows (cofactors), and the transpose of a forward difference is a backward one.
    """
    shape = disp.shape[1:]
    components = [disp[c] for c in range(3)]
    rows = [[_next_along(components[c], a) - components[c] + (1.0 if a == c else 0.0) for c in range(3)]
            for a in range(3)]
    interior = None
    for a in range(3):
        below_last = jax.lax.broadcasted_iota(jnp.int32, shape, a) < shape[a] - 1
        interior = below_last if interior is None else interior & below_last
    count = float((shape[0] - 1) * (shape[1] - 1) * (shape[2] - 1))
    shortfall = jnp.where(interior, jax.nn.relu(margin - det3(*rows)), 0.0)
    weight = (-2.0 / count) * shortfall  # d penalty / d det
    cofactors = [_cross(rows[1], rows[2]), _cross(rows[2], rows[0]), _cross(rows[0], rows[1])]
    gradient = []
    for c in range(3):
        total = 0.0
        for a in range(3):
            flux = weight * cofactors[a][c]
            total = total + _previous_along(flux, a) - flux
        gradient.append(total)
    return jnp.sum(shortfall * shortfall) / count, jnp.stack(gradient)


@hand_gradient(_fold_penalty_and_gradient, nondiff_argnums=(1,))
def fold_penalty(disp: jnp.ndarray, margin: float = 0.1) -> jnp.ndarray:
    """Mean of ``relu(margin - det J)^2`` over the grid, J = I + grad(disp) (forward differences,
    cropped to the common interior): zero where the map is locally invertible with some room to spare.

    Hand-written gradient: XLA's autodiff of the determinant kept dozens of full-size intermediates
    alive (a large share of the full-resolution level's memory) and ran slower.
    """
    return _fold_penalty_and_gradient(disp, margin)[0]
