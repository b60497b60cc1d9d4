"""12-DOF affine initialisation: Adam on MIND-SSC feature SSD over a coarse image pyramid.

The affine maps fixed voxel coordinates to moving voxel coordinates (``fixed_vox2moving_vox``,
3x4). It is parameterised around the image centre, ``A(x) = (I + L)(x - c) + c + s * t``, so the
zero parameter vector is the identity and rotation/scaling do not drag the brain off-centre; the
translation scale ``s`` gives translation and linear parameters comparable Adam step sizes.
MIND features make the similarity robust to contrast differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ..config import AffineConfig
from .features import mind_ssc
from ..ops.filters import avg_pool
from ..ops.warp import HIGHEST, apply_affine, sample

TRANSLATION_SCALE = 20.0  # voxels per unit of the translation parameters


def params_to_matrix(params: jnp.ndarray, shape) -> jnp.ndarray:
    """12 parameters (9 linear deltas, 3 translations) -> 3x4 fixed-voxel-to-moving-voxel matrix."""
    linear = jnp.eye(3) + params[:9].reshape(3, 3)
    centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
    offset = centre - jnp.matmul(linear, centre, precision=HIGHEST) + TRANSLATION_SCALE * params[9:]
    return jnp.concatenate([linear, offset[:, None]], axis=1)


def _level_coordinates(shape, factor: int) -> jnp.ndarray:
    """Full-resolution voxel coordinates (3, ...) of the cells of an avg_pool(factor) grid, plus ones."""
    cells = [n // factor for n in shape]
    axes = [jnp.arange(n, dtype=jnp.float32) * factor + (factor - 1) / 2.0 for n in cells]
    grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"))
    return grid


def _level_features(image: jnp.ndarray, similarity: str) -> jnp.ndarray:
    """Channels-last features of one pyramid level: MIND-SSC, or the intensities themselves."""
    if similarity == "mind":
        return jnp.moveaxis(mind_ssc(image, 1, 1), 0, -1)
    return image[..., None]


def _dissimilarity(sampled: jnp.ndarray, fixed_features: jnp.ndarray, similarity: str) -> jnp.ndarray:
    if similarity == "mind":
        return jnp.mean((sampled - fixed_features) ** 2)
    a = sampled - sampled.mean()
    b = fixed_features - fixed_features.mean()
    return -jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b) + 1e-12)  # minus global NCC


def affine_search(fixed: jnp.ndarray, moving: jnp.ndarray, config: AffineConfig, similarity: str = "mind") -> jnp.ndarray:
    """Return the 3x4 ``fixed_vox2moving_vox`` matrix that aligns `moving` to `fixed` (both (X,Y,Z)).

    ``similarity``: ``"mind"`` (SSD of MIND-SSC features, robust across contrasts) or ``"ncc"``
    (global normalised cross-correlation of intensities: smoother over large misalignments of
    same-contrast images, used to bring native T1s to the template).
    """
    shape = fixed.shape
    params = jnp.zeros(12, jnp.float32)
    for factor, iterations in zip(config.levels, config.iterations):
        if iterations == 0:
            continue
        fixed_level = avg_pool(fixed, factor)
        moving_level = avg_pool(moving, factor)
        fixed_features = _level_features(fixed_level, similarity)
        moving_features = _level_features(moving_level, similarity)
        points = _level_coordinates(shape, factor)

        def loss_fn(p, points=points, moving_features=moving_features, fixed_features=fixed_features, factor=factor):
            matrix = params_to_matrix(p, shape)
            level_coords = (apply_affine(matrix, points) - (factor - 1) / 2.0) / factor  # full-res voxel -> cell coordinates
            sampled = sample(moving_features, level_coords, "border")
            return _dissimilarity(sampled, fixed_features, similarity)

        schedule = optax.cosine_decay_schedule(config.learning_rate, iterations)
        optimiser = optax.adam(schedule)

        def step(carry, _, loss_fn=loss_fn, optimiser=optimiser):
            p, state = carry
            loss, grad = jax.value_and_grad(loss_fn)(p)
            updates, state = optimiser.update(grad, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, length=iterations)
    return params_to_matrix(params, shape)
