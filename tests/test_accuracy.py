"""The accuracy options of the refinement (issue 5): each recovers a known synthetic deformation
better than the ConvexAdam baseline, without folds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import jaxreg  # noqa: F401
from jaxreg.config import ConfigError, RefineConfig, load_config
from jaxreg.features import mind_ssc_pooled
from jaxreg.filters import avg_pool
from jaxreg.metrics import ndv
from jaxreg.refine import refine

from synthetic import SHAPE, brain, inverse_of, pull, smooth_field

FIXED = brain()
MASK = ndimage.binary_erosion(FIXED > 0, iterations=3)
TRUE_FORWARD = smooth_field(amplitude=3.0, sigma=3.0)
MOVING = pull(FIXED, TRUE_FORWARD)  # moving(y) = fixed(y + w(y)) -> u = inverse of w
EXPECTED = inverse_of(TRUE_FORWARD)


def _features(image, factor=2):
    return mind_ssc_pooled(jnp.asarray(image / 255.0), 1, 2, factor, slab=8)


def _error(disp):
    return float(np.linalg.norm(np.asarray(disp) - EXPECTED, axis=0)[MASK].mean())


def _refine(config):
    disp, losses = jax.jit(lambda f, m, d: refine(f, m, d, config))(
        _features(FIXED), _features(MOVING), jnp.zeros((3,) + SHAPE))
    return np.asarray(disp), np.asarray(losses)


def test_intensity_weight_is_validated():
    with pytest.raises(ConfigError, match="refine.intensity_weight"):
        load_config("convexadam-lumir", ["refine.intensity_weight=-1"])


def test_intensity_term_recovers_the_deformation_better():
    # as the pipeline does: the pooled [0, 1] image times the weight as a 13th channel
    def with_intensity(image, weight):
        pooled = avg_pool(jnp.asarray(image / 255.0), 2)[None]
        return jnp.concatenate([_features(image), weight * pooled])

    config = RefineConfig(grid_spacing=2, iterations=80, intensity_weight=2.0)
    disp_base, _ = _refine(RefineConfig(grid_spacing=2, iterations=80))
    disp_int, _ = jax.jit(lambda f, m, d: refine(f, m, d, config))(
        with_intensity(FIXED, 2.0), with_intensity(MOVING, 2.0), jnp.zeros((3,) + SHAPE))
    assert _error(disp_int) < _error(disp_base), (_error(disp_base), _error(disp_int))
    assert ndv(np.asarray(disp_int), FIXED > 0) == 0.0


def test_lumir_preset_uses_the_new_terms_and_baseline_does_not():
    assert load_config("lumir").refine.intensity_weight > 0
    assert load_config("convexadam-lumir").refine.intensity_weight == 0
    assert load_config("lumir").refine.fold_weight > 0 and load_config("convexadam-lumir").refine.fold_weight == 0


def _folds(disp):
    """Number of voxels whose Jacobian determinant is <= 0 (central differences)."""
    jac = np.stack([np.stack(np.gradient(disp[c]), 0) for c in range(3)]) + np.eye(3)[:, :, None, None, None]
    return int((np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))) <= 0).sum())


def test_fold_penalty_is_zero_for_smooth_fields_and_positive_for_a_fold():
    from jaxreg.refine import fold_penalty
    assert float(fold_penalty(jnp.zeros((3, 6, 6, 6)))) == 0.0
    folded = np.zeros((3, 6, 6, 6), np.float32)
    folded[0, 3:] = -2.0  # x -> x - 2 beyond row 3: the map runs backwards across the step
    assert float(fold_penalty(jnp.asarray(folded))) > 0.0


def test_fold_weight_removes_most_folds_of_a_weakly_regularised_refinement():
    weak = RefineConfig(grid_spacing=2, iterations=80, diffusion_weight=0.0, smoothing_passes=1)
    guarded = RefineConfig(grid_spacing=2, iterations=80, diffusion_weight=0.0, smoothing_passes=1, fold_weight=100.0)
    disp_weak, _ = _refine(weak)
    disp_guarded, _ = _refine(guarded)
    assert _folds(disp_weak) > 0
    assert _folds(disp_guarded) < 0.2 * _folds(disp_weak), (_folds(disp_weak), _folds(disp_guarded))
    # the guard costs little accuracy: within 15 % of the unguarded (folding) field
    assert _error(disp_guarded) < 1.15 * _error(disp_weak), (_error(disp_weak), _error(disp_guarded))


def test_fold_margin_penalises_cells_whose_jacobian_falls_below_it():
    from jaxreg.refine import fold_penalty
    squeeze = np.zeros((3, 6, 6, 6), np.float32)
    squeeze[0] = -0.8 * np.arange(6, dtype=np.float32)[:, None, None]  # det J = 1 - 0.8 = 0.2 everywhere
    assert float(fold_penalty(jnp.asarray(squeeze), 0.1)) == 0.0  # 0.2 clears a margin of 0.1
    np.testing.assert_allclose(float(fold_penalty(jnp.asarray(squeeze), 0.3)), 0.1 ** 2, rtol=1e-5)


def test_lumir_preset_recovers_a_known_deformation_better_than_the_baseline_without_folds():
    from jaxreg.pipeline import register
    baseline = register(FIXED, MOVING, preset="convexadam-lumir").disp
    lumir = register(FIXED, MOVING, preset="lumir").disp
    assert _error(lumir) < _error(baseline), (_error(baseline), _error(lumir))
    assert ndv(lumir, FIXED > 0) == 0.0 and _folds(lumir) == 0
