"""jaxreg.evaluation.metrics against hand-counted answers and against independent references.

References: scipy.ndimage.map_coordinates (label warping), per-label boolean loops written from
LUMIR's definitions (Dice), LUMIR's compute_hd95 loop over the PyPI ``surface-distance`` package
(HD95; skipped when absent; the surface machinery itself is tests/test_surface.py), kernels applied
with scipy.ndimage.correlate exactly as docs/LUMIR.md describes them (NDV, SDlogJ).
"""

import logging
import math

import numpy as np
import pytest
from scipy import ndimage

from jaxreg.errors import InputError
from jaxreg.evaluation import metrics
from jaxreg.evaluation.surface import robust_hausdorff

from deepmind_surface import needs_surface_distance, surface_distance
from jacobian_reference import identity, reference_digital_jacobians


def cube_map(shape, start, size, label=1):
    out = np.zeros(shape, dtype=np.int32)
    out[tuple(slice(s, s + size) for s in start)] = label
    return out


def random_blobs(rng, shape, n_labels, sigma=2.0):
    """A random multi-label map of smooth blobs (label 0 = background)."""
    fields = np.stack([ndimage.gaussian_filter(rng.random(shape), sigma) for _ in range(n_labels)])
    labels = np.argmax(fields, axis=0).astype(np.int32)
    labels[ndimage.gaussian_filter(rng.random(shape), sigma) < 0.47] = 0
    return labels


# --------------------------------------------------------------------------------------------
# warp_labels
# --------------------------------------------------------------------------------------------

def scipy_warp(labels, disp):
    """The official evaluator's call."""
    return ndimage.map_coordinates(labels.astype(np.float64), identity(disp.shape[1:]) + disp.astype(np.float64),
                                   order=0)


def test_warp_labels_identical_to_scipy_order0_on_random_fields():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, (17, 19, 13)).astype(np.int16)
    disp = rng.normal(0, 4, (3, 17, 19, 13)).astype(np.float32)
    disp[:, ::2] = np.round(disp[:, ::2] * 2) / 2  # many exact .5 cases, positive and negative
    warped = metrics.warp_labels(labels, disp)
    assert warped.dtype == labels.dtype
    np.testing.assert_array_equal(warped, scipy_warp(labels, disp))
    assert (scipy_warp(labels, disp) == 0).sum() > 100  # the out-of-range rule is exercised


@pytest.mark.parametrize("offset", [-1.0, -0.5, -1e-300, -0.0, 0.0, 0.49999999999999994, 0.5, 1.5, 3.0,
                                    4.0, 4.0 + 1e-12, 4.4999, 4.5, 5.0])
def test_warp_labels_boundary_and_rounding_cases_match_scipy(offset):
    labels = np.arange(1, 6, dtype=np.int32).reshape(5, 1, 1) * np.ones((5, 2, 2), np.int32)
    disp = np.zeros((3, 5, 2, 2))
    disp[0, 0] = offset  # voxel 0 samples moving at x = offset
    np.testing.assert_array_equal(metrics.warp_labels(labels, disp), scipy_warp(labels, disp))


def test_warp_labels_moving_grid_may_differ_from_fixed_grid():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (9, 7, 8)).astype(np.int32)
    disp = rng.normal(0, 2, (3, 6, 10, 5))
    np.testing.assert_array_equal(metrics.warp_labels(labels, disp), scipy_warp(labels, disp))


def test_warp_labels_shift_by_one_voxel_pulls_the_neighbour():
    moving = cube_map((8, 8, 8), (2, 2, 2), 3)
    disp = np.zeros((3, 8, 8, 8))
    disp[0] = 1.0  # moved(x) = moving(x + 1): the cube moves one voxel towards 0
    np.testing.assert_array_equal(metrics.warp_labels(moving, disp), cube_map((8, 8, 8), (1, 2, 2), 3))


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------

def test_dice_identical_maps_is_one():
    rng = np.random.default_rng(2)
    labels = random_blobs(rng, (20, 20, 20), 4)
    values = metrics.dice(labels, labels, labels, [0, 1, 2, 3])
    np.testing.assert_array_equal(values, [1.0, 1.0, 1.0, 1.0])


def test_dice_one_voxel_shift_hand_counted():
    fixed = cube_map((10, 10, 10), (3, 3, 3), 4)   # 64 voxels
    warped = cube_map((10, 10, 10), (4, 3, 3), 4)  # shifted by one: overlap 3 x 4 x 4 = 48
    values = metrics.dice(fixed, warped, fixed, [0, 1])
    # background: 936 voxels each, overlap 1000 - 64 - 64 + 48 = 920
    np.testing.assert_allclose(values, [2 * 920 / (936 + 936), 2 * 48 / (64 + 64)], rtol=0, atol=1e-15)
    assert values[1] == 0.75


