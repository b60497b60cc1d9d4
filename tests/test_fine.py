"""The full-resolution intensity level and the fold repair (issue 5): each checked against an
independent reference (the LUMIR kernel definition of the Jacobians, a known synthetic deformation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.evaluation import metrics
from jaxreg.config import ConfigError, FineConfig, UnfoldConfig, load_config
from jaxreg.stages.unfold import fold_mask, unfold

from synthetic import brain, inverse_of, pull, smooth_field
from jacobian_reference import reference_digital_jacobians

_unfold = jax.jit(unfold, static_argnames="config")


def _random_folding_field(seed=3, shape=(32, 30, 28), amplitude=0.6):
    """Smooth background plus a few local bumps that fold."""
    rng = np.random.default_rng(seed)
    disp = np.zeros((3,) + shape, np.float32)
    for centre in ((9, 9, 8), (20, 19, 18)):
        bump = np.zeros(shape, np.float32)
        bump[centre] = 1.0
        bump = ndimage.gaussian_filter(bump, 1.0)
        disp += (rng.normal(0, 1, (3, 1, 1, 1)) * bump / bump.max() * 3.0).astype(np.float32)
    disp += rng.normal(0, amplitude * 0.1, disp.shape).astype(np.float32)
    return disp


def test_fold_mask_marks_the_voxels_with_a_negative_lumir_determinant():
    disp = _random_folding_field()
    expected = np.zeros(disp.shape[1:], bool)
    expected[1:-1, 1:-1, 1:-1] = np.any([d < 0 for d in reference_digital_jacobians(disp)], axis=0)
    assert expected.sum() > 10  # the field does fold
    np.testing.assert_array_equal(np.asarray(fold_mask(jnp.asarray(disp))), expected)


def test_unfold_removes_every_fold_and_leaves_the_rest_of_the_field_alone():
    disp = _random_folding_field()
    config = UnfoldConfig(rounds=50, grow=3)
    repaired, rounds, left = _unfold(jnp.asarray(disp), config)
    repaired = np.asarray(repaired)
    assert int(left) == 0 and 0 < int(rounds) < config.rounds
    mask = np.ones(disp.shape[1:], bool)
    assert metrics.ndv(disp, mask) > 0 and metrics.ndv(repaired, mask) == 0.0
    # a round touches voxels within grow//2 + 1 of a folding voxel: farther away the field is unchanged
    reach = int(rounds) * (config.grow // 2 + 1)
    folded = np.asarray(fold_mask(jnp.asarray(disp)))
    far = ndimage.distance_transform_cdt(~folded, metric="chessboard") > reach
    assert far.sum() > 0.3 * far.size, (int(rounds), int(folded.sum()))
    np.testing.assert_array_equal(repaired[:, far], disp[:, far])


def test_local_gentle_unfold_stays_closer_to_the_field_than_full_replacement():
    """The lumir-style repair (first rounds on the folding voxels only, partial steps): every fold goes,
    and the field moves less than under full 3^3 replacement of the grown mask (less registration undone)."""
    disp = _random_folding_field()
    wide = np.asarray(_unfold(jnp.asarray(disp), UnfoldConfig(rounds=60, grow=3))[0])
    gentle_config = UnfoldConfig(rounds=60, local_rounds=10, grow=3, blend=0.5)
    gentle, rounds, left = _unfold(jnp.asarray(disp), gentle_config)
    gentle = np.asarray(gentle)
    mask = np.ones(disp.shape[1:], bool)
    assert int(left) == 0 and metrics.ndv(gentle, mask) == 0.0
    changed = np.abs(gentle - disp).sum()
    assert 0 < changed < 0.8 * np.abs(wide - disp).sum()
    # the local rounds touch folding voxels only: after one local round, only they have moved
    first = np.asarray(_unfold(jnp.asarray(disp), UnfoldConfig(rounds=1, local_rounds=1, blend=0.5))[0])
    folded = np.asarray(fold_mask(jnp.asarray(disp)))
    moved = np.any(first != disp, axis=0)
    assert moved.sum() > 0 and not np.any(moved & ~folded)
    np.testing.assert_allclose(first[:, folded], (0.5 * disp + 0.5 * ndimage.uniform_filter(
        disp, size=(1, 3, 3, 3), mode="nearest"))[:, folded], atol=1e-5)


def test_unfold_returns_a_fold_free_field_unchanged():
    disp = smooth_field(amplitude=1.0).astype(np.float32)
    repaired, rounds, left = _unfold(jnp.asarray(disp), UnfoldConfig(rounds=10))
    assert int(rounds) == 0 and int(left) == 0
    np.testing.assert_array_equal(np.asarray(repaired), disp)


def test_fine_and_unfold_settings_are_validated():
    with pytest.raises(ConfigError, match="fine.intensity_weight"):
        load_config("lumir", ["fine.intensity_weight=-1"])
    with pytest.raises(ConfigError, match="unfold.grow"):
        load_config("lumir", ["unfold.grow=4"])
    with pytest.raises(ConfigError, match="unfold.blend"):
        load_config("lumir", ["unfold.blend=0"])
    with pytest.raises(ConfigError, match="unfold.local_rounds"):
        load_config("lumir", ["unfold.local_rounds=-1"])
    with pytest.raises(ConfigError, match="fine.half_resolution_iterations must be >= 0"):
        load_config("lumir", ["fine.half_resolution_iterations=-1"])
    assert load_config("lumir", ["unfold.rounds=0"]).unfold.rounds == 0  # turning the repair off just works
    assert FineConfig().enabled is False and UnfoldConfig().rounds == 0  # off unless a preset asks
    baseline = load_config("convexadam-lumir")
    assert not baseline.fine.enabled and baseline.unfold.rounds == 0  # the faithful baseline stays ConvexAdam


def test_local_ncc_matches_scipy_and_its_gradient_matches_autodiff():
    """Value against scipy (trilinear map_coordinates, uniform_filter); the hand-written gradient
    against JAX autodiff of the same definition written out directly."""
    from jaxreg.ops.filters import box_filter
    from jaxreg.stages.losses import LNCC_EPSILON, fixed_window_statistics, intensity_loss
    from jaxreg.ops.warp import warp

    rng = np.random.default_rng(0)
    shape = (14, 13, 12)
    fixed = np.zeros(shape, np.float32)
    moving = np.zeros(shape, np.float32)
    fixed[2:-2, 2:-2, 2:-2] = ndimage.gaussian_filter(rng.random(shape), 1.0)[2:-2, 2:-2, 2:-2]
    moving[2:-2, 2:-2, 2:-2] = ndimage.gaussian_filter(rng.random(shape), 1.0)[2:-2, 2:-2, 2:-2]
    disp = rng.normal(0.0, 0.7, (3,) + shape).astype(np.float32)
    window = 5

    warped = ndimage.map_coordinates(moving.astype(np.float64), np.indices(shape) + disp, order=1, mode="constant")
    local = [ndimage.uniform_filter(v, window, mode="constant") for v in (fixed, warped, fixed * warped,
                                                                          fixed * fixed, warped * warped)]
    cross = local[2] - local[0] * local[1]
    cc = cross ** 2 / ((local[3] - local[0] ** 2) * (local[4] - local[1] ** 2) + LNCC_EPSILON)
    stats = fixed_window_statistics(jnp.asarray(fixed), window)
    value, grad = jax.value_and_grad(intensity_loss)(jnp.asarray(disp), jnp.asarray(moving), stats, (0.0, 1.0, window))
    assert float(cc.mean()) > 0.05
    np.testing.assert_allclose(float(value), 1.0 - cc.mean(), rtol=1e-4)

    def reference(d):
        w = warp(jnp.asarray(moving), d, "zeros")
        f = jnp.asarray(fixed)
        fm, wm, fw, ff, ww = box_filter(jnp.stack([f, w, f * w, f * f, w * w]), window)
        return 1.0 - jnp.mean((fw - fm * wm) ** 2 / ((ff - fm * fm) * (ww - wm * wm) + LNCC_EPSILON))

    ref_grad = jax.grad(reference)(jnp.asarray(disp))
    scale = float(jnp.abs(ref_grad).max())
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-3 * scale)

    # with both terms: the SSD part equals the feature level's SSD on intensities scaled by 3
    from jaxreg.stages.losses import warped_ssd
    both = jax.value_and_grad(intensity_loss)(jnp.asarray(disp), jnp.asarray(moving), stats, (9.0, 2.0, window))
    ssd = jax.value_and_grad(warped_ssd)(jnp.asarray(disp), jnp.asarray(3 * moving)[..., None], jnp.asarray(3 * fixed)[..., None])
    np.testing.assert_allclose(float(both[0]), float(ssd[0]) + 2.0 * float(value), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(ssd[1]) + 2.0 * np.asarray(grad), atol=1e-5 * scale)


def test_fine_level_needs_a_similarity_term():
    with pytest.raises(ConfigError, match="fine.ncc_weight"):
        load_config("lumir", ["fine.intensity_weight=0", "fine.ncc_weight=0"])
    with pytest.raises(ConfigError, match="fine.ncc_window"):
        load_config("lumir", ["fine.ncc_window=4"])
    assert load_config("lumir", ["fine.intensity_weight=0", "fine.ncc_weight=1"]).fine.ncc_weight == 1.0


FIXED = brain()
MASK = ndimage.binary_erosion(FIXED > 0, iterations=3)
TRUE_FORWARD = smooth_field(amplitude=2.0, sigma=2.0, seed=5)
MOVING = pull(FIXED, TRUE_FORWARD)
EXPECTED = inverse_of(TRUE_FORWARD)


def _error(disp):
    return float(np.linalg.norm(np.asarray(disp) - EXPECTED, axis=0)[MASK].mean())


def test_fine_level_recovers_detail_the_feature_grid_misses_without_folds():
    """On the one-way feature level: on this smooth phantom the symmetric one (lumir's) already comes
    closer to the truth than the one-way level with the full-resolution level after it (next test),
    leaving that level nothing to add here, while on real brains it adds the cortical detail."""
    from jaxreg.registration import register
    # the full-resolution steps alone: the half-resolution ones cost this phantom (test_accuracy.py)
    one_way = ["refine.symmetric=false", "fine.half_resolution_iterations=0"]
    without = register(FIXED, MOVING, preset="lumir", overrides=one_way + ["fine.enabled=false"])
    with_fine = register(FIXED, MOVING, preset="lumir", overrides=one_way)
    # the preset's few full-resolution steps gain a few per cent of the error here
    assert _error(with_fine.disp) < 0.97 * _error(without.disp), (_error(without.disp), _error(with_fine.disp))
    assert metrics.ndv(with_fine.disp, FIXED > 0) == 0.0
    assert with_fine.summary.folding_voxels == 0


def test_half_resolution_steps_are_the_level_on_images_pooled_by_two_in_millimetres():
    """The steps before the full-resolution ones are the same level on both images averaged over 2^3
    blocks (pooled here by numpy), from the starting field in pooled voxels, at half the learning rate
    (the same step in millimetres); their residual comes back at twice its size. Composed by hand from
    two plain levels, the program agrees to float rounding; a learning rate not halved is far off."""
    from dataclasses import replace
    from jaxreg.ops.intensity import normalise
    from jaxreg.ops.warp import resize
    from jaxreg.stages.fine import refine_fine

    level = jax.jit(refine_fine, static_argnames="config")
    fine = replace(load_config("lumir").fine, half_resolution_iterations=6, iterations=4)
    fixed, moving = normalise(jnp.asarray(FIXED)), normalise(jnp.asarray(MOVING))
    start = jnp.asarray(smooth_field(amplitude=1.0, seed=7))
    half_shape = tuple(n // 2 for n in FIXED.shape)

    def pooled(image):
        blocks = np.asarray(image).reshape(half_shape[0], 2, half_shape[1], 2, half_shape[2], 2)
        return jnp.asarray(blocks.mean(axis=(1, 3, 5)))

    def by_hand(rate_factor):
        half_start = resize(start, half_shape) / 2
        plain_half = replace(fine, half_resolution_iterations=0, iterations=6,
                             learning_rate=fine.learning_rate * rate_factor)
        half = level(pooled(fixed), pooled(moving), half_start, plain_half)
        return np.asarray(level(fixed, moving, start + 2 * resize(half - half_start, FIXED.shape),
                                replace(fine, half_resolution_iterations=0)))

    disp = np.asarray(level(fixed, moving, start, fine))
    # differently fused programs round differently and Adam amplifies it (pure JAX measured a 9e-6
    # voxel mean, 99th percentile 5e-5, a few voxels 0.02), far below what a wrong rate or scale gives
    difference = np.abs(disp - by_hand(0.5))
    assert difference.mean() < 2e-4 and np.percentile(difference, 99) < 2e-3
    assert np.abs(disp - by_hand(1.0)).mean() > 0.02  # the rate in pooled voxels would move twice as far
    plain = np.asarray(level(fixed, moving, start, replace(fine, half_resolution_iterations=0)))
    assert np.abs(disp - plain).mean() > 0.05  # the half-resolution steps do change the field


def test_half_resolution_steps_reach_a_deformation_beyond_the_full_resolution_level():
    """A smooth 8-voxel deformation from a zero start, the full-resolution level alone (the feature
    levels off): 20 steps at half resolution first (as cheap as 2.5 full-resolution steps) bring the
    field closer to the known answer, as far beyond the full-resolution LNCC boxes as it reaches, with
    no folds. (Where the feature levels have already found the answer, they cost it: test_accuracy.py.)"""
    from jaxreg.registration import register
    true_forward = smooth_field(amplitude=8.0, sigma=10.0, seed=5)
    moving = pull(FIXED, true_forward)
    expected = inverse_of(true_forward)

    def error(disp):
        return float(np.linalg.norm(np.asarray(disp) - expected, axis=0)[MASK].mean())

    full_only = ["coarse.enabled=false", "refine.enabled=false", "fine.half_resolution_iterations=0"]
    plain = register(FIXED, moving, preset="lumir", overrides=full_only)
    half = register(FIXED, moving, preset="lumir", overrides=full_only + ["fine.half_resolution_iterations=20"])
    assert error(half.disp) < 0.9 * error(plain.disp) < 0.6 * error(np.zeros_like(expected)), \
        (error(half.disp), error(plain.disp))
    assert metrics.ndv(half.disp, FIXED > 0) == 0.0 and half.summary.folding_voxels == 0


def test_symmetric_feature_level_brings_the_preset_closer_to_the_known_deformation():
    from jaxreg.registration import register
    one_way = register(FIXED, MOVING, preset="lumir", overrides=["refine.symmetric=false"])
    symmetric = register(FIXED, MOVING, preset="lumir")
    assert _error(symmetric.disp) < 0.99 * _error(one_way.disp), (_error(one_way.disp), _error(symmetric.disp))
    assert metrics.ndv(symmetric.disp, FIXED > 0) == 0.0


def test_intensity_terms_are_left_out_when_the_contrasts_disagree_and_the_summary_says_so():
    from jaxreg.registration import register
    inverted = np.where(MOVING > 0, 255.0 - MOVING, 0.0).astype(np.float32)  # a T2-like contrast
    unmatched = ["contrast.match=false"]
    same = register(FIXED, MOVING, preset="lumir", overrides=unmatched)
    other = register(FIXED, inverted, preset="lumir", overrides=unmatched)
    assert same.summary.intensity_terms_used and same.summary.contrast_ncc > 0.5
    assert not other.summary.intensity_terms_used and other.summary.contrast_ncc < 0.3
    assert "the contrasts differ; MIND-SSC alone" in other.summary.contrast_verdict()
    # left out means MIND-SSC only, as if the preset had neither intensity term
    mind_only = register(FIXED, inverted, preset="lumir", overrides=["refine.intensity_weight=0", "fine.enabled=false"])
    np.testing.assert_allclose(other.disp, mind_only.disp, atol=1e-4)
    assert mind_only.summary.contrast_ncc is None  # no intensity term, nothing to guard


def test_symmetric_program_is_the_mean_of_both_directions_refitted():
    """lumir-symmetric against the same steps composed by hand from one-way programs: forward and
    backward registrations, the mean of the forward field and the backward field's inverse, the fold
    repair, then the full-resolution level and the fold repair from that start."""
    from jaxreg import pipeline
    from jaxreg.ops.invert import invert_on_grid
    # without the half-resolution steps, whose extra Adam steps amplify the rounding further
    plain = ["fine.half_resolution_iterations=0"]
    config = load_config("lumir-symmetric", plain)
    one_way = load_config("lumir-symmetric", [*plain, "symmetric.enabled=false"])
    refit = load_config("lumir-symmetric", [*plain, "symmetric.enabled=false", "coarse.enabled=false",
                                            "refine.enabled=false"])
    fixed, moving = jnp.asarray(FIXED), jnp.asarray(MOVING)
    forward = pipeline.program(fixed, moving, None, config=one_way).disp
    backward = pipeline.program(moving, fixed, None, config=one_way).disp
    average, _, _ = jax.jit(lambda u, v: unfold(0.5 * (u + invert_on_grid(v)), config.unfold))(forward, backward)
    expected = np.asarray(pipeline.program(fixed, moving, average, config=refit).disp)
    disp = np.asarray(pipeline.program(fixed, moving, None, config=config).disp)
    assert [s.name for s in pipeline.stages(config)][-4:] == ["backward", "average", "refit", "refit-unfold"]
    difference = np.linalg.norm(disp - expected, axis=0)
    # One program against four: XLA fuses them differently, and the full-resolution level's Adam steps
    # amplify the float rounding (mean 0.0006 voxel with the C++ kernels, 0.005 on the pure JAX path);
    # a wrong mean, 0.5 * (u - v) refitted, lands 0.06 away (99th percentile 0.2)
    assert difference.mean() < 0.015 and np.percentile(difference, 99) < 0.1, (difference.mean(), difference.max())
    # and the averaging changed the field: the one-way program's result is not it
    assert np.linalg.norm(disp - np.asarray(forward), axis=0).mean() > 0.01


def test_symmetric_program_comes_closer_to_the_known_deformation_without_folds():
    """lumir-symmetric against its one-way program on the phantom: closer to the true field (0.465
    against 0.469 voxel when written) and no fold. The refit ties the field to the fixed image again,
    so it is not inverse consistent: what it buys on real brains is landmark accuracy (docs/results.md)."""
    from jaxreg.registration import register
    plain = ["fine.half_resolution_iterations=0"]  # which cost this phantom (test_accuracy.py)
    symmetric = register(FIXED, MOVING, preset="lumir-symmetric", overrides=plain).disp
    one_way = register(FIXED, MOVING, preset="lumir-symmetric", overrides=[*plain, "symmetric.enabled=false"]).disp
    assert _error(symmetric) < 0.995 * _error(one_way), (_error(symmetric), _error(one_way))
    assert metrics.ndv(np.asarray(symmetric), FIXED > 0) == 0.0
