"""The registration program: one jitted function chaining the pure stages, and its host wrappers.

Data flow: normalise -> (affine) -> MIND-SSC features -> coarse discrete search -> Adam refinement
-> upsample -> (full-resolution intensity level) -> compose with the affine into ONE voxel
displacement on the fixed grid (LUMIR convention ``moved(x) = moving(x + disp(x))``, channel c along
array axis c) -> (fold repair).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import RegistrationConfig
from .ops.filters import avg_pool
from .ops.warp import affine_coordinates, compose_affine, resize, sample, warp, warp_field
from .stages.affine import affine_search
from .stages.coarse import coarse_search
from .stages.features import mind_ssc_pooled
from .stages.refine import refine, refine_fine
from .stages.unfold import unfold

IDENTITY_AFFINE = np.eye(3, 4, dtype=np.float32)



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


def refinement_features(image: jnp.ndarray, config: RegistrationConfig, use_intensity=True) -> jnp.ndarray:
    """(C, x, y, z) features the refinement matches: MIND-SSC pooled by ``refine.grid_spacing``, plus
    the pooled image times ``refine.intensity_weight`` as one more channel when that is > 0 (an
    intensity SSD term next to MIND, for same-contrast pairs; all zeros where `use_intensity` is False,
    so the same program serves pairs whose contrasts differ)."""
    spacing = config.refine.grid_spacing
    stack = mind_ssc_pooled(image, config.features.radius, config.features.dilation, spacing)
    if config.refine.intensity_weight > 0:
        weight = jnp.where(use_intensity, config.refine.intensity_weight, 0.0)
        stack = jnp.concatenate([stack, weight * avg_pool(image, spacing)[None]])
    return stack


def contrasts_agree(fixed_n: jnp.ndarray, moving_n: jnp.ndarray, disp: jnp.ndarray, config: RegistrationConfig):
    """(brain NCC of fixed and moved, whether the intensity terms may be used): see
    ``RefineConfig.intensity_min_ncc``. The NCC is NaN when the preset has no guard."""
    uses_intensity = config.refine.intensity_weight > 0 or config.fine.enabled
    if not uses_intensity or config.refine.intensity_min_ncc <= -1:
        return jnp.float32(jnp.nan), jnp.bool_(True)
    agreement = ncc(fixed_n, warp(moving_n, disp), fixed_n > 0)
    return agreement, agreement >= config.refine.intensity_min_ncc


def _program(fixed, moving, init_disp, *, config: RegistrationConfig):
    """The whole registration as one traced function. Returns a dict of arrays."""
    shape = fixed.shape
    fixed_n, moving_n = normalise(fixed), normalise(moving)

    if config.affine.enabled:
        matrix = affine_search(fixed_n, moving_n, config.affine)
        moving_aligned = sample(moving_n, affine_coordinates(matrix, shape), "border")
    else:
        matrix = jnp.asarray(IDENTITY_AFFINE)
        moving_aligned = moving_n

    radius, dilation = config.features.radius, config.features.dilation

    def features(image, factor):
        return mind_ssc_pooled(image, radius, dilation, factor)

    disp = jnp.zeros((3,) + shape, jnp.float32) if init_disp is None else init_disp
    if config.coarse.enabled:
        # with a starting field, the coarse search looks for what remains after it
        spacing = config.coarse.grid_spacing
        start = moving_aligned if init_disp is None else warp(moving_aligned, init_disp)
        step = coarse_search(features(fixed_n, spacing), features(start, spacing), config.coarse)
        step = resize(step, shape)
        # new field: first the coarse step, then the starting field: x -> x + s(x) + d(x + s(x))
        disp = step if init_disp is None else step + warp_field(disp, step, "border")
    # intensity terms only when the contrasts agree, judged after the contrast-blind coarse search
    contrast_ncc, use_intensity = contrasts_agree(fixed_n, moving_aligned, disp, config)
    losses = jnp.zeros((0,), jnp.float32)
    if config.refine.enabled and config.refine.iterations > 0:
        # same pooling factor as the coarse stage: XLA computes the MIND-SSC features once
        fixed_f, moving_f = (refinement_features(image, config, use_intensity) for image in (fixed_n, moving_aligned))
        disp, losses = refine(fixed_f, moving_f, disp, config.refine)
    if config.fine.enabled and config.fine.iterations > 0:
        disp = jax.lax.cond(use_intensity, lambda d: refine_fine(fixed_n, moving_aligned, d, config.fine),
                            lambda d: d, disp)

    total = compose_affine(matrix, disp) if config.affine.enabled else disp
    unfold_rounds = folding_voxels = jnp.int32(0)
    if config.unfold.rounds > 0:
        total, unfold_rounds, folding_voxels = unfold(total, config.unfold)
    moved = warp(moving_n, total, "border")
    return {
        "disp": total,
        "affine": matrix,
        "moved": moved,
        "refine_loss": losses,
        "contrast_ncc": contrast_ncc,
        "intensity_used": use_intensity,
        "unfold_rounds": unfold_rounds,
        "folding_voxels": folding_voxels,
        "ncc_before": ncc(fixed_n, moving_n),
        "ncc_after": ncc(fixed_n, moved),
    }


program = jax.jit(_program, static_argnames=("config",))


def _batched_program(fixed, moving, *, config: RegistrationConfig):
    """`_program` over a leading pair axis: (B, X, Y, Z) stacks in, every output gains the B axis."""
    return jax.vmap(lambda f, m: _program(f, m, None, config=config))(fixed, moving)


batched_program = jax.jit(_batched_program, static_argnames=("config",))

