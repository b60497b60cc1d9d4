"""Fold repair of a finished field: smooth it locally wherever it folds, until it folds nowhere.

LUMIR scores folding with the non-diffeomorphic volume (NDV): ten finite-difference Jacobian
determinants per voxel (:mod:`jaxreg.ops.jacobians`), any negative one counts. The optimisation's
penalties keep folds rare but cannot rule them out, and their exact gradient costs 50x the forward
pass at full resolution. The folding voxels are few, so a repair is cheaper and exact: each round
moves the field, at every voxel that still folds (later rounds: near it), towards its local 3^3
average, and the rounds stop as soon as no voxel folds (or after ``rounds``). Everywhere else the
field is left bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops.native import kernels
from ..config import UnfoldConfig
from ..ops.filters import box_filter
from ..ops.jacobians import digital_jacobians
from ..ops.warp import identity_grid


def fold_mask(disp: jnp.ndarray) -> jnp.ndarray:
    """Boolean (X, Y, Z): voxels where one of the ten digital Jacobians of ``x + disp(x)`` is negative
    (the voxels with non-zero NDV; the one-voxel border, which the evaluator crops, is False)."""
    return kernels.fold_mask(disp, _fold_mask_jax)


def _fold_mask_jax(disp: jnp.ndarray) -> jnp.ndarray:
    """:func:`fold_mask` as XLA code (GPU, TPU, CPU without the kernels)."""
    phi = disp + identity_grid(disp.shape[1:])
    folded = None
    for jac in digital_jacobians(phi):
        folded = jac < 0 if folded is None else folded | (jac < 0)
    return jnp.pad(folded, 1)


def unfold(disp: jnp.ndarray, config: UnfoldConfig) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Repair the folds of `disp` (3, X, Y, Z) voxels. Returns (field, rounds run, folding voxels left).

    A round moves the field, on the folding voxels (the first ``config.local_rounds`` rounds) or on the
    fold mask grown by a ``config.grow``^3 box (later rounds), ``config.blend`` of the way to its 3^3 box
    average (border replicated); the loop ends when no voxel folds or after ``config.rounds``.
    In CPU programs one kernel runs all the rounds (:func:`kernels.unfold`).
    """
    return kernels.unfold(disp, config.rounds, config.local_rounds, config.grow, config.blend,
                              lambda d: _unfold_jax(d, config))


def _unfold_jax(disp: jnp.ndarray, config: UnfoldConfig) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """:func:`unfold` as XLA code (GPU, TPU, CPU without the kernels): every round smooths and
    re-masks the whole field."""

    def rounds_with(grow: int, last_round: int):
        def keep_going(state):
            _, rounds, folded = state
            return (rounds < last_round) & jnp.any(folded)

        def one_round(state):
            field, rounds, folded = state
            near = folded if grow == 1 else box_filter(folded.astype(jnp.float32), grow) > 0
            smoothed = field + config.blend * (box_filter(field, 3, mode="edge") - field)
            field = jnp.where(near[None], smoothed, field)
            return field, rounds + 1, _fold_mask_jax(field)

        return keep_going, one_round

    state = (disp, jnp.int32(0), _fold_mask_jax(disp))
    if config.local_rounds > 0:
        state = jax.lax.while_loop(*rounds_with(1, min(config.local_rounds, config.rounds)), state)
    field, rounds, folded = jax.lax.while_loop(*rounds_with(config.grow, config.rounds), state)
    return field, rounds, jnp.sum(folded, dtype=jnp.int32)
