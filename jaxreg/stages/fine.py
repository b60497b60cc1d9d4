"""The full-resolution level: a residual on the voxel grid, matched on the intensities.

The feature level works on a grid of ``refine.grid_spacing`` voxels; this level adds what that grid
cannot resolve (cortical folds). Its data term is the intensity SSD plus the local NCC
(:func:`jaxreg.stages.losses.intensity_loss`); the diffusion penalty acts on the residual alone, so
the level adds detail without relaxing the field it starts from, and the fold penalty acts on the sum.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..config import FineConfig
from .losses import diffusion_penalty, fixed_window_statistics, fold_penalty, intensity_loss
from .refine import adam_on_smoothed, smooth_grid


def refine_fine(fixed: jnp.ndarray, moving: jnp.ndarray, init_disp: jnp.ndarray, config: FineConfig) -> jnp.ndarray:
    """`init_disp` (3, X, Y, Z, voxels) plus a smoothed residual that Adam optimises. `fixed`, `moving`:
    (X, Y, Z) images normalised to [0, 1]. Returns the displacement."""
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
                                   config.learning_rate, config.iterations)
    return init_disp + smooth_grid(residual, config.smoothing_passes)
