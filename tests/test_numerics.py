"""Array ops against independent references (scipy, PyTorch formulas written out, hand counts)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import jaxreg  # noqa: F401  (sets XLA flags before jax compiles anything)
from jaxreg.stages.features import mind_pairs, mind_ssc, mind_ssc_pooled
from jaxreg.ops.filters import avg_pool, box_filter, forward_difference
from jaxreg.ops.warp import compose_affine, resize, sample, warp, warp_field

RNG = np.random.default_rng(0)


def test_box_filter_zero_padding_matches_scipy_uniform_filter_with_zero_border():
    x = RNG.random((2, 7, 8, 9)).astype(np.float32)
    expected = ndimage.uniform_filter(x, size=(1, 3, 3, 3), mode="constant", cval=0.0)
    np.testing.assert_allclose(box_filter(jnp.asarray(x), 3), expected, atol=1e-6)


def test_box_filter_edge_mode_matches_scipy_nearest():
    x = RNG.random((6, 7, 5)).astype(np.float32)
    expected = ndimage.uniform_filter(x, size=5, mode="nearest")
    np.testing.assert_allclose(box_filter(jnp.asarray(x), 5, mode="edge"), expected, atol=1e-6)


@pytest.mark.parametrize("mode, scipy_mode", [("zeros", "constant"), ("edge", "nearest")])
def test_box_filter_on_some_axes_of_a_stack_matches_scipy(mode, scipy_mode):
    # the filter pads all its axes at once, then sums: the result must equal axis-by-axis filtering
    x = RNG.random((3, 6, 7, 8)).astype(np.float32)
    expected = ndimage.uniform_filter(x, size=(1, 1, 5, 5), mode=scipy_mode, cval=0.0)
    np.testing.assert_allclose(box_filter(jnp.asarray(x), 5, axes=(-2, -1), mode=mode), expected, atol=1e-6)


def test_avg_pool_drops_incomplete_blocks_like_pytorch():
    x = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out = np.asarray(avg_pool(jnp.asarray(x), 2))
    assert out.shape == (2, 2, 1)
    np.testing.assert_allclose(out[1, 0, 0], x[2:4, 0:2, 0:2].mean())


def test_forward_difference():
    x = jnp.asarray([[[1.0, 4.0, 9.0]]])
    np.testing.assert_allclose(forward_difference(x, -1), [[[3.0, 5.0]]])


@pytest.mark.parametrize("mode,scipy_mode", [("border", "nearest"), ("constant", "constant")])
def test_trilinear_warp_matches_scipy_map_coordinates(mode, scipy_mode):
    volume = RNG.random((9, 10, 11)).astype(np.float32)
    disp = (RNG.standard_normal((3, 9, 10, 11)) * 2.5).astype(np.float32)
    expected = ndimage.map_coordinates(volume, np.indices(volume.shape) + disp, order=1, mode=scipy_mode)
    got = jax.jit(lambda v, d: warp(v, d, mode))(jnp.asarray(volume), jnp.asarray(disp))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_zeros_mode_interpolates_towards_zero_outside_like_grid_sample():
    volume = np.ones((4, 4, 4), np.float32)
    coords = jnp.asarray([[-0.25], [1.0], [1.0]])  # a quarter voxel outside along axis 0
    np.testing.assert_allclose(sample(jnp.asarray(volume), coords, "zeros"), [0.75], atol=1e-6)
    np.testing.assert_allclose(sample(jnp.asarray(volume), coords, "border"), [1.0], atol=1e-6)


def test_channels_last_warp_equals_per_channel_warp():
    volume = RNG.random((6, 7, 8, 3)).astype(np.float32)
    disp = (RNG.standard_normal((3, 6, 7, 8))).astype(np.float32)
    together = warp(jnp.asarray(volume), jnp.asarray(disp), "zeros")
    for c in range(3):
        np.testing.assert_allclose(together[..., c], warp(jnp.asarray(volume[..., c]), jnp.asarray(disp), "zeros"),
                                   atol=1e-6)


def _torch_linear_resize_1d(x, n_out):
    """PyTorch interpolate(mode='linear', align_corners=False) written out for one axis."""
    n_in = len(x)
    out = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        low = min(int(np.floor(src)), n_in - 1)
        high = min(low + 1, n_in - 1)
        t = src - low
        out.append(x[low] * (1 - t) + x[high] * t)
    return np.array(out)


@pytest.mark.parametrize("n_in,n_out", [(5, 10), (10, 5), (7, 16), (26, 160)])
def test_resize_matches_pytorch_trilinear_formula(n_in, n_out):
    x = RNG.random((n_in, 3, 2)).astype(np.float32)
    got = np.asarray(resize(jnp.asarray(x), (n_out, 3, 2)))
    expected = np.stack([[_torch_linear_resize_1d(x[:, j, k], n_out) for k in range(2)] for j in range(3)])
    np.testing.assert_allclose(got, np.moveaxis(expected, -1, 0), atol=1e-6)


def test_half_resolution_resize_is_pair_average():
    x = RNG.random((8, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(resize(jnp.asarray(x), (4, 3, 2)), avg_pool(jnp.asarray(x), 2), atol=1e-6)


def test_warp_field_composes_two_translations():
    shape = (6, 6, 6)
    first = np.broadcast_to(np.array([1.0, 0.0, 0.0], np.float32).reshape(3, 1, 1, 1), (3,) + shape)
    second = np.broadcast_to(np.array([0.0, 2.0, 0.0], np.float32).reshape(3, 1, 1, 1), (3,) + shape)
    composed = first + warp_field(jnp.asarray(second), jnp.asarray(first), "border")
    np.testing.assert_allclose(composed[:, 2, 2, 2], [1.0, 2.0, 0.0], atol=1e-6)


def test_compose_affine_with_zero_displacement_is_the_affine():
    matrix = np.array([[1.1, 0.0, 0.0, 2.0], [0.0, 0.9, 0.1, -1.0], [0.0, 0.0, 1.0, 0.5]], np.float32)
    disp = compose_affine(jnp.asarray(matrix), jnp.zeros((3, 4, 5, 6)))
    x = np.array([3.0, 2.0, 1.0])
    np.testing.assert_allclose(disp[:, 3, 2, 1], matrix[:, :3] @ x + matrix[:, 3] - x, atol=1e-5)


def _mind_reference(image, radius, dilation):
    """MIND-SSC by explicit loops over voxels (edge replication), independent of the JAX code."""
    padded = np.pad(image, dilation + radius, mode="edge")
    p = dilation + radius
    shape = image.shape
    pairs = mind_pairs(dilation)
    ssd = np.zeros((12,) + shape)
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=3))
    for c, (a, b) in enumerate(pairs):
        for x, y, z in np.ndindex(shape):
            total = 0.0
            for o in offsets:
                # the patch is replicated at the border of the difference image, as ConvexAdam pads twice
                q = [min(max(v + ov, 0), n - 1) for v, ov, n in zip((x, y, z), o, shape)]
                va = padded[q[0] + a[0] + p, q[1] + a[1] + p, q[2] + a[2] + p]
                vb = padded[q[0] + b[0] + p, q[1] + b[1] + p, q[2] + b[2] + p]
                total += (va - vb) ** 2
            ssd[c, x, y, z] = total / len(offsets)
    mind = ssd - ssd.min(0, keepdims=True)
    var = mind.mean(0, keepdims=True)
    var = np.clip(var, var.mean() * 1e-3, var.mean() * 1e3)
    return np.exp(-mind / var)


def test_mind_ssc_matches_loop_reference():
    image = ndimage.gaussian_filter(RNG.random((6, 7, 5)), 0.8).astype(np.float32)
    got = np.asarray(mind_ssc(jnp.asarray(image), radius=1, dilation=2))
    np.testing.assert_allclose(got, _mind_reference(image.astype(np.float64), 1, 2), rtol=2e-4, atol=1e-5)


def test_mind_ssc_hand_checkable_step_edge():
    """A step edge along axis 0: channels comparing voxels on the two sides of the edge differ,
    the others are equal; the descriptor is 1 where the SSD is minimal."""
    image = np.zeros((8, 6, 6), np.float32)
    image[4:] = 1.0
    mind = np.asarray(mind_ssc(jnp.asarray(image), radius=1, dilation=1))
    assert mind.shape == (12, 8, 6, 6)
    assert np.all(mind <= 1.0) and np.all(mind > 0.0)
    # far from the edge every SSD is zero -> every channel is exp(0) = 1
    np.testing.assert_allclose(mind[:, 0, 3, 3], 1.0)
    # at the edge, pairs whose two offsets straddle the edge along axis 0 are the dissimilar ones
    pairs = mind_pairs(1)
    straddle = [c for c, (a, b) in enumerate(pairs) if a[0] != b[0]]
    same = [c for c in range(12) if c not in straddle]
    assert np.all(mind[straddle, 3, 3, 3] < mind[same, 3, 3, 3].min())


def test_mind_ssc_of_constant_image_is_finite():
    mind = np.asarray(mind_ssc(jnp.ones((6, 6, 6)), 1, 2))
    assert np.all(np.isfinite(mind))


@pytest.mark.parametrize("shape,factor,slab", [((21, 10, 12), 2, 4), ((20, 9, 8), 1, 6), ((23, 12, 10), 3, 6)])
def test_slab_wise_pooled_mind_equals_pooled_full_mind(shape, factor, slab):
    image = jnp.asarray(RNG.random(shape, dtype=np.float32))
    expected = avg_pool(mind_ssc(image, 1, 2), factor)
    np.testing.assert_allclose(mind_ssc_pooled(image, 1, 2, factor, slab), expected, atol=2e-6)
