"""The C++ trilinear kernel computes what the JAX path computes, and jaxreg runs without it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import jaxreg  # noqa: F401
from jaxreg.ops.native import kernels as cpu_kernels
from jaxreg.stages.features import mind_ssc, mind_ssc_pooled
from jaxreg.ops.filters import _box_filter_jax, avg_pool, box_filter
from jaxreg.stages.refine import (ADAM, _box_adam_update, _fold_penalty_and_gradient_jax, _lncc_and_derivative,
                           _lncc_and_derivative_jax, _sample_with_slopes, _ssd_and_gradient_jax,
                           fixed_window_statistics)
from jaxreg.config import UnfoldConfig
from jaxreg.stages.unfold import _fold_mask_jax, _unfold_jax, unfold
from jaxreg.ops.warp import _warp_channels_jax, warp, warp_field
from jaxreg.stages.coarse import _coupled_argmin_jax, _squared_differences, search_offsets

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=(
    "the CPU kernel is not built here (no C++ compiler, or JAXREG_NATIVE=0): jaxreg runs its JAX path"))


def _both_paths(disp, volume):
    native = jax.jit(cpu_kernels._native_trilinear)(disp, volume)
    reference = jax.jit(_sample_with_slopes)(disp, volume)
    return [np.asarray(native[0])] + [np.asarray(s) for s in native[1]], \
        [np.asarray(reference[0])] + [np.asarray(s) for s in reference[1]]


@needs_kernel
def test_kernel_matches_the_jax_path_inside_across_and_far_outside_the_grid():
    volume_shape = (6, 5, 8)  # one channel: several go through jaxreg_warped_ssd, tested below
    rng = np.random.default_rng(0)
    # the displacement grid differs from the volume's: the refinement samples cell grids too
    disp = jnp.asarray(rng.normal(0, 3, (3, 5, 6, 7)), jnp.float32)
    disp = disp.at[:, 0, 0, :].set(1e20).at[:, 1, 0, :].set(-7.5)  # far outside, just outside
    volume = jnp.asarray(rng.random(volume_shape), jnp.float32)
    native, reference = _both_paths(disp, volume)
    for name, a, b in zip(["value", "d/dx", "d/dy", "d/dz"], native, reference):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=3e-7, err_msg=name)
    assert np.all(native[0][0, 0] == 0.0)


@needs_kernel
def test_kernel_values_match_scipy_and_slopes_match_finite_differences():
    rng = np.random.default_rng(1)
    volume = rng.random((9, 10, 11)).astype(np.float32)
    shape = (4, 5, 6)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    disp = rng.uniform(0.2, 3.7, (3,) + shape).astype(np.float32)  # stays inside [0, n-1]
    value, slopes = jax.jit(cpu_kernels._native_trilinear)(jnp.asarray(disp), jnp.asarray(volume))
    expected = ndimage.map_coordinates(volume.astype(np.float64), grid + disp, order=1)
    np.testing.assert_allclose(value, expected, atol=1e-6)
    for axis in range(3):
        step = np.zeros((3, 1, 1, 1)); step[axis] = 1e-3
        central = (ndimage.map_coordinates(volume.astype(np.float64), grid + disp + step, order=1)
                   - ndimage.map_coordinates(volume.astype(np.float64), grid + disp - step, order=1)) / 2e-3
        np.testing.assert_allclose(slopes[axis], central, atol=2e-3, err_msg=f"axis {axis}")


@needs_kernel
def test_kernel_gives_nan_for_a_non_finite_displacement_and_runs_under_vmap():
    disp = jnp.zeros((3, 3, 3, 3), jnp.float32).at[1, 1, 1, 1].set(jnp.nan)
    volume = jnp.arange(27.0, dtype=jnp.float32).reshape(3, 3, 3)
    value, _ = jax.jit(cpu_kernels._native_trilinear)(disp, volume)
    assert np.isnan(value[1, 1, 1]) and np.isnan(_sample_with_slopes(disp, volume)[0][1, 1, 1])
    assert np.count_nonzero(np.isnan(value)) == 1
    batch = jnp.stack([jnp.zeros((3, 3, 3, 3)), jnp.ones((3, 3, 3, 3))])
    values, _ = jax.jit(jax.vmap(cpu_kernels._native_trilinear, in_axes=(0, None)))(batch, volume)
    np.testing.assert_array_equal(values[0], volume)
    np.testing.assert_allclose(values[1, :2, :2, :2], volume[1:, 1:, 1:])


@needs_kernel
@pytest.mark.parametrize("channels", [1, 13])
def test_warped_ssd_kernel_matches_the_jax_path(channels):
    rng = np.random.default_rng(7)
    moving = jnp.asarray(rng.random((6, 5, 8, channels)), jnp.float32)
    fixed = jnp.asarray(rng.random((5, 6, 7, channels)), jnp.float32)
    disp = jnp.asarray(rng.normal(0, 3, (3, 5, 6, 7)), jnp.float32).at[:, 0, 0, :].set(1e20)
    native = jax.jit(cpu_kernels._native_warped_ssd)(disp, moving, fixed)
    reference = jax.jit(_ssd_and_gradient_jax)(disp, moving, fixed)
    np.testing.assert_allclose(native[0], reference[0], rtol=1e-5)  # float32 sums in another order
    np.testing.assert_allclose(native[1], reference[1], atol=1e-7)
    nan_disp = disp.at[1, 2, 2, 2].set(jnp.nan)
    assert np.isnan(jax.jit(cpu_kernels._native_warped_ssd)(nan_disp, moving, fixed)[0])


@needs_kernel
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_fold_kernel_matches_the_jax_path(margin):
    rng = np.random.default_rng(2)
    # folds at many voxels (det J < margin), including on the first and last slabs of every axis
    disp = jnp.asarray(rng.normal(0, 0.6, (3, 6, 7, 8)), jnp.float32)
    native = jax.jit(lambda d: cpu_kernels._native_fold(d, margin))(disp)
    reference = jax.jit(lambda d: _fold_penalty_and_gradient_jax(d, margin))(disp)
    assert float(reference[0]) > 0.01 and np.count_nonzero(reference[1]) > 100
    np.testing.assert_allclose(native[0], reference[0], rtol=1e-6)
    np.testing.assert_allclose(native[1], reference[1], atol=1e-7)
    smooth = jnp.zeros((3, 6, 7, 8)) + 0.01 * jnp.arange(8.0)  # det J = 1.01 everywhere
    value, gradient = jax.jit(lambda d: cpu_kernels._native_fold(d, margin))(smooth)
    assert float(value) == 0.0 and not np.any(gradient)


@needs_kernel
@pytest.mark.parametrize("mode, scipy_mode", [("zeros", "constant"), ("edge", "nearest")])
@pytest.mark.parametrize("size, axes", [(3, (-3, -2, -1)), (5, (-3, -2, -1)), (7, (-3,)), (5, (-2, -1))])
def test_box_kernel_matches_scipy_across_task_boundaries_and_narrow_axes(mode, scipy_mode, size, axes):
    # 37 planes span three of the kernel's 16-plane tasks; an axis of 3 is narrower than the window
    x = np.random.default_rng(4).random((2, 37, 3, 9)).astype(np.float32)
    widths = [1] + [size if a - 4 in axes else 1 for a in range(1, 4)]
    expected = ndimage.uniform_filter(x.astype(np.float64), size=widths, mode=scipy_mode, cval=0.0)
    got = jax.jit(lambda v: cpu_kernels.box_average(v, size, axes, mode == "edge"))(jnp.asarray(x))
    np.testing.assert_allclose(got, expected, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("mode", ["zeros", "edge"])
def test_box_filter_gradient_through_the_kernel_matches_autodiff_of_the_jax_path(mode):
    x = jnp.asarray(np.random.default_rng(5).random((3, 6, 7, 8)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(6).random((3, 6, 7, 8)), jnp.float32)
    def loss(filter_):
        return lambda v: jnp.sum(weights * filter_(filter_(v)) ** 2)
    native = jax.jit(jax.grad(loss(lambda v: box_filter(v, 3, mode=mode))))(x)
    reference = jax.jit(jax.grad(loss(lambda v: _box_filter_jax(v, 3, (1, 2, 3), mode))))(x)
    program = jax.jit(jax.grad(loss(lambda v: box_filter(v, 3, mode=mode)))).lower(x).as_text()
    assert program.count("jaxreg_box") >= (4 if mode == "zeros" else 2)
    np.testing.assert_allclose(native, reference, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fold_mask_kernel_marks_the_same_voxels_as_the_jax_path():
    rng = np.random.default_rng(8)
    disp = jnp.asarray(rng.normal(0, 0.35, (3, 12, 13, 14)), jnp.float32)  # folds at some voxels
    native = np.asarray(jax.jit(cpu_kernels._native_fold_mask)(disp))
    reference = np.asarray(jax.jit(_fold_mask_jax)(disp))
    assert native.dtype == bool and 20 < reference.sum() < reference.size // 2
    np.testing.assert_array_equal(native, reference)
    assert not np.any(np.asarray(jax.jit(cpu_kernels._native_fold_mask)(jnp.zeros((3, 5, 6, 7)))))


@needs_kernel
def test_cost_volume_kernel_matches_the_jax_path_and_a_hand_computed_cell():
    rng = np.random.default_rng(10)
    fixed = jnp.asarray(rng.random((4, 5, 6, 7)), jnp.float32)
    moving = jnp.asarray(rng.random((4, 5, 6, 7)), jnp.float32)
    offsets = jnp.asarray(search_offsets(2))
    native = np.asarray(jax.jit(cpu_kernels._native_cost_volume)(fixed, moving, offsets))
    reference = np.asarray(jax.jit(lambda f, m, o: _squared_differences(f, m, o, 2))(fixed, moving, offsets))
    np.testing.assert_allclose(native, reference, rtol=1e-6)
    i = int(np.flatnonzero((np.asarray(offsets) == (1, -2, 2)).all(axis=1))[0])
    f, m = np.asarray(fixed, np.float64), np.asarray(moving, np.float64)
    np.testing.assert_allclose(native[i, 3, 4, 2], ((f[:, 3, 4, 2] - m[:, 4, 2, 4]) ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(native[i, 4, 4, 2], (f[:, 4, 4, 2] ** 2).sum(), rtol=1e-6)  # x + 1 outside


@needs_kernel
@pytest.mark.parametrize("weight", [None, 0.3])
def test_coupled_argmin_kernel_picks_the_same_candidates_ties_included(weight):
    rng = np.random.default_rng(9)
    offsets = jnp.asarray(search_offsets(1), jnp.float32)
    # a coarse cost grid leaves many exact ties, which must go to the first index as in the JAX loop
    cost = jnp.asarray(rng.integers(0, 4, (27, 5, 6, 37)), jnp.float32).at[:, 0, 0, 0].set(jnp.nan)
    centre = None if weight is None else jnp.asarray(rng.normal(0, 1, (3, 5, 6, 37)), jnp.float32)
    native = jax.jit(lambda c, m: cpu_kernels.coupled_argmin(c, offsets, m, weight or 0.0, _coupled_argmin_jax))(cost, centre)
    reference = jax.jit(lambda c, m: _coupled_argmin_jax(c, offsets, m, weight or 0.0))(cost, centre)
    assert native.dtype == jnp.int32 and int(native[0, 0, 0]) == 0  # all NaN: the first candidate
    np.testing.assert_array_equal(native, reference)
    assert len(np.unique(np.asarray(native))) > 5


@needs_kernel
@pytest.mark.parametrize("rounds, local_rounds, grow, blend", [
    (80, 10, 3, 0.3),  # lumir's: runs until no voxel folds
    (4, 2, 5, 0.5),  # stops with folds left, after both kinds of round
    (3, 0, 1, 0.3),  # no local rounds
    (0, 10, 3, 0.3),  # no round at all: the field as it came, its folds counted
])
def test_unfold_kernel_runs_the_same_rounds_as_the_jax_path(monkeypatch, rounds, local_rounds, grow, blend):
    rng = np.random.default_rng(12)
    disp = jnp.asarray(rng.normal(0, 0.4, (3, 14, 15, 16)), jnp.float32)  # folds all over
    config = UnfoldConfig(rounds=rounds, local_rounds=local_rounds, grow=grow, blend=blend)
    field, done, left = jax.jit(lambda d: unfold(d, config))(disp)
    assert "jaxreg_unfold" in jax.jit(lambda d: unfold(d, config)).lower(disp).as_text()
    monkeypatch.setattr(cpu_kernels, "_state", {"ready": False})  # the reference: XLA code throughout
    reference = jax.jit(lambda d: _unfold_jax(d, config))(disp)
    assert "jaxreg_" not in jax.jit(lambda d: _unfold_jax(d, config)).lower(disp).as_text()
    assert (int(done), int(left)) == (int(reference[1]), int(reference[2]))
    assert int(jnp.sum(_fold_mask_jax(field))) == int(left)
    np.testing.assert_allclose(field, reference[0], rtol=0, atol=1e-6)
    if rounds == 0:
        np.testing.assert_array_equal(field, disp)
        assert int(left) > 100
    elif rounds == 80:
        assert int(left) == 0 and 10 < int(done) < 80


@needs_kernel
@pytest.mark.parametrize("shape, radius, dilation, factor", [
    ((13, 11, 9), 1, 2, 1),  # unpooled
    ((13, 11, 9), 1, 2, 2),  # trailing voxels that fill no block
    ((20, 17, 15), 2, 1, 3),
    ((9, 10, 11), 1, 3, 2),
])
def test_mind_kernel_matches_the_unsliced_jax_descriptor(monkeypatch, shape, radius, dilation, factor):
    image = jnp.asarray(np.random.default_rng(13).random(shape), jnp.float32)
    program = jax.jit(lambda i: mind_ssc_pooled(i, radius, dilation, factor))
    assert "jaxreg_mind" in program.lower(image).as_text()
    native = np.asarray(program(image))
    monkeypatch.setattr(cpu_kernels, "_state", {"ready": False})  # the reference: XLA code throughout
    reference = np.asarray(jax.jit(lambda i: avg_pool(mind_ssc(i, radius, dilation), factor))(image))
    assert native.shape == reference.shape == (12,) + tuple(n // factor for n in shape)
    np.testing.assert_allclose(native, reference, rtol=0, atol=2e-6)


@needs_kernel
def test_mind_kernel_of_a_constant_image_is_one_everywhere():
    # zero variance: the clamp's floor keeps exp(-0 / floor) = 1, as in the JAX path
    np.testing.assert_array_equal(jax.jit(lambda i: mind_ssc_pooled(i, 1, 2, 2))(jnp.full((8, 6, 7), 0.3)), 1.0)


@needs_kernel
@pytest.mark.parametrize("mode", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 3])
def test_sample_kernel_matches_the_jax_warp(mode, channels):
    rng = np.random.default_rng(14)
    volume = jnp.asarray(rng.random((channels, 6, 5, 8)), jnp.float32)
    disp = jnp.asarray(rng.normal(0, 3, (3, 5, 6, 7)), jnp.float32).at[:, 0, 0, :].set(1e20)  # far outside too
    if channels == 1:
        program = jax.jit(lambda v, d: warp(v[0], d, mode)[None])
    else:
        program = jax.jit(lambda v, d: warp_field(v, d, mode))
    assert "jaxreg_sample" in program.lower(volume, disp).as_text()
    reference = jax.jit(lambda v, d: _warp_channels_jax(v, d, mode))(volume, disp)
    np.testing.assert_allclose(program(volume, disp), reference, rtol=0, atol=3e-7)
    nan_disp = disp.at[1, 2, 2, 2].set(jnp.nan)
    assert np.isnan(program(volume, nan_disp)[:, 2, 2, 2]).all()
    # differentiable: the gradient comes from the JAX path
    inside = disp.at[:, 0, 0, :].set(0.5)
    grad = jax.grad(lambda d: jnp.sum(program(volume, d) ** 2))(inside)
    expected = jax.grad(lambda d: jnp.sum(_warp_channels_jax(volume, d, mode) ** 2))(inside)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_box_adam_kernel_steps_as_optax_after_the_box_filter():
    import optax
    rng = np.random.default_rng(17)
    shape = (3, 21, 9, 11)  # two tasks of planes along x
    params = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
    gradients = jnp.asarray(rng.normal(0, 1, (4,) + shape), jnp.float32)
    optimiser = optax.adam(0.7, **ADAM)

    def run(params, gradients, update):
        state = optimiser.init(params)
        for gradient in gradients:  # four steps: the bias corrections change with the count
            params, state = update(gradient, params, state)
        return params, state[0].mu, state[0].nu, state[0].count

    def reference_update(gradient, params, state):
        updates, state = optimiser.update(_box_filter_jax(gradient, 3, (1, 2, 3), "zeros"), state, params)
        return optax.apply_updates(params, updates), state

    kernel = jax.jit(lambda p, g: run(p, g, lambda *a: _box_adam_update(*a, 0.7)))
    assert "jaxreg_box_adam" in kernel.lower(params, gradients).as_text()
    got = kernel(params, gradients)
    expected = jax.jit(lambda p, g: run(p, g, reference_update))(params, gradients)
    assert int(got[3]) == int(expected[3]) == 4
    for a, b in zip(got[:3], expected[:3]):  # the filters sum in different orders
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[0] - params))) > 1.0  # four steps of ~0.7


@needs_kernel
@pytest.mark.parametrize("shape, window", [((11, 9, 13), 5), ((20, 7, 6), 3), ((37, 70, 9), 5)])  # last: several tiles
def test_lncc_kernel_matches_the_jax_path(monkeypatch, shape, window):
    rng = np.random.default_rng(15)
    warped, fixed = (jnp.asarray(ndimage.gaussian_filter(rng.random(shape), 1), jnp.float32) for _ in range(2))
    stats = fixed_window_statistics(fixed, window)
    program = jax.jit(lambda w, *s: _lncc_and_derivative(w, s, window))
    assert "jaxreg_lncc" in program.lower(warped, *stats).as_text()
    loss, derivative = program(warped, *stats)
    monkeypatch.setattr(cpu_kernels, "_state", {"ready": False})  # the reference: XLA code throughout
    reference = jax.jit(lambda w, *s: _lncc_and_derivative_jax(w, *s, window=window))(warped, *stats)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    scale = float(jnp.max(jnp.abs(reference[1])))
    np.testing.assert_allclose(derivative, reference[1], rtol=0, atol=1e-4 * scale)


@needs_kernel
def test_dispatch_puts_the_kernel_in_cpu_programs():
    disp, volume = jnp.zeros((3, 4, 4, 4)), jnp.zeros((4, 4, 4))
    program = jax.jit(lambda d, v: cpu_kernels.trilinear_with_slopes(d, v, _sample_with_slopes)).lower(disp, volume)
    assert "jaxreg_trilinear" in program.as_text()
    channels = jnp.zeros((4, 4, 4, 2))  # the sampling kernel takes one channel: the JAX path serves more
    program = jax.jit(lambda d, v: cpu_kernels.trilinear_with_slopes(d, v, _sample_with_slopes)).lower(disp, channels)
    assert "jaxreg_trilinear" not in program.as_text()


def test_without_a_compiler_jaxreg_warns_once_and_takes_the_jax_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv("JAXREG_NATIVE", raising=False)
    monkeypatch.setenv("JAXREG_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="jaxreg.ops.native.kernels"):
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()
    assert len(caplog.records) == 1 and "pure JAX path" in caplog.records[0].getMessage()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    disp, volume = jnp.zeros((3, 4, 4, 4)), jnp.ones((4, 4, 4))
    program = jax.jit(lambda d, v: cpu_kernels.trilinear_with_slopes(d, v, _sample_with_slopes))
    assert "jaxreg_trilinear" not in program.lower(disp, volume).as_text()
    np.testing.assert_array_equal(program(disp, volume)[0], volume)


def test_jaxreg_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("JAXREG_NATIVE", "0")
    assert not cpu_kernels.available()


@needs_kernel
def test_the_library_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXREG_NATIVE_DIR", str(tmp_path))
    compiler = cpu_kernels._compiler()
    first = cpu_kernels._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