def test_dice_nan_rule_and_vanished_label():
    fixed = cube_map((10, 10, 10), (1, 1, 1), 3, label=1) + cube_map((10, 10, 10), (6, 6, 6), 2, label=2)
    moving = cube_map((10, 10, 10), (1, 1, 1), 3, label=1) + cube_map((10, 10, 10), (6, 6, 6), 2, label=3)
    warped = np.zeros_like(fixed)  # everything vanished
    values = metrics.dice(fixed, warped, moving, [1, 2, 3, 7])
    # 1: in fixed and moving, vanished -> 0; 2: not in moving -> NaN; 3: not in fixed -> NaN; 7: nowhere
    assert values[0] == 0.0
    assert np.isnan(values[1:]).all()
    assert metrics.nan_mean(values) == 0.0
    assert metrics.vanished_labels(fixed, warped, moving, [1, 2, 3, 7]) == [1]


def test_dice_matches_per_label_loop_written_from_the_definition():
    rng = np.random.default_rng(3)
    fixed, moving = random_blobs(rng, (24, 20, 18), 6), random_blobs(rng, (24, 20, 18), 6)
    fixed[fixed == 5] = 0  # label 5 absent from fixed
    warped = metrics.warp_labels(moving, rng.normal(0, 1.5, (3, 24, 20, 18)))
    labels = [0, 1, 2, 3, 4, 5, 6, 1000]
    expected = []
    for label in labels:
        f, w = fixed == label, warped == label
        if f.sum() == 0 or (moving == label).sum() == 0:
            expected.append(np.nan)
        else:
            expected.append(2 * (f & w).sum() / (f.sum() + w.sum()))
    np.testing.assert_array_equal(metrics.dice(fixed, warped, moving, labels), expected)


def test_dice_rejects_mismatched_grids_and_empty_label_lists():
    with pytest.raises(InputError, match="one grid"):
        metrics.dice(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), np.zeros((4, 4, 4), int), [0])
    with pytest.raises(InputError, match="label list is empty"):
        metrics.dice(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), [])


# --------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------

def test_hd95_identical_maps_is_zero():
    rng = np.random.default_rng(4)
    labels = random_blobs(rng, (20, 22, 18), 4)
    np.testing.assert_array_equal(metrics.hd95(labels, labels, labels, [0, 1, 2, 3]), [0.0] * 4)


def test_hd95_one_voxel_shift_hand_counted():
    # Cube A: voxels 3..6; B: shifted by one on axis 0. On the voxel-corner grid, A's border points
    # on its face x=3 (25 points) and the 9 inner points of its face x=7 are 1 away from B's surface,
    # the other 64 lie on B's side faces (distance 0). Those 34 points carry 27.35 of A's 81.19 mm²
    # of surface (> 5 %), so the 95th percentile is 1, and so is the maximum.
    # Background 0 also has the six faces of the 12^3 volume as surface (~914 mm², distance 0):
    # the same 27.35 mm² at distance 1 are under 5 % of it, so its HD95 is 0 and its maximum 1.
    fixed = cube_map((12, 12, 12), (3, 3, 3), 4)
    warped = cube_map((12, 12, 12), (4, 3, 3), 4)
    np.testing.assert_array_equal(metrics.hd95(fixed, warped, fixed, [0, 1]), [0.0, 1.0])
    assert robust_hausdorff(fixed == 1, warped == 1, percent=100) == 1.0
    assert robust_hausdorff(fixed == 0, warped == 0, percent=100) == 1.0
    assert robust_hausdorff(fixed == 0, warped == 0, percent=97) == 1.0  # 27.35 / ~995 = 2.7 %


def test_hd95_percentile_ignores_a_small_far_outlier_but_the_maximum_does_not():
    fixed = cube_map((30, 30, 30), (5, 5, 5), 15)
    warped = fixed.copy()
    warped[26, 26, 26] = 1  # one stray voxel 11 voxels beyond the cube's corner
    assert metrics.hd95(fixed, warped, fixed, [1])[0] == 0.0
    assert robust_hausdorff(fixed == 1, warped == 1, percent=100) == pytest.approx(math.sqrt(3 * 7**2))


