"""Adam refinement of a displacement grid (ConvexAdam's instance optimisation), driven by optax.

The optimised parameters are a displacement grid with ``grid_spacing`` voxels per cell, in cell
units. The displacement the loss sees is that grid smoothed by ``smoothing_passes`` zero-padded 3^3
box filters. Loss = feature SSD (summed over channels, averaged over cells) of the moving features
pulled through the displacement + ``diffusion_weight`` * mean squared forward differences per axis.
The iterations run inside ``lax.scan`` so the loss trace comes back with the result.

The SSD term has a hand-written gradient (:func:`warped_ssd`): XLA's autodiff of a 12-channel
gather scatters into the features, which costs several times more than the fused forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .config import RefineConfig
from .filters import SPATIAL, box_filter, forward_difference
from .warp import CORNERS, identity_grid, resize, trilinear_corners


def _ssd_and_gradient(disp, moving, fixed):
    """Mean over cells of sum over channels of (moving(x+disp) - fixed)^2, and its gradient wrt disp.

    disp (3, x, y, z) in cells; moving, fixed (x, y, z, C) channels-last; zeros outside the grid.
    """
    shape = disp.shape[1:]
    corners = trilinear_corners(identity_grid(shape) + disp, moving.shape[:3], "zeros")
    flat_moving = moving.reshape(-1, moving.shape[-1])
    value = 0.0
    partial = [0.0, 0.0, 0.0]
    for bits, (flat, weights, valid) in zip(CORNERS, corners):
        samples = jnp.where(valid[..., None], flat_moving[flat], 0.0)
        value = value + (weights[0] * weights[1] * weights[2])[..., None] * samples
        for k in range(3):
            others = [weights[j] for j in range(3) if j != k]
            slope = others[0] * others[1] if bits[k] else -(others[0] * others[1])
            partial[k] = partial[k] + slope[..., None] * samples
    residual = value - fixed
    count = float(shape[0] * shape[1] * shape[2])
    loss = jnp.sum(residual * residual) / count
    gradient = jnp.stack([jnp.sum(residual * partial[k], axis=-1) for k in range(3)]) * (2.0 / count)
    return loss, gradient


@jax.custom_vjp
def warped_ssd(disp: jnp.ndarray, moving: jnp.ndarray, fixed: jnp.ndarray) -> jnp.ndarray:
    """Feature SSD of ``moving(x + disp(x))`` against `fixed` (differentiable in `disp` only)."""
    return _ssd_and_gradient(disp, moving, fixed)[0]


def _warped_ssd_forward(disp, moving, fixed):
    loss, gradient = _ssd_and_gradient(disp, moving, fixed)
    return loss, (gradient, moving, fixed)


def _warped_ssd_backward(residuals, cotangent):
    gradient, moving, fixed = residuals
    return cotangent * gradient, jnp.zeros_like(moving), jnp.zeros_like(fixed)


warped_ssd.defvjp(_warped_ssd_forward, _warped_ssd_backward)


def smooth_grid(params: jnp.ndarray, passes: int) -> jnp.ndarray:
    """The displacement the loss sees: `passes` zero-padded 3^3 box filters of the parameter grid."""
    for _ in range(passes):
        params = box_filter(params, 3)
    return params


def diffusion_penalty(disp: jnp.ndarray) -> jnp.ndarray:
    """Sum over the three axes of the mean squared forward difference (all channels)."""
    return sum(jnp.mean(forward_difference(disp, axis) ** 2) for axis in SPATIAL)


def refine(fixed_cells: jnp.ndarray, moving_cells: jnp.ndarray, init_disp: jnp.ndarray, config: RefineConfig):
    """Refine `init_disp` (3, X, Y, Z, full-resolution voxels). Returns (disp full-res, loss trace).

    `fixed_cells`, `moving_cells`: (C, x, y, z) features average-pooled by ``config.grid_spacing``.
    """
    full_shape = init_disp.shape[1:]
    spacing = config.grid_spacing
    fixed_cells = jnp.moveaxis(fixed_cells, 0, -1)
    moving_cells = jnp.moveaxis(moving_cells, 0, -1)
    cell_shape = fixed_cells.shape[:3]
    params = resize(init_disp, cell_shape) / spacing

    def loss_fn(p):
        disp = smooth_grid(p, config.smoothing_passes)
        return warped_ssd(disp, moving_cells, fixed_cells) + config.diffusion_weight * diffusion_penalty(disp)

    optimiser = optax.adam(config.learning_rate)

    def step(carry, _):
        p, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(p)
        updates, state = optimiser.update(grad, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimiser.init(params)), None, length=config.iterations)
    disp = smooth_grid(params, config.smoothing_passes) * spacing
    return resize(disp, full_shape), losses
