"""Adam refinement of a displacement grid (ConvexAdam's instance optimisation), driven by optax, and
the feature level that uses it.

The optimised parameters are a displacement grid with ``grid_spacing`` voxels per cell, in cell
units. The displacement the loss sees is that grid smoothed by ``smoothing_passes`` zero-padded
SMOOTHING_WIDTH^3 box filters. The feature level's loss (:func:`refine`) is the feature SSD (summed
over channels, averaged over cells) of the moving features pulled through the displacement +
``diffusion_weight`` * mean squared forward differences per axis (+ the fold penalty). The
iterations run inside ``lax.scan`` (:func:`adam_on_smoothed`, shared with :mod:`jaxreg.stages.fine`);
:func:`refine` reports the loss at the first and the last of them. With ``symmetric`` it also
refines the backward field and averages the forward field with the backward one's inverse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ..config import RefineConfig
from ..ops.filters import avg_pool, box_filter
from ..ops.invert import invert_on_grid, mean_with_inverse
from ..ops.native.dispatch import by_platform, on_cpu
from ..ops.native.kernels import box_adam
from ..ops.warp import resize
from .losses import diffusion_penalty, fold_penalty, warped_ssd

SMOOTHING_WIDTH = 3  # smooth_grid's box; the kernel path's hand transpose filters with the same one


def smooth_grid(params: jnp.ndarray, passes: int) -> jnp.ndarray:
    """The displacement the loss sees: `passes` zero-padded SMOOTHING_WIDTH^3 box filters of the grid."""
    for _ in range(passes):
        params = box_filter(params, SMOOTHING_WIDTH)
    return params


ADAM = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # optax.adam's defaults, written out for the CPU kernel


def adam_on_smoothed(loss_of_smoothed, params: jnp.ndarray, passes: int, learning_rate: float,
                     iterations: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`iterations` optax.adam steps inside ``lax.scan`` on `params`, whose loss is
    ``loss_of_smoothed(smooth_grid(params, passes))``. Returns (params, the loss at each step's
    start, (iterations,)): the value comes with the gradient, so a caller that reports the loss does
    not evaluate it again (a caller that does not lets XLA drop it).

    CPU programs with the kernels apply the smoothing's transpose by hand (the zero-padded box
    average is its own transpose): `passes` box filters of the gradient wrt the smoothed field, the
    last one fused with the update (:func:`_box_adam_update`; :func:`_box_then_adam` where the
    kernels fail to build). Everywhere else autodiff transposes the smoothing, so GPU and TPU
    programs stay the ones measured on devices.
    """
    optimiser = optax.adam(learning_rate, **ADAM)

    def autodiff_step(p, state):
        loss, gradient = jax.value_and_grad(lambda q: loss_of_smoothed(smooth_grid(q, passes)))(p)
        updates, state = optimiser.update(gradient, state, p)
        return (optax.apply_updates(p, updates), state), loss

    def kernel_step(p, state):
        loss, gradient = jax.value_and_grad(loss_of_smoothed)(smooth_grid(p, passes))
        gradient = smooth_grid(gradient, passes - 1)
        return on_cpu(functools.partial(_box_adam_update, learning_rate=learning_rate),
                      functools.partial(_box_then_adam, optimiser=optimiser), gradient, p, state), loss

    def step(carry, _):
        return by_platform(kernel_step, autodiff_step, *carry) if passes > 0 else autodiff_step(*carry)

    (params, _), losses = jax.lax.scan(step, (params, optimiser.init(params)), None, length=iterations)
    return params, losses


def _adam_moments_index(state) -> int:
    """Where optax.adam's chained state keeps its moments: the index of its one ``ScaleByAdamState``.

    The fused CPU step updates that entry and nothing else, and must return the state in optax's own
    layout (the other platforms' branch steps with optax). So every other entry must hold no arrays
    (the constant learning rate's ``EmptyState``); if a new optax keeps something there, stop here
    rather than step differently from optax.
    """
    found = [i for i, entry in enumerate(state) if isinstance(entry, optax.ScaleByAdamState)] \
        if isinstance(state, tuple) else []
    rest = [entry for i, entry in enumerate(state) if i not in found] if found else state
    if len(found) != 1 or jax.tree_util.tree_leaves(rest):
        raise RuntimeError(
            f"optax {optax.__version__} lays out optax.adam's state as {jax.tree_util.tree_structure(state)}, "
            "not as one ScaleByAdamState beside stateless entries: jaxreg's fused CPU Adam step would step "
            "differently from optax. Install an optax whose adam state has that layout, or set JAXREG_NATIVE=0.")
    return found[0]


