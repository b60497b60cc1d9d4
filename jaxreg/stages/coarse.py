"""ConvexAdam's coarse discrete search (Siebert, Hansen & Heinrich, 2021).

On a grid of ``grid_spacing``-voxel cells: a cost volume over every integer displacement in a
(2r+1)^3 window (sum over feature channels of squared differences, twice box-filtered), then coupled
convex rounds that alternate a smooth field (box-filtered argmin displacements) with a per-cell
argmin of ``cost + w * |d - smooth|^2`` for increasing w; optionally the same backwards and the two
fields made inverse consistent. Everything is in coarse-cell units until :func:`coarse_search`
converts to voxels.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ..ops.native import kernels
from ..config import CoarseConfig
from ..ops.filters import box_filter
from ..ops.warp import warp_field


def search_offsets(radius: int) -> np.ndarray:
    """(n, 3) integer displacement candidates, n = (2r+1)^3, in ConvexAdam's order: the axis-0
    offset varies fastest. The order decides ties (first index wins), which are common in the
    background, so it is kept for number-for-number agreement."""
    steps = range(-radius, radius + 1)
    return np.array([(i, j, k) for k, j, i in itertools.product(steps, steps, steps)], dtype=np.int32)


def cost_volume(fixed_features: jnp.ndarray, moving_features: jnp.ndarray, radius: int) -> jnp.ndarray:
    """(n, x, y, z) matching cost of every candidate displacement (moving zero-padded outside): the
    feature SSD, twice box-filtered. Computed (2r+1)^2 candidates at a time, so that only one such
    block exists unfiltered (a whole unfiltered volume would add 0.4 GB at LUMIR size)."""
    width = 2 * radius + 1
    blocks = jnp.asarray(search_offsets(radius).reshape(width, width * width, 3))
    squared_differences = functools.partial(_squared_differences, radius=radius)

    def one(offsets):
        cost = kernels.cost_volume(fixed_features, moving_features, offsets, squared_differences)
        return box_filter(box_filter(cost, 3), 3)

    costs = jax.lax.map(one, blocks)
    return costs.reshape((width ** 3,) + costs.shape[2:])


def _squared_differences(fixed_features, moving_features, offsets, radius: int):
    """The JAX path of :func:`kernels.cost_volume`, one candidate at a time (offsets within
    `radius`)."""
    padded = jnp.pad(moving_features, ((0, 0),) + ((radius, radius),) * 3)
    channels, *shape = fixed_features.shape

    def one(start):
        shifted = jax.lax.dynamic_slice(padded, (0, start[0], start[1], start[2]), (channels, *shape))
        return ((fixed_features - shifted) ** 2).sum(axis=0)

    return jax.lax.map(one, offsets + radius)


def _coupled_argmin(cost: jnp.ndarray, offsets: jnp.ndarray, centre: jnp.ndarray | None, weight: float) -> jnp.ndarray:
    """Per cell, the first candidate index minimising ``cost + weight * |offset - centre|^2``: the CPU
    kernel, or :func:`_coupled_argmin_jax`."""
    return kernels.coupled_argmin(cost, offsets, centre, weight, _coupled_argmin_jax)


def _coupled_argmin_jax(cost: jnp.ndarray, offsets: jnp.ndarray, centre: jnp.ndarray | None, weight: float) -> jnp.ndarray:
    """Per cell, the first candidate index minimising ``cost + weight * |offset - centre|^2``.

    Streams over the candidates in a loop (one running minimum per cell): several times faster on
    CPU than a reduction over the stacked volume, and ties resolve to the first index like argmin.
    """

    def body(i, carry):
        best, arg = carry
        value = cost[i]
        if centre is not None:
            value = value + weight * sum((offsets[i, k] - centre[k]) ** 2 for k in range(3))
        better = value < best
        return jnp.where(better, value, best), jnp.where(better, i, arg)

    init = (jnp.full(cost.shape[1:], jnp.inf, cost.dtype), jnp.zeros(cost.shape[1:], jnp.int32))
    return jax.lax.fori_loop(0, cost.shape[0], body, init)[1]


def coupled_convex(cost: jnp.ndarray, offsets: jnp.ndarray, weights) -> jnp.ndarray:
    """Coupled convex optimisation: returns the smooth displacement (3, x, y, z) in cells."""

    def smooth_of(best):
        return box_filter(jnp.stack([jnp.take(offsets[:, k], best) for k in range(3)]), 3)

    smooth = smooth_of(_coupled_argmin(cost, offsets, None, 0.0))
    for weight in weights:
        smooth = smooth_of(_coupled_argmin(cost, offsets, smooth, weight))
    return smooth


def make_inverse_consistent(forward: jnp.ndarray, backward: jnp.ndarray, iterations: int):
    """Iterate ``u <- (u - v(x + u)) / 2`` jointly on both fields (ConvexAdam's inverse consistency)."""

    def step(_, fields):
        u, v = fields
        return 0.5 * (u - warp_field(v, u, "zeros")), 0.5 * (v - warp_field(u, v, "zeros"))

    return jax.lax.fori_loop(0, iterations, step, (forward, backward))


def coarse_search(fixed_cells: jnp.ndarray, moving_cells: jnp.ndarray, config: CoarseConfig) -> jnp.ndarray:
    """Coarse displacement (3, x, y, z) on the cell grid, in FULL-resolution voxels.

    `fixed_cells`, `moving_cells`: (C, x, y, z) features average-pooled by ``config.grid_spacing``.
    """
    if config.inverse_consistent:
        return coarse_search_both_ways(fixed_cells, moving_cells, config)[0]
    return _search(fixed_cells, moving_cells, config) * config.grid_spacing


def coarse_search_both_ways(fixed_cells: jnp.ndarray, moving_cells: jnp.ndarray,
                            config: CoarseConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The forward displacement of :func:`coarse_search` and the backward one (moving to fixed, on the
    moving image's cells), in full-resolution voxels: the search makes both anyway when it makes them
    inverse consistent, and a symmetric program needs both."""
    forward, backward = _search(fixed_cells, moving_cells, config), _search(moving_cells, fixed_cells, config)
    if config.inverse_consistent:
        forward, backward = make_inverse_consistent(forward, backward, config.inverse_iterations)
    return forward * config.grid_spacing, backward * config.grid_spacing


def _search(fixed_cells: jnp.ndarray, moving_cells: jnp.ndarray, config: CoarseConfig) -> jnp.ndarray:
    """One direction's cost volume and coupled convex optimisation: the displacement in cells."""
    offsets = jnp.asarray(search_offsets(config.search_radius), jnp.float32)
    return coupled_convex(cost_volume(fixed_cells, moving_cells, config.search_radius), offsets,
                          config.coupling_weights)