def test_hd95_vanished_label_is_inf_reported_and_logged(caplog):
    fixed = cube_map((10, 10, 10), (2, 2, 2), 3, label=1) + cube_map((10, 10, 10), (6, 6, 6), 2, label=2)
    moving = fixed.copy()
    warped = cube_map((10, 10, 10), (2, 2, 2), 3, label=1)  # label 2 vanished
    with caplog.at_level(logging.WARNING, logger="jaxreg.evaluation.metrics"):
        values = metrics.hd95(fixed, warped, moving, [0, 1, 2, 5])
    assert values[1] == 0.0 and np.isposinf(values[2]) and np.isnan(values[3])
    assert np.isposinf(metrics.nan_mean(values))
    assert metrics.vanished_labels(fixed, warped, moving, [0, 1, 2, 5]) == [2]
    assert "[2]" in caplog.text and "vanished" in caplog.text


@needs_surface_distance
def test_hd95_per_label_equals_lumir_compute_hd95_with_deepmind():
    rng = np.random.default_rng(6)
    fixed, moving = random_blobs(rng, (26, 24, 20), 6), random_blobs(rng, (26, 24, 20), 6)
    warped = metrics.warp_labels(moving, rng.normal(0, 1.0, (3, 26, 24, 20)))
    labels = [0, 1, 2, 3, 4, 5]
    expected = []
    for label in labels:  # LUMIR's compute_hd95 loop
        f, w = fixed == label, warped == label
        if f.sum() == 0 or (moving == label).sum() == 0:
            expected.append(np.nan)
        else:
            expected.append(surface_distance.compute_robust_hausdorff(
                surface_distance.compute_surface_distances(f, w, np.ones(3)), 95.0))
    assert not np.isnan(expected).all()
    np.testing.assert_array_equal(metrics.hd95(fixed, warped, moving, labels), expected)


# --------------------------------------------------------------------------------------------
# TRE
# --------------------------------------------------------------------------------------------

def landmark_volume(shape, points):
    vol = np.zeros(shape, dtype=np.uint8)
    for value, p in points.items():
        vol[tuple(p)] = value
    return vol


def test_tre_landmark_volumes_known_vector_and_its_compensation():
    fixed_pts = {1: (5, 6, 7), 2: (10, 4, 9), 3: (12, 12, 3)}
    shift = np.array([2, -1, 3])
    fixed = landmark_volume((20, 18, 16), fixed_pts)
    moving = landmark_volume((20, 18, 16), {k: np.array(p) + shift for k, p in fixed_pts.items()})
    zero = metrics.tre_landmark_volumes(fixed, moving, np.zeros((3, 20, 18, 16)))
    np.testing.assert_allclose(zero.distances, [math.sqrt(14)] * 3, rtol=1e-15)
    assert zero.mean == pytest.approx(math.sqrt(14)) and zero.vanished == ()
    np.testing.assert_array_equal(zero.landmarks, [1, 2, 3])
    compensating = np.broadcast_to(shift.reshape(3, 1, 1, 1), (3, 20, 18, 16)).astype(np.float32)
    assert metrics.tre_landmark_volumes(fixed, moving, compensating).mean == 0.0


def test_tre_landmark_volumes_uses_centroids_of_multi_voxel_landmarks():
    fixed = landmark_volume((10, 10, 10), {1: (4, 4, 4)})
    moving = landmark_volume((10, 10, 10), {1: (4, 4, 4)})
    moving[4, 4, 6] = 1  # two voxels: centroid (4, 4, 5)
    assert metrics.tre_landmark_volumes(fixed, moving, np.zeros((3, 10, 10, 10))).mean == 1.0


def test_tre_landmark_volumes_vanished_landmark_makes_the_pair_nan(caplog):
    fixed = landmark_volume((12, 12, 12), {1: (3, 3, 3), 2: (8, 8, 8)})
    moving = fixed.copy()
    disp = np.zeros((3, 12, 12, 12))
    disp[:, 8, 8, 8] = 1.0  # voxel (8,8,8) now samples (9,9,9): landmark 2 is lost
    with caplog.at_level(logging.WARNING, logger="jaxreg.evaluation.metrics"):
        tre = metrics.tre_landmark_volumes(fixed, moving, disp)
    assert tre.vanished == (2,) and math.isnan(tre.mean) and tre.distances[0] == 0.0
    assert "[2]" in caplog.text


