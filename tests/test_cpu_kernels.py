"""The C++ kernels compute what the JAX paths compute; the library is built only for CPU programs,
and jaxreg runs without it.

Kernel tests are skipped with ``JAXREG_NATIVE=0`` (the pure JAX leg of CI). Under
``JAXREG_REQUIRE_NATIVE=1`` (CI's main leg) they are never skipped: a library that does not build
fails them.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.config import UnfoldConfig
from jaxreg.ops.filters import _box_filter_jax, avg_pool, box_filter
from jaxreg.ops.native import dispatch, library
from jaxreg.ops.native import kernels as cpu_kernels
from jaxreg.ops.warp import _warp_channels_jax, warp, warp_field
from jaxreg.stages.coarse import _coupled_argmin_jax, _squared_differences, search_offsets
from jaxreg.stages.features import mind_ssc, mind_ssc_pooled
from jaxreg.stages.losses import (_fold_penalty_and_gradient_jax, _lncc_and_derivative, _lncc_and_derivative_jax,
                                  _sample_with_slopes, _ssd_and_gradient_jax, fixed_window_statistics)
from jaxreg.stages.refine import ADAM, _box_adam_update
from jaxreg.stages.unfold import _fold_mask_jax, _unfold_jax, unfold


def _kernel_skip_reason() -> str | None:
    if os.environ.get("JAXREG_NATIVE", "1").strip().lower() in library.OFF:
        return "JAXREG_NATIVE=0: the pure JAX path, as on GPU and TPU"
    if library.required():
        return None  # each kernel test builds the library or fails (the `kernels` fixture)
    return None if library.available() else "the CPU kernels are not built here (no C++ compiler): jaxreg runs its JAX path"


SKIP_REASON = _kernel_skip_reason()


@pytest.fixture
def kernels():
    """The library built and registered; under JAXREG_REQUIRE_NATIVE=1 a failed build fails the test here."""
    assert library.ready()


def needs_kernel(test):
    """A test of the kernels themselves: skipped with JAXREG_NATIVE=0 or, unless they are required,
    where they cannot be built."""
    return pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")(pytest.mark.usefixtures("kernels")(test))


@pytest.fixture
def pure_jax(monkeypatch):
    """Within the test, programs traced from now on take the JAX path throughout (the reference)."""
    def switch_off():
        monkeypatch.setenv("JAXREG_NATIVE", "0")
    return switch_off


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library state as at the start of a process, building into an empty folder."""
    monkeypatch.setattr(library, "_state", {})
    monkeypatch.setattr(library, "_scratch", [])
    monkeypatch.delenv("JAXREG_NATIVE", raising=False)
    monkeypatch.delenv("JAXREG_REQUIRE_NATIVE", raising=False)
    monkeypatch.setenv("JAXREG_NATIVE_DIR", str(tmp_path))
    return tmp_path


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
def test_unfold_kernel_runs_the_same_rounds_as_the_jax_path(pure_jax, rounds, local_rounds, grow, blend):
    rng = np.random.default_rng(12)
    disp = jnp.asarray(rng.normal(0, 0.4, (3, 14, 15, 16)), jnp.float32)  # folds all over
    config = UnfoldConfig(rounds=rounds, local_rounds=local_rounds, grow=grow, blend=blend)
    field, done, left = jax.jit(lambda d: unfold(d, config))(disp)
    assert "jaxreg_unfold" in jax.jit(lambda d: unfold(d, config)).lower(disp).as_text()
    pure_jax()  # the reference: XLA code throughout
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
def test_mind_kernel_matches_the_unsliced_jax_descriptor(pure_jax, shape, radius, dilation, factor):
    image = jnp.asarray(np.random.default_rng(13).random(shape), jnp.float32)
    program = jax.jit(lambda i: mind_ssc_pooled(i, radius, dilation, factor))
    assert "jaxreg_mind" in program.lower(image).as_text()
    native = np.asarray(program(image))
    pure_jax()  # the reference: XLA code throughout
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
def test_lncc_kernel_matches_the_jax_path(pure_jax, shape, window):
    rng = np.random.default_rng(15)
    warped, fixed = (jnp.asarray(ndimage.gaussian_filter(rng.random(shape), 1), jnp.float32) for _ in range(2))
    stats = fixed_window_statistics(fixed, window)
    program = jax.jit(lambda w, *s: _lncc_and_derivative(w, s, window))
    assert "jaxreg_lncc" in program.lower(warped, *stats).as_text()
    loss, derivative = program(warped, *stats)
    pure_jax()  # the reference: XLA code throughout
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


