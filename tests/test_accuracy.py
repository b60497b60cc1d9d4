"""The accuracy options of the refinement (issue 5): each recovers a known synthetic deformation
better than the ConvexAdam baseline, without folds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.config import ConfigError, RefineConfig, load_config
from jaxreg.stages.features import mind_ssc_pooled
from jaxreg.ops.filters import avg_pool
from jaxreg.evaluation.metrics import ndv
from jaxreg.stages.refine import refine

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
    assert load_config("lumir").refine.symmetric and not load_config("convexadam-lumir").refine.symmetric


def _folds(disp):
    """Number of voxels whose Jacobian determinant is <= 0 (central differences)."""
    jac = np.stack([np.stack(np.gradient(disp[c]), 0) for c in range(3)]) + np.eye(3)[:, :, None, None, None]
    return int((np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))) <= 0).sum())


def test_symmetric_refinement_is_inverse_consistent_and_as_accurate():
    """Refined both ways (fixed to moving and back), the symmetric fields compose to the identity
    13x more closely than the one-way ones on this pair, and recover the known deformation as well."""
    from jaxreg.ops.warp import warp_field
    results = {}
    for symmetric in (False, True):
        config = RefineConfig(grid_spacing=2, iterations=80, symmetric=symmetric)
        run = jax.jit(lambda f, m: refine(f, m, jnp.zeros((3,) + SHAPE), config)[0])
        forward, backward = run(_features(FIXED), _features(MOVING)), run(_features(MOVING), _features(FIXED))
        residual = np.linalg.norm(np.asarray(backward + warp_field(forward, backward, "border")), axis=0)[MASK]
        results[symmetric] = (_error(forward), residual.mean(), ndv(np.asarray(forward), MASK))
    (one_way_error, one_way_residual, _), (error, residual, folds) = results[False], results[True]
    assert residual < 0.2 * one_way_residual, (residual, one_way_residual)
    assert error < 1.05 * one_way_error and folds == 0, (error, one_way_error, folds)


def test_fold_penalty_is_zero_for_smooth_fields_and_positive_for_a_fold():
    from jaxreg.stages.losses import fold_penalty
    assert float(fold_penalty(jnp.zeros((3, 6, 6, 6)))) == 0.0
    folded = np.zeros((3, 6, 6, 6), np.float32)
    folded[0, 3:] = -2.0  # x -> x - 2 beyond row 3: the map runs backwards across the step
    assert float(fold_penalty(jnp.asarray(folded))) > 0.0


def test_fold_penalty_gradient_matches_autodiff_of_the_cropped_definition():
    """The hand-written gradient against JAX autodiff of the definition written out directly."""
    from jaxreg.stages.losses import fold_penalty

    def reference(disp, margin):
        x, y, z = (n - 1 for n in disp.shape[1:])
        grads = [jnp.diff(disp, axis=a + 1)[:, :x, :y, :z] for a in range(3)]  # d disp / d axis a
        jac = jnp.stack(grads) + jnp.eye(3)[:, :, None, None, None]  # [row a, component c]
        det = jnp.linalg.det(jnp.moveaxis(jac, (0, 1), (-2, -1)))
        return jnp.mean(jax.nn.relu(margin - det) ** 2)

    rng = np.random.default_rng(3)
    disp = jnp.asarray(rng.normal(0.0, 0.4, (3, 7, 8, 9)).astype(np.float32))  # many folds and near-folds
    for margin in (0.1, 0.3):
        value, grad = jax.value_and_grad(fold_penalty)(disp, margin)
        ref_value, ref_grad = jax.value_and_grad(reference)(disp, margin)
        assert float(ref_value) > 0.01
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-4, atol=1e-7 * float(jnp.abs(ref_grad).max()))
    # the default margin and a multiple of the penalty inside a larger loss differentiate the same way
    scaled = jax.grad(lambda d: 3.0 * fold_penalty(d))(disp)
    np.testing.assert_allclose(np.asarray(scaled), 3.0 * np.asarray(jax.grad(reference)(disp, 0.1)), rtol=1e-4, atol=1e-9)


def test_fold_weight_removes_most_folds_of_a_weakly_regularised_refinement():
    weak = RefineConfig(grid_spacing=2, iterations=80, diffusion_weight=0.0, smoothing_passes=1)
    disp_weak, _ = _refine(weak)
    assert _folds(disp_weak) > 0
    # Without diffusion the guarded run is chaotic: a 1e-5 change of the weight (or of the rounding of
    # the fold gradient) moves its error between 0.97 and 1.12. So judge the median of three weights.
    guarded = [_refine(RefineConfig(grid_spacing=2, iterations=80, diffusion_weight=0.0, smoothing_passes=1,
                                    fold_weight=weight))[0] for weight in (90.0, 100.0, 110.0)]
    for disp in guarded:
        assert _folds(disp) < 0.2 * _folds(disp_weak), (_folds(disp_weak), _folds(disp))
    # the guard costs little accuracy: within 15 % of the unguarded (folding) field
    errors = sorted(_error(disp) for disp in guarded)
    assert errors[1] < 1.15 * _error(disp_weak), (_error(disp_weak), errors)


def test_fold_margin_penalises_cells_whose_jacobian_falls_below_it():
    from jaxreg.stages.losses import fold_penalty
    squeeze = np.zeros((3, 6, 6, 6), np.float32)
    squeeze[0] = -0.8 * np.arange(6, dtype=np.float32)[:, None, None]  # det J = 1 - 0.8 = 0.2 everywhere
    assert float(fold_penalty(jnp.asarray(squeeze), 0.1)) == 0.0  # 0.2 clears a margin of 0.1
    np.testing.assert_allclose(float(fold_penalty(jnp.asarray(squeeze), 0.3)), 0.1 ** 2, rtol=1e-5)


@pytest.mark.slow
def test_lumir_preset_recovers_a_known_deformation_better_than_the_baseline_without_folds():
    from jaxreg.registration import register
    baseline = register(FIXED, MOVING, preset="convexadam-lumir").disp
    before_half = register(FIXED, MOVING, preset="lumir", overrides=["fine.half_resolution_iterations=0"]).disp
    assert _error(before_half) < _error(baseline), (_error(baseline), _error(before_half))
    # lumir's half-resolution steps gain Dice on every real pair (docs/results.md) but cost this small
    # phantom, whose answer the levels before already find, 13 % of its error (0.529 -> 0.597 voxel):
    # Adam's first steps move every voxel by about a learning rate. Bounded, so that a wrong scale shows
    lumir = register(FIXED, MOVING, preset="lumir").disp
    assert _error(lumir) < 1.2 * _error(before_half), (_error(before_half), _error(lumir))
    assert ndv(lumir, FIXED > 0) == 0.0 and _folds(lumir) == 0