def test_tre_keypoints_known_vector():
    fixed = np.array([[5.2, 6.0, 7.5], [10.0, 4.3, 9.0], [8.0, 8.0, 8.0]])
    u = np.array([1.0, 2.0, 2.0])
    disp = np.broadcast_to(u.reshape(3, 1, 1, 1), (3, 16, 16, 16)).copy()
    np.testing.assert_allclose(metrics.tre_keypoints(fixed, fixed + u, disp), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.tre_keypoints(fixed, fixed, disp), 3.0, rtol=1e-12)


def test_tre_keypoints_order_3_is_learn2reg_compute_tre_and_order_1_is_linear():
    rng = np.random.default_rng(7)
    disp = ndimage.gaussian_filter(rng.normal(0, 3, (3, 20, 20, 20)), (0, 2, 2, 2))
    fixed = rng.uniform(3, 16, (12, 3))
    moving = rng.uniform(3, 16, (12, 3))
    # Learn2Reg's compute_tre: scipy's default map_coordinates (cubic spline) per channel
    sampled = np.stack([ndimage.map_coordinates(disp[c], fixed.T) for c in range(3)], axis=1)
    np.testing.assert_allclose(metrics.tre_keypoints(fixed, moving, disp, order=3),
                               np.linalg.norm(fixed + sampled - moving, axis=1), rtol=1e-12)
    # linear: at a voxel centre it is the field itself; midway it is the mean of the two neighbours
    point = np.array([[4.0, 5.0, 6.5]])
    expected_u = 0.5 * (disp[:, 4, 5, 6] + disp[:, 4, 5, 7])
    np.testing.assert_allclose(metrics.tre_keypoints(point, point, disp, order=1), np.linalg.norm(expected_u))


def test_tre_keypoints_rejects_mismatched_point_sets():
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        metrics.tre_keypoints(np.zeros((3, 3)), np.zeros((2, 3)), np.zeros((3, 5, 5, 5)))


# --------------------------------------------------------------------------------------------
# NDV and SDlogJ
# --------------------------------------------------------------------------------------------

def test_reference_determinants_are_one_and_two_on_the_identity():
    dets = reference_digital_jacobians(np.zeros((3, 5, 5, 5)))
    assert [float(np.unique(d)[0]) for d in dets] == [1.0] * 8 + [2.0, 2.0]


def test_ndv_zero_field_and_rigid_rotation_are_zero():
    shape = (12, 14, 10)
    mask = np.ones(shape, bool)
    assert metrics.ndv(np.zeros((3, *shape)), mask) == 0.0
    angle = 0.3
    grid = identity(shape) - np.array([6.0, 7.0, 5.0]).reshape(3, 1, 1, 1)
    rotated = np.stack([np.cos(angle) * grid[0] - np.sin(angle) * grid[1],
                        np.sin(angle) * grid[0] + np.cos(angle) * grid[1], grid[2]])
    assert metrics.ndv(rotated - grid, mask) == 0.0


def test_ndv_hand_computed_fold():
    # phi_0 = x except on the plane x=5, pulled back to 3: a fold. Per (y, z) column the forward
    # difference at x=4 and the backward one at x=5 are -1; there the 8 one-sided determinants
    # are -1 and the two diagonal ones -2, so each of these voxels has 0.5*(8*1 + 2*2)/12 = 0.5.
    shape = (10, 6, 7)
    disp = np.zeros((3, *shape))
    disp[0, 5] = -2.0
    volume = metrics.non_diffeomorphic_volume_map(disp)
    expected = np.zeros(shape)
    expected[4:6, 1:-1, 1:-1] = 0.5
    np.testing.assert_array_equal(volume, expected)
    # 20 interior (y, z) columns x 1 voxel of folded volume over 8 x 4 x 5 = 160 interior voxels
    assert metrics.ndv(disp, np.ones(shape, bool)) == 12.5
    mask = np.zeros(shape, bool)
    mask[3:5] = True  # rows 3 and 4: 40 voxels, 10 of folded volume
    assert metrics.ndv(disp, mask) == 25.0
    np.testing.assert_array_equal(metrics.non_diffeomorphic_volume_map(disp, mask), expected * mask)