def _failing_compiler(folder, message="cpu_kernels.cc:1:1: error: expected unqualified-id"):
    """A stand-in C++ compiler that prints `message` and more, then fails."""
    folder.mkdir(exist_ok=True)
    script = folder / "failing-c++"
    script.write_text(f"#!/bin/sh\necho 'In file included from somewhere' >&2\necho '{message}' >&2\n"
                      "echo '1 error generated.' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


def _trilinear_program():
    return jax.jit(lambda d, v: cpu_kernels.trilinear_with_slopes(d, v, _sample_with_slopes))


def test_a_failed_build_warns_once_names_its_log_and_takes_the_jax_path(fresh_library, tmp_path, monkeypatch, caplog):
    native_dir = fresh_library / "native"
    monkeypatch.setenv("JAXREG_NATIVE_DIR", str(native_dir))
    compiler = _failing_compiler(tmp_path / "bin")
    monkeypatch.setattr(library, "_compiler", lambda: compiler)
    disp, volume = jnp.zeros((3, 4, 4, 4)), jnp.ones((4, 4, 4))
    with caplog.at_level(logging.WARNING, logger="jaxreg.ops.native.library"):
        first = _trilinear_program().lower(disp, volume)  # the build is tried when a CPU program is lowered
        second = _trilinear_program().lower(disp, volume)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    message = caplog.records[0].getMessage()
    assert "pure JAX" in message and "expected unqualified-id" in message
    logs = list(native_dir.glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    text = logs[0].read_text()
    assert "In file included from somewhere" in text and "1 error generated." in text and compiler in text
    assert not list(native_dir.glob("*.so")) and [p.name for p in native_dir.iterdir()] == [logs[0].name]
    for program in (first, second):
        assert "jaxreg_trilinear" not in program.as_text()
    np.testing.assert_array_equal(first.compile()(disp, volume)[0], volume)


def test_jaxreg_require_native_makes_a_failed_build_an_error_at_every_cpu_program(fresh_library, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXREG_REQUIRE_NATIVE", "1")
    compiler = _failing_compiler(tmp_path / "bin")
    monkeypatch.setattr(library, "_compiler", lambda: compiler)
    disp, volume = jnp.zeros((3, 4, 4, 4)), jnp.ones((4, 4, 4))
    for _ in range(2):  # not only the first: no test after a failed build passes on the JAX path
        with pytest.raises(library.NativeBuildError, match=r"could not be built.*expected unqualified-id.*\.log.*JAXREG_REQUIRE_NATIVE=1"):
            _trilinear_program().lower(disp, volume)
    monkeypatch.setattr(library, "_state", {})
    monkeypatch.setattr(library, "_compiler", lambda: None)
    with pytest.raises(library.NativeBuildError, match="no C\\+\\+ compiler"):
        library.ready()


def test_lowering_for_another_platform_builds_nothing(fresh_library, monkeypatch):
    """GPU and TPU programs are traced with both paths but lower only the JAX one: no build."""
    from jaxreg.config import load_config
    from jaxreg.pipeline import program

    lowered_for_cpu = []
    monkeypatch.setattr(library, "ready", lambda: lowered_for_cpu.append(True) or False)
    image = jax.ShapeDtypeStruct((24, 28, 20), jnp.float32)
    traced = program.trace(image, image, None, config=load_config("lumir"))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert lowered_for_cpu == [] and library._state == {}
    assert "@jaxreg_" not in text
    traced.lower(lowering_platforms=("cpu",))
    assert lowered_for_cpu  # the CPU lowering asks for the library


def test_with_jaxreg_native_0_cpu_programs_hold_no_kernel(fresh_library, monkeypatch):
    from jaxreg.config import load_config
    from jaxreg.pipeline import program

    monkeypatch.setenv("JAXREG_NATIVE", "0")
    monkeypatch.setattr(library, "ready", lambda: pytest.fail("the library was asked for"))
    image = jax.ShapeDtypeStruct((20, 24, 28), jnp.float32)  # not traced before: jit keeps traces
    text = program.trace(image, image, None, config=load_config("lumir")).lower(lowering_platforms=("cpu",)).as_text()
    assert "jaxreg_" not in text
    assert not library.available()


def test_on_cpu_lowers_the_native_function_only_for_cpu_programs_with_the_library(monkeypatch):
    monkeypatch.delenv("JAXREG_NATIVE", raising=False)
    native, fallback = (lambda x: (jnp.sin(x), [x * 2])), (lambda x: (jnp.cos(x), [x * 3]))
    x = jnp.linspace(0, 1, 5, dtype=jnp.float32)
    for ready, expected in ((True, native(x)), (False, fallback(x))):
        monkeypatch.setattr(library, "ready", lambda: ready)
        program = lambda v: dispatch.on_cpu(native, fallback, v)  # a new function: not in jit's cache
        got = jax.jit(program)(x)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1][0], expected[1][0])
        text = jax.jit(program).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        assert "cosine" in text and "sine" not in text.replace("cosine", "")
    stack = jnp.stack([x, 2 * x])
    got = jax.jit(jax.vmap(program))(stack)  # batched: both paths vmapped
    np.testing.assert_array_equal(got[0], jnp.cos(stack))
    np.testing.assert_array_equal(dispatch.on_cpu(native, fallback, x)[0], jnp.cos(x))  # eager


def test_hand_gradient_gives_the_hand_written_gradient_wrt_the_first_argument_only():
    def value_and_gradient(x, y, scale):
        return scale * jnp.sum(x * x * y), scale * 2.0 * x * y

    @dispatch.hand_gradient(value_and_gradient, nondiff_argnums=(2,))
    def loss(x, y, scale):
        return value_and_gradient(x, y, scale)[0]

    x, y = jnp.asarray([1.0, -2.0, 3.0]), jnp.asarray([0.5, 4.0, -1.0])
    assert float(loss(x, y, 3.0)) == 3.0 * float(jnp.sum(x * x * y))
    gx, gy = jax.grad(loss, argnums=(0, 1))(x, y, 3.0)
    np.testing.assert_allclose(gx, 6.0 * x * y)
    np.testing.assert_array_equal(gy, 0.0)  # by design: the losses' gradient wrt the images is not used


def test_jax_gradient_takes_the_value_from_the_function_and_the_gradient_from_the_jax_path():
    def jax_path(x, power):
        return x ** power

    @dispatch.jax_gradient(jax_path, nondiff_argnums=(1,))
    def kernel(x, power):
        return jnp.round(x ** power)  # a stand-in whose own autodiff would give 0

    x = jnp.asarray([1.2, 2.6])
    np.testing.assert_array_equal(kernel(x, 2), jnp.round(x ** 2))
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(kernel(v, 2)))(x), 2 * x, rtol=1e-6)


@needs_kernel
def test_kernel_tests_are_not_skipped_when_the_kernels_are_required():
    assert library.available()


def test_jaxreg_native_0_turns_the_kernels_off(fresh_library, monkeypatch):
    monkeypatch.setenv("JAXREG_NATIVE", "0")
    monkeypatch.setenv("JAXREG_REQUIRE_NATIVE", "1")  # a pure JAX run asks for no build, required or not
    assert not library.enabled() and not library.available()


def test_without_a_writable_home_the_library_is_built_in_a_temporary_folder(fresh_library, tmp_path, monkeypatch, caplog):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("JAXREG_NATIVE_DIR")
    with caplog.at_level(logging.WARNING, logger="jaxreg.ops.native.library"):
        first, second = library._cache_folder(), library._cache_folder()
    assert first == second and first.is_dir() and os.access(first, os.W_OK) and not first.is_relative_to(home)
    assert len(caplog.records) == 1 and str(first) in caplog.records[0].getMessage()


@pytest.mark.slow
@needs_kernel
def test_the_library_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXREG_NATIVE_DIR", str(tmp_path))
    compiler = library._compiler()
    first = library._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert library._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
