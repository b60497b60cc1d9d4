"""Each registration stage recovers a known synthetic answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.stages.affine import affine_search
from jaxreg.stages.coarse import coarse_search, coarse_search_both_ways
from jaxreg.config import AffineConfig, CoarseConfig, RefineConfig
from jaxreg.stages.features import mind_ssc_pooled
import jaxreg.stages.losses as losses
import jaxreg.stages.refine as refine_module
from jaxreg.stages.refine import adam_on_smoothed, refine
from jaxreg.ops.warp import affine_coordinates, sample, warp

from synthetic import SHAPE, brain, inverse_of, pull, smooth_field

FIXED = brain()
MASK = ndimage.binary_erosion(FIXED > 0, iterations=3)


def _features(image, factor=1):
    return mind_ssc_pooled(jnp.asarray(image / 255.0), 1, 2, factor, slab=8)


@pytest.mark.parametrize("shift", [(2, -2, 4), (0, 2, -2)])
def test_coarse_search_recovers_integer_shift(shift):
    moving = np.roll(FIXED, shift, axis=(0, 1, 2))  # moving(x) = fixed(x - shift) -> u = +shift
    config = CoarseConfig(grid_spacing=2, search_radius=3)
    disp = np.asarray(jax.jit(lambda f, m: coarse_search(f, m, config))(_features(FIXED, 2), _features(moving, 2)))
    inner = MASK[::2, ::2, ::2][: disp.shape[1], : disp.shape[2], : disp.shape[3]]
    for axis in range(3):
        np.testing.assert_allclose(np.median(disp[axis][inner]), shift[axis], atol=0.25)


@pytest.mark.parametrize("inverse_consistent", [True, False])
def test_coarse_search_backward_field_is_the_swapped_search(inverse_consistent):
    """What a symmetric program takes as its backward coarse field instead of searching again: the
    search with the images swapped, and with inverse consistency close to the forward field's inverse."""
    moving = pull(FIXED, smooth_field(amplitude=3.0, sigma=4.0, seed=2))
    config = CoarseConfig(grid_spacing=2, search_radius=2, inverse_consistent=inverse_consistent)
    f, m = _features(FIXED, 2), _features(moving, 2)
    forward, backward = jax.jit(lambda f, m: coarse_search_both_ways(f, m, config))(f, m)
    search = jax.jit(lambda f, m: coarse_search(f, m, config))
    np.testing.assert_allclose(np.asarray(forward), np.asarray(search(f, m)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(backward), np.asarray(search(m, f)), atol=1e-4)
    assert np.abs(np.asarray(backward)).max() > 1  # a real displacement, not zeros
    if inverse_consistent:  # u(x) + v(x + u(x)) ~ 0 in the brain, in cells
        u, v = np.asarray(forward) / 2, np.asarray(backward) / 2
        grid = np.indices(u.shape[1:]).astype(np.float32)
        v_at = np.stack([ndimage.map_coordinates(c, grid + u, order=1, mode="nearest") for c in v])
        inner = MASK[::2, ::2, ::2][: u.shape[1], : u.shape[2], : u.shape[3]]
        assert np.linalg.norm(u + v_at, axis=0)[inner].mean() < 0.02  # 0.002 (0.11 without)


# the dispatching entry (the CPU kernel here when built), and both JAX paths: CPU rows, GPU channels
@pytest.mark.parametrize("name", ["_ssd_and_gradient", "_ssd_and_gradient_rows", "_ssd_and_gradient_by_channel"])
def test_ssd_gradient_matches_autodiff(name):
    rng = np.random.default_rng(3)
    moving = jnp.asarray(rng.random((7, 8, 9, 4)), jnp.float32)
    fixed = jnp.asarray(rng.random((7, 8, 9, 4)), jnp.float32)
    disp = jnp.asarray(rng.standard_normal((3, 7, 8, 9)) * 1.5, jnp.float32)

    def autodiff_loss(d):
        return jnp.sum((warp(moving, d, "zeros") - fixed) ** 2) / (7 * 8 * 9)

    loss, grad = jax.jit(getattr(losses, name))(disp, moving, fixed)
    np.testing.assert_allclose(loss, autodiff_loss(disp), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(autodiff_loss)(disp), atol=1e-6)


def test_gpu_programs_gather_the_features_channel_by_channel():
    """On a GPU the row gather made the feature steps several times slower and slow to compile."""
    disp = jax.ShapeDtypeStruct((3, 4, 5, 6), jnp.float32)
    features = jax.ShapeDtypeStruct((4, 5, 6, 13), jnp.float32)
    for platform, slice_sizes in (("cuda", "13, 1"), ("cpu", "1, 13")):
        program = jax.jit(losses._ssd_and_gradient_jax).trace(disp, features, features)
        text = program.lower(lowering_platforms=(platform,)).as_text()
        gathers = [line for line in text.splitlines() if "stablehlo.gather" in line]
        assert gathers and all(f"slice_sizes = array<i64: {slice_sizes}>" in line for line in gathers), platform


def test_only_cpu_programs_fuse_the_adam_step_with_its_box_filter():
    """GPU and TPU programs keep autodiff's transpose of the smoothing (the programs timed on devices)."""
    from jaxreg.ops.native import library
    params = jax.ShapeDtypeStruct((3, 5, 6, 7), jnp.float32)
    program = jax.jit(lambda p: adam_on_smoothed(lambda s: jnp.sum(jnp.sin(s)), p, 1, 0.1, 2)).trace(params)
    assert "jaxreg_box_adam" not in program.lower(lowering_platforms=("cuda",)).as_text()
    assert ("jaxreg_box_adam" in program.lower(lowering_platforms=("cpu",)).as_text()) == library.available()


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_adam_on_smoothed_parameters_matches_optax_through_autodiff(passes):
    """adam_on_smoothed applies the smoothing's transpose by hand (box filters, the last fused with the update on
    CPU); the reference differentiates through smooth_grid and steps with optax."""
    import optax
    rng = np.random.default_rng(4)
    target = jnp.asarray(rng.normal(0, 1, (3, 9, 8, 7)), jnp.float32)
    start = jnp.asarray(rng.normal(0, 0.5, (3, 9, 8, 7)), jnp.float32)
    loss_of_smoothed = lambda s: jnp.sum((s - target) ** 2 * (1 + target ** 2)) + jnp.sum(jnp.cos(s))
    got, losses = jax.jit(lambda p: adam_on_smoothed(loss_of_smoothed, p, passes, 0.1, 6))(start)

    optimiser = optax.adam(0.1)

    def step(carry, _):
        p, state = carry
        loss, gradient = jax.value_and_grad(lambda q: loss_of_smoothed(refine_module.smooth_grid(q, passes)))(p)
        updates, state = optimiser.update(gradient, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (expected, _), expected_losses = jax.jit(lambda p: jax.lax.scan(step, (p, optimiser.init(p)), None, length=6))(start)
    assert float(jnp.max(jnp.abs(got - start))) > 0.1  # the steps moved the parameters
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    # the loss at each step's start, the first being the loss of the starting parameters
    assert losses.shape == (6,) and float(losses[-1]) < float(losses[0])
    np.testing.assert_allclose(losses[0], loss_of_smoothed(refine_module.smooth_grid(start, passes)), rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)


def test_adam_steps_where_the_kernels_fail_to_build_match_optax(monkeypatch):
    """A CPU program lowered after a failed build holds no kernel and steps as optax does."""
    import optax
    from jaxreg.ops.native import library
    monkeypatch.setattr(library, "ready", lambda: False)  # the build was tried and failed
    rng = np.random.default_rng(5)
    target = jnp.asarray(rng.normal(0, 1, (3, 7, 6, 9)), jnp.float32)  # a shape no other test traces
    loss_of_smoothed = lambda s: jnp.sum((s - target) ** 2)
    program = jax.jit(lambda p: adam_on_smoothed(loss_of_smoothed, p, 2, 0.1, 4)[0])
    assert "jaxreg_" not in program.lower(jnp.zeros_like(target)).as_text(dialect="hlo")
    got = program(jnp.zeros_like(target))
    optimiser = optax.adam(0.1)
    p, state = jnp.zeros_like(target), optimiser.init(target)
    for _ in range(4):
        updates, state = optimiser.update(jax.grad(lambda q: loss_of_smoothed(refine_module.smooth_grid(q, 2)))(p), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(got, p, rtol=0, atol=2e-5)


def test_fused_adam_step_finds_the_moments_in_optax_state_by_type_and_refuses_another_layout():
    """The fused CPU step updates optax.adam's ScaleByAdamState wherever optax puts it; a layout with
    state it does not know (here a second array-holding entry) stops the trace with one clear error."""
    import optax
    params = jnp.zeros((3, 4, 5, 6), jnp.float32)
    state = optax.adam(0.1).init(params)
    index = refine_module._adam_moments_index(state)
    assert isinstance(state[index], optax.ScaleByAdamState)
    assert refine_module._adam_moments_index(tuple(reversed(state))) == len(state) - 1 - index
    for changed in (state[index], (state[index], optax.ScaleByAdamState(jnp.int32(0), params, params)),
                    (state[index], optax.ScaleByScheduleState(jnp.int32(0)))):
        with pytest.raises(RuntimeError, match="ScaleByAdamState"):
            refine_module._adam_moments_index(changed)


def test_refinement_recovers_smooth_deformation():
    true_forward = smooth_field(amplitude=2.5)
    moving = pull(FIXED, true_forward)  # moving(y) = fixed(y + w(y)) -> u = inverse of w
    expected = inverse_of(true_forward)
    config = RefineConfig(grid_spacing=1, iterations=60, learning_rate=0.2, diffusion_weight=1.0)
    disp, losses = jax.jit(lambda f, m, d: refine(f, m, d, config))(
        _features(FIXED), _features(moving), jnp.zeros((3,) + SHAPE))
    disp = np.asarray(disp)
    error_before = np.linalg.norm(expected, axis=0)[MASK].mean()
    error_after = np.linalg.norm(disp - expected, axis=0)[MASK].mean()
    assert losses[-1] < 0.5 * losses[0]
    # the texture leaves some freedom along edges (aperture problem), so not all of the error goes
    assert error_after < 0.6 * error_before, (error_before, error_after)
    # and the images agree at least as well as with the true inverse
    residual = np.mean((pull(moving, disp) - FIXED)[MASK] ** 2)
    assert residual < 1.2 * np.mean((pull(moving, expected) - FIXED)[MASK] ** 2)


def test_affine_leaves_an_aligned_pair_unchanged():
    config = AffineConfig(enabled=True, levels=(2,), iterations=(40,))
    matrix = np.asarray(jax.jit(lambda f, m: affine_search(f, m, config))(jnp.asarray(FIXED), jnp.asarray(FIXED)))
    # CPU: exactly the identity (zero gradient). GPU: its scatter-add gradients carry ~1e-9 noise,
    # which Adam's normalisation turns into small steps: a few hundredths of a voxel.
    np.testing.assert_allclose(matrix, np.eye(3, 4), atol=0.05)


def test_affine_recovers_known_affine():
    truth = np.array([[1.06, 0.04, 0.0, 0.0], [-0.03, 0.95, 0.0, 0.0], [0.0, 0.02, 1.02, 0.0]], np.float32)
    centre = (np.array(SHAPE) - 1) / 2
    truth[:, 3] = centre - truth[:, :3] @ centre + np.array([2.0, -1.5, 1.0])
    # fixed(x) = moving(A x): build moving by resampling fixed through the inverse affine
    inverse = np.linalg.inv(np.vstack([truth, [0, 0, 0, 1]]))[:3]
    moving = np.asarray(sample(jnp.asarray(FIXED), affine_coordinates(jnp.asarray(inverse, jnp.float32), SHAPE), "border"))
    config = AffineConfig(enabled=True, levels=(2, 1), iterations=(80, 40), learning_rate=0.02)
    matrix = np.asarray(jax.jit(lambda f, m: affine_search(f, m, config))(jnp.asarray(FIXED), jnp.asarray(moving)))
    points = np.argwhere(MASK)[::50].T.astype(np.float32)
    error = np.linalg.norm(matrix[:, :3] @ points + matrix[:, 3:] - (truth[:, :3] @ points + truth[:, 3:]), axis=0)
    start = np.linalg.norm(points - (truth[:, :3] @ points + truth[:, 3:]), axis=0)
    assert error.mean() < 0.5 and error.mean() < 0.2 * start.mean(), (error.mean(), start.mean())


@pytest.mark.parametrize("overrides, names", [
    ([], ["features", "coarse", "contrast", "refine", "fine", "unfold"]),
    (["affine.enabled=true"], ["affine", "features", "coarse", "contrast", "refine", "fine", "compose", "unfold"]),
    (["contrast.min_ncc=-1", "contrast.max_match_gain=2", "unfold.rounds=0"], ["features", "coarse", "refine", "fine"]),
    (["coarse.enabled=false", "fine.enabled=false", "refine.intensity_weight=0"], ["features", "refine", "unfold"]),
    (["refine.iterations=0", "fine.iterations=0"], ["features", "coarse", "contrast", "unfold"]),
])
def test_program_is_the_tuple_of_the_stages_the_config_turns_on(overrides, names):
    from jaxreg.config import load_config
    from jaxreg.pipeline import stages
    assert [stage.name for stage in stages(load_config("lumir", overrides))] == names


def test_stages_jitted_one_by_one_compute_what_the_one_program_computes():
    """What `jaxreg benchmark` times piece by piece is the program `register` runs."""
    from jaxreg import pipeline
    from jaxreg.config import load_config
    config = load_config("lumir", ["refine.iterations=5", "fine.iterations=3", "unfold.rounds=3"])
    moving = pull(FIXED, smooth_field(amplitude=2.0, seed=7))
    whole = pipeline.program(jnp.asarray(FIXED), jnp.asarray(moving), None, config=config)
    state = jax.jit(lambda f, m: pipeline.start(f, m, None))(jnp.asarray(FIXED), jnp.asarray(moving))
    for stage in pipeline.stages(config):
        state = jax.jit(stage.apply)(state)
    pieces = jax.jit(pipeline.finish)(state)
    assert bool(pieces.intensity_used) and float(np.abs(pieces.disp).max()) > 0.5
    for name in pipeline.Field._fields:
        np.testing.assert_allclose(np.asarray(getattr(pieces, name)), np.asarray(getattr(whole, name)),
                                   atol=1e-4, err_msg=name)
