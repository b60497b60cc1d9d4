"""The full-resolution level: a residual on the voxel grid, matched on the intensities.

The feature level works on a grid of ``refine.grid_spacing`` voxels; this level adds what that grid
cannot resolve (cortical folds). Its data term is the intensity SSD plus the local NCC
(:func:`jaxreg.stages.losses.intensity_loss`); the diffusion penalty acts on the residual alone, so
the level adds detail without relaxing the field it starts from, and the fold penalty acts on the sum.
It may first take steps of the same loss on both images pooled by 2 (``half_resolution_iterations``).
"""

from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp

from ..config import FineConfig
from ..ops.filters import avg_pool
from ..ops.warp import resize
from .losses import diffusion_penalty, fixed_window_statistics, fold_penalty, intensity_loss
from .refine import adam_on_smoothed, smooth_grid


def refine_fine(fixed: jnp.ndarray, moving: jnp.ndarray, init_disp: jnp.ndarray, config: FineConfig) -> jnp.ndarray:
    """`init_disp` (3, X, Y, Z, voxels) plus a smoothed residual that Adam optimises, first on the
    images average-pooled by 2 (``config.half_resolution_iterations`` steps of half the learning rate
    in pooled voxels, the same in millimetres), then on the voxel grid (``config.iterations``).
    `fixed`, `moving`: (X, Y, Z) images normalised to [0, 1]. Returns the displacement. The diffusion
    and fold penalties are the same on either grid: they see displacement over spacing."""
    disp = init_disp
    if config.half_resolution_iterations > 0:
        half_fixed, half_moving = avg_pool(fixed, 2), avg_pool(moving, 2)
        start = resize(init_disp, half_fixed.shape) / 2  # voxels of the pooled grid
        # the same steps in millimetres: learning_rate is in voxels per step, a pooled voxel is two
        half = replace(config, learning_rate=config.learning_rate / 2)
        residual = _level(half_fixed, half_moving, start, half, config.half_resolution_iterations) - start
        disp = init_disp + 2 * resize(residual, init_disp.shape[1:])
    return _level(fixed, moving, disp, config, config.iterations)


def _level(fixed: jnp.ndarray, moving: jnp.ndarray, init_disp: jnp.ndarray, config: FineConfig,
           iterations: int) -> jnp.ndarray:
    """`iterations` Adam steps of the level's loss on one grid: `init_disp` plus the smoothed residual."""
    if config.ncc_weight > 0:
        fixed_stats = fixed_window_statistics(fixed, config.ncc_window)
    else:
        fixed_stats = (fixed,)
    # intensity_weight scales the intensities, so the SSD's coefficient is its square
    weights = (config.intensity_weight ** 2, config.ncc_weight, config.ncc_window)

    def loss_of_smoothed(residual):
        disp = init_disp + residual
        loss = intensity_loss(disp, moving, fixed_stats, weights)
        loss = loss + config.diffusion_weight * diffusion_penalty(residual)
        if config.fold_weight > 0:
            loss = loss + config.fold_weight * fold_penalty(disp, config.fold_margin)
        return loss

    residual, _ = adam_on_smoothed(loss_of_smoothed, jnp.zeros_like(init_disp), config.smoothing_passes,
                                   config.learning_rate, iterations)
    return init_disp + smooth_grid(residual, config.smoothing_passes)