def _box_then_adam(gradient, params, state, optimiser):
    """What :func:`_box_adam_update` computes, as XLA code: the step where the kernels cannot be built."""
    updates, state = optimiser.update(box_filter(gradient, SMOOTHING_WIDTH), state, params)
    return optax.apply_updates(params, updates), state


def _box_adam_update(gradient, params, state, learning_rate: float):
    """(params, state) after one optax.adam step (:data:`ADAM`) whose gradient is the zero-padded
    SMOOTHING_WIDTH^3 box average of `gradient`, filtered and applied in one pass by the CPU kernel
    (:func:`kernels.box_adam`; CPU programs only). `state` is optax.adam's, returned in its layout."""
    index = _adam_moments_index(state)
    adam = state[index]
    count = optax.safe_increment(adam.count)
    corrections = jnp.stack([1 - ADAM["b1"] ** count, 1 - ADAM["b2"] ** count])  # as optax forms them
    coefficients = (1 - ADAM["b1"], ADAM["b1"], 1 - ADAM["b2"], ADAM["b2"], ADAM["eps"], -learning_rate)
    mu, nu, params = box_adam(gradient, corrections, (adam.mu, adam.nu), params, SMOOTHING_WIDTH, coefficients)
    return params, state[:index] + (adam._replace(count=count, mu=mu, nu=nu),) + state[index + 1:]


def with_intensity_channel(features: jnp.ndarray, image: jnp.ndarray, config: RefineConfig,
                           use_intensity=True) -> jnp.ndarray:
    """The (C, x, y, z) features the feature level matches: `features` (MIND-SSC pooled by
    ``config.grid_spacing``), plus the pooled [0, 1] `image` times ``config.intensity_weight`` as one
    more channel when that is > 0 (an intensity SSD term next to MIND, for same-contrast pairs).
    Where `use_intensity` is False the channel is all zeros, so one program serves pairs whose
    contrasts agree and pairs whose contrasts differ."""
    if config.intensity_weight <= 0:
        return features
    weight = jnp.where(use_intensity, config.intensity_weight, 0.0)
    return jnp.concatenate([features, weight * avg_pool(image, config.grid_spacing)[None]])


def refine(fixed_cells: jnp.ndarray, moving_cells: jnp.ndarray, init_disp: jnp.ndarray, config: RefineConfig):
    """Refine `init_disp` (3, X, Y, Z, full-resolution voxels). Returns (disp full-res, the loss
    at the first and the last Adam step of the forward field).

    `fixed_cells`, `moving_cells`: (C, x, y, z) features average-pooled by ``config.grid_spacing``.
    With ``config.symmetric`` the backward field is refined too, from the inverse of the start, and
    the result is the mean of the forward field and the backward field's inverse (on the cell grid).
    """
    full_shape = init_disp.shape[1:]
    spacing = config.grid_spacing
    fixed_cells = jnp.moveaxis(fixed_cells, 0, -1)
    moving_cells = jnp.moveaxis(moving_cells, 0, -1)
    start = resize(init_disp, fixed_cells.shape[:3]) / spacing
    disp, losses = _refine_cells(fixed_cells, moving_cells, start, config)
    if config.symmetric:
        backward, _ = _refine_cells(moving_cells, fixed_cells, invert_on_grid(start), config)
        disp = mean_with_inverse(disp, backward)
    return resize(disp * spacing, full_shape), losses[jnp.array([0, -1])]


def _refine_cells(fixed_cells, moving_cells, start, config: RefineConfig):
    """The Adam steps on the cell grid: (the smoothed displacement in cells, the loss at each step).
    `fixed_cells`, `moving_cells` channels-last."""

    def loss_of_smoothed(disp):
        loss = warped_ssd(disp, moving_cells, fixed_cells) + config.diffusion_weight * diffusion_penalty(disp)
        if config.fold_weight > 0:
            loss = loss + config.fold_weight * fold_penalty(disp, config.fold_margin)
        return loss

    params, losses = adam_on_smoothed(loss_of_smoothed, start, config.smoothing_passes, config.learning_rate,
                                      config.iterations)
    return smooth_grid(params, config.smoothing_passes), losses