def test_ndv_matches_the_kernel_definition_on_random_fields():
    rng = np.random.default_rng(8)
    disp = rng.normal(0, 0.7, (3, 14, 12, 11)).astype(np.float32)
    reference = sum(0.5 * np.maximum(0, -d) / 6 for d in reference_digital_jacobians(disp))
    volume = metrics.non_diffeomorphic_volume_map(disp)
    np.testing.assert_allclose(volume[1:-1, 1:-1, 1:-1], reference, rtol=1e-12, atol=1e-15)
    mask = rng.random(disp.shape[1:]) > 0.4
    inner = mask[1:-1, 1:-1, 1:-1]
    assert reference.sum() > 1
    assert metrics.ndv(disp, mask) == pytest.approx(100 * (reference * inner).sum() / inner.sum(), rel=1e-12)
    box = np.zeros(disp.shape[1:], bool)
    box[3:9, 2:7, 4:10] = mask[3:9, 2:7, 4:10]  # a mask computed on its bounding box only
    np.testing.assert_array_equal(metrics.non_diffeomorphic_volume_map(disp, box), volume * box)


def test_ndv_in_slabs_equals_one_block(monkeypatch):
    rng = np.random.default_rng(9)
    disp = rng.normal(0, 0.7, (3, 9, 8, 7))
    whole = metrics.non_diffeomorphic_volume_map(disp)
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 1)  # one row per slab
    np.testing.assert_array_equal(metrics.non_diffeomorphic_volume_map(disp), whole)


def test_ndv_empty_mask_is_nan_and_wrong_mask_shape_is_an_error():
    assert math.isnan(metrics.ndv(np.zeros((3, 5, 5, 5)), np.zeros((5, 5, 5), bool)))
    with pytest.raises(InputError, match="mask"):
        metrics.ndv(np.zeros((3, 5, 5, 5)), np.ones((5, 5, 4), bool))


def reference_sdlogj(disp):
    """Learn2Reg's definition as LUMIR.md states it: central differences with zero padding, [2:-2], +3."""
    d = disp.astype(np.float64)
    k = np.array([-0.5, 0.0, 0.5])
    grads = [[ndimage.correlate(d[c], k.reshape(s), mode="constant", cval=0.0) for c in range(3)]
             for s in ((3, 1, 1), (1, 3, 1), (1, 1, 3))]
    jac = np.array(grads) + np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    det = (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
           - jac[1, 0] * (jac[0, 1] * jac[2, 2] - jac[0, 2] * jac[2, 1])
           + jac[2, 0] * (jac[0, 1] * jac[1, 2] - jac[0, 2] * jac[1, 1]))
    return np.log(np.clip(det + 3, 1e-9, 1e9)).std()


def test_sdlogj_zero_field_is_zero():
    # With the +3 quirk the identity gives log(1 + 3) = log 4 everywhere: a std of 0.
    assert abs(metrics.sdlogj(np.zeros((3, 12, 11, 10)))) < 1e-12


def test_sdlogj_quadratic_field_hand_computed_with_the_plus_3_quirk():
    # u_0 = a x^2: central differences are exact, J = 1 + 2 a x, the same on every (y, z).
    a = 0.02
    shape = (16, 9, 8)
    disp = np.zeros((3, *shape))
    disp[0] = a * identity(shape)[0] ** 2
    x = np.arange(2, shape[0] - 2)
    expected = np.std(np.log(1 + 2 * a * x + 3))
    assert metrics.sdlogj(disp) == pytest.approx(expected, rel=1e-12)
    assert not math.isclose(expected, np.std(np.log(1 + 2 * a * x)), rel_tol=0.1)  # the +3 matters


def test_sdlogj_matches_the_kernel_definition_on_random_fields_and_float32_input():
    rng = np.random.default_rng(10)
    disp = rng.normal(0, 0.6, (3, 13, 12, 11)).astype(np.float32)
    assert metrics.sdlogj(disp) == reference_sdlogj(disp)


def test_sdlogj_mask_selects_the_interior_voxels():
    rng = np.random.default_rng(11)
    disp = rng.normal(0, 0.3, (3, 10, 9, 8))
    mask = np.zeros((10, 9, 8), bool)
    mask[:5] = True
    full = metrics.sdlogj(disp)
    masked = metrics.sdlogj(disp, mask)
    assert masked != full and np.isfinite(masked)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def test_nan_mean_and_image_mask():
    assert math.isnan(metrics.nan_mean([np.nan, np.nan]))
    assert metrics.nan_mean([1.0, np.nan, 3.0]) == 2.0
    assert np.isposinf(metrics.nan_mean([1.0, np.inf]))
    np.testing.assert_array_equal(metrics.image_mask(np.array([0.0, 0.5, 3.0])), [False, True, True])


def test_bad_displacement_shape_is_a_one_line_input_error():
    with pytest.raises(InputError, match=r"expected \(3, X, Y, Z\)"):
        metrics.warp_labels(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4, 3)))
