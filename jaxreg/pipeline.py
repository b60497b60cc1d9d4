"""The registration program: an ordered tuple of stages folded over a small state, jitted as one.

Data flow: normalise -> (affine) -> MIND-SSC features -> coarse discrete search -> (contrast guard,
which may map the moving image into the fixed contrast for the intensity terms) -> Adam refinement on
the features -> (full-resolution intensity level) -> (compose with the affine) -> (fold repair) ->
outputs; with ``symmetric.enabled``, the same stages backward, the mean of both fields and a refit by
the full-resolution level. The field is ONE voxel displacement on the fixed grid (LUMIR
convention ``moved(x) = moving(x + disp(x))``, channel c along array axis c).

:func:`stages` builds the tuple from a config, leaving out the stages it turns off; each stage is a
pure function :class:`State` -> :class:`State`. :func:`_program` is :func:`start`, the fold, then
:func:`finish`; :func:`report` (a second, small program) then pulls the moving image through the
field and measures the NCC. ``jaxreg benchmark`` times exactly these pieces one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import RegistrationConfig
from .ops.intensity import ncc, normalise
from .ops.invert import invert_on_grid, mean_with_inverse
from .ops.warp import affine_coordinates, compose_affine, resize, sample, warp, warp_field
from .stages.affine import affine_search
from .stages.coarse import coarse_search, coarse_search_both_ways
from .stages.contrast import guards, judge_contrast
from .stages.features import mind_ssc_pooled
from .stages.fine import refine_fine
from .stages.refine import refine, with_intensity_channel
from .stages.unfold import unfold

IDENTITY_AFFINE = np.eye(3, 4, dtype=np.float32)


class State(NamedTuple):
    """What one stage hands to the next: arrays only (a pytree), so a stage can be jitted alone.

    ``disp`` is (3, X, Y, Z) voxels on the fixed grid, pulling ``moving_aligned`` until the compose
    stage and ``moving_n`` after it. The features are MIND-SSC pooled by :func:`feature_spacing`
    (None until the features stage). ``losses`` is the feature level's loss before and after its Adam
    steps ((0,) without it). ``contrast_ncc`` and ``contrast_gain`` are the guard's figures (NaN
    where it did not measure them); ``moving_intensity`` is the image the intensity terms see on the
    grid of ``moving_aligned``: None for ``moving_aligned`` itself, else it mapped into the fixed contrast
    where the guard says so (``matched``).
    """

    fixed_n: jnp.ndarray
    moving_n: jnp.ndarray
    moving_aligned: jnp.ndarray
    matrix: jnp.ndarray
    disp: jnp.ndarray
    fixed_features: jnp.ndarray | None
    moving_features: jnp.ndarray | None
    losses: jnp.ndarray
    contrast_ncc: jnp.ndarray
    contrast_gain: jnp.ndarray
    use_intensity: jnp.ndarray
    matched: jnp.ndarray
    moving_intensity: jnp.ndarray | None
    unfold_rounds: jnp.ndarray
    folding_voxels: jnp.ndarray
    init_disp: jnp.ndarray | None = None  # the starting field given to the program, if any
    backward: jnp.ndarray | None = None  # symmetric programs: the field from moving to fixed (moving grid)
    coarse_backward: jnp.ndarray | None = None  # symmetric programs: the coarse search's backward field


class Field(NamedTuple):
    """What the registration program returns (every field gains a leading pair axis when batched)."""

    disp: jnp.ndarray  # (3, X, Y, Z) voxels, LUMIR convention
    affine: jnp.ndarray  # (3, 4) fixed voxel -> moving voxel; the identity without the affine stage
    refine_loss: jnp.ndarray  # the feature level's loss at its first and last Adam step, or (0,)
    contrast_ncc: jnp.ndarray  # brain NCC that the contrast guard judged (NaN: no guard)
    contrast_gain: jnp.ndarray  # how much mapping the moved intensities raised it (NaN: not measured)
    intensity_used: jnp.ndarray  # whether the intensity terms ran
    intensity_matched: jnp.ndarray  # whether they ran on the moving image mapped into the fixed contrast
    unfold_rounds: jnp.ndarray
    folding_voxels: jnp.ndarray  # folding voxels left after the fold repair


class Report(NamedTuple):
    """What the report program returns: what the field does to the images."""

    moved: jnp.ndarray  # the normalised moving image pulled through disp (border padding)
    ncc_before: jnp.ndarray  # NCC of the normalised images before: unregistered, or through the starting field
    ncc_after: jnp.ndarray


# A registration's Field and Report together: what a CompiledProgram returns (fields derived, so the
# three types cannot drift apart)
Outputs = NamedTuple("Outputs", [*Field.__annotations__.items(), *Report.__annotations__.items()])


class Stage(NamedTuple):
    """One step of the program: a name, a pure function State -> State and a line for reports."""

    name: str
    apply: Callable[[State], State]
    description: str = ""


def feature_spacing(config: RegistrationConfig) -> int:
    """The pooling factor of the shared MIND-SSC features: the coarse grid's, else the refinement's."""
    return config.coarse.grid_spacing if config.coarse.enabled else config.refine.grid_spacing


def _mind(image: jnp.ndarray, config: RegistrationConfig, spacing: int) -> jnp.ndarray:
    return mind_ssc_pooled(image, config.features.radius, config.features.dilation, spacing)


def _affine_stage(state: State, *, config: RegistrationConfig) -> State:
    matrix = affine_search(state.fixed_n, state.moving_n, config.affine)
    moving_aligned = sample(state.moving_n, affine_coordinates(matrix, state.fixed_n.shape), "border")
    return state._replace(matrix=matrix, moving_aligned=moving_aligned)


def _features_stage(state: State, *, config: RegistrationConfig) -> State:
    # computed once for the coarse search and the feature level when they pool alike
    spacing = feature_spacing(config)
    return state._replace(fixed_features=_mind(state.fixed_n, config, spacing),
                          moving_features=_mind(state.moving_aligned, config, spacing))


def _coarse_stage(state: State, *, config: RegistrationConfig, with_init: bool) -> State:
    if with_init:  # with a starting field, the coarse search looks for what remains after it
        moving_features = _mind(warp(state.moving_aligned, state.disp), config, config.coarse.grid_spacing)
    else:
        moving_features = state.moving_features
    if config.symmetric.enabled and not with_init:  # the backward run starts from the search's backward field
        step, backward = coarse_search_both_ways(state.fixed_features, moving_features, config.coarse)
        return state._replace(disp=resize(step, state.fixed_n.shape),
                              coarse_backward=resize(backward, state.moving_n.shape))
    step = resize(coarse_search(state.fixed_features, moving_features, config.coarse), state.fixed_n.shape)
    # new field: first the coarse step, then the starting field: x -> x + s(x) + d(x + s(x))
    disp = step + warp_field(state.disp, step, "border") if with_init else step
    return state._replace(disp=disp)


def _contrast_stage(state: State, *, config: RegistrationConfig) -> State:
    verdict = judge_contrast(state.fixed_n, state.moving_aligned, state.disp, config)
    return state._replace(contrast_ncc=verdict.ncc, contrast_gain=verdict.match_gain,
                          use_intensity=verdict.use_intensity, matched=verdict.differ & verdict.use_intensity,
                          moving_intensity=verdict.moving)


def _intensity_moving(state: State) -> jnp.ndarray:
    return state.moving_aligned if state.moving_intensity is None else state.moving_intensity


def _refine_stage(state: State, *, config: RegistrationConfig) -> State:
    if config.refine.grid_spacing == feature_spacing(config):
        fixed_mind, moving_mind = state.fixed_features, state.moving_features
    else:
        fixed_mind, moving_mind = (_mind(image, config, config.refine.grid_spacing)
                                   for image in (state.fixed_n, state.moving_aligned))
    fixed_f = with_intensity_channel(fixed_mind, state.fixed_n, config.refine, state.use_intensity)
    moving_f = with_intensity_channel(moving_mind, _intensity_moving(state), config.refine, state.use_intensity)
    disp, losses = refine(fixed_f, moving_f, state.disp, config.refine)
    return state._replace(disp=disp, losses=losses)


def _fine_stage(state: State, *, config: RegistrationConfig) -> State:
    def level(fine_config):
        return lambda d: refine_fine(state.fixed_n, _intensity_moving(state), d, fine_config)

    fine, mapped = level(config.fine), _mapped_fine(config)
    if mapped is not None:
        fine = functools.partial(jax.lax.cond, state.matched, level(mapped), fine)
    disp = jax.lax.cond(state.use_intensity, fine, lambda d: d, state.disp)
    return state._replace(disp=disp)


def _compose_stage(state: State) -> State:
    return state._replace(disp=compose_affine(state.matrix, state.disp))


def _unfold_stage(state: State, *, config: RegistrationConfig) -> State:
    disp, rounds, voxels = unfold(state.disp, config.unfold)
    return state._replace(disp=disp, unfold_rounds=rounds, folding_voxels=voxels)


def _backward_stage(state: State, *, config: RegistrationConfig, with_init: bool) -> State:
    # the one-way program with the images swapped, from the inverse of the starting field if any; the
    # MIND-SSC features are the forward ones swapped (no affine stage: moving_aligned is moving_n), and
    # the coarse search's backward field is the swapped search's forward one: it is not searched again
    init = invert_on_grid(state.init_disp) if with_init else None
    backward = start(state.moving_n, state.fixed_n, init)._replace(
        fixed_features=state.moving_features, moving_features=state.fixed_features)
    coarse_known = state.coarse_backward is not None
    if coarse_known:
        backward = backward._replace(disp=state.coarse_backward)
    for stage in _one_way_stages(config, with_init=with_init, features_known=True, coarse_known=coarse_known):
        backward = stage.apply(backward)
    return state._replace(backward=backward.disp, coarse_backward=None)


def _average_stage(state: State, *, config: RegistrationConfig) -> State:
    disp, _, _ = unfold(mean_with_inverse(state.disp, state.backward), config.unfold)
    return state._replace(disp=disp, backward=None)


def stages(config: RegistrationConfig, *, with_init: bool = False) -> tuple[Stage, ...]:
    """The program for `config` as an ordered tuple of stages, those it turns off left out.
    `with_init`: the program starts from a given field (the coarse search then looks for the rest).

    With ``symmetric.enabled`` the one-way stages are followed by the same stages backward, the mean
    of both fields, and a refit by the full-resolution level and the fold repair."""
    one_way = _one_way_stages(config, with_init=with_init)
    if not config.symmetric.enabled:
        return one_way
    bind = functools.partial
    return one_way + (
        Stage("backward", bind(_backward_stage, config=config, with_init=with_init),
              "the stages above, moving to fixed"),
        Stage("average", bind(_average_stage, config=config), "mean with the backward field's inverse, fold repair"),
        Stage("refit", bind(_fine_stage, config=config), f"full-resolution level again, {_fine_steps(config)}"),
        Stage("refit-unfold", bind(_unfold_stage, config=config), "fold repair of the refitted field"),
    )


def _mapped_fine(config: RegistrationConfig):
    """The full-resolution level's settings on a moving image mapped into the fixed contrast, where the
    program can map one (a contrast guard) and they differ from ``fine``'s; else None."""
    mapped = config.fine_when_mapped
    return mapped if guards(config) and mapped != config.fine else None


def _fine_steps(config: RegistrationConfig) -> str:
    def steps(fine):
        half = f"{fine.half_resolution_iterations} at half resolution, then " if fine.half_resolution_iterations else ""
        return f"{half}{fine.iterations} Adam steps"

    text, mapped = steps(config.fine), _mapped_fine(config)
    if mapped is not None and steps(mapped) != text:
        text += f" ({steps(mapped)} on a moving image mapped into the fixed contrast)"
    return text


def _one_way_stages(config: RegistrationConfig, *, with_init: bool, features_known: bool = False,
                    coarse_known: bool = False) -> tuple[Stage, ...]:
    """The stages of one direction; `features_known`: the state holds the MIND-SSC features already;
    `coarse_known`: its field is the coarse search's already."""
    bind = functools.partial
    refine_on = config.refine.enabled and config.refine.iterations > 0
    chosen = [
        (config.affine.enabled, Stage("affine", bind(_affine_stage, config=config), "12-DOF affine search")),
        ((config.coarse.enabled or refine_on) and not features_known,
         Stage("features", bind(_features_stage, config=config), "MIND-SSC of both images, pooled")),
        (config.coarse.enabled and not coarse_known,
         Stage("coarse", bind(_coarse_stage, config=config, with_init=with_init), "discrete search + upsample")),
        (guards(config), Stage("contrast", bind(_contrast_stage, config=config), "contrast guard")),
        (refine_on, Stage("refine", bind(_refine_stage, config=config),
                          f"feature level, {config.refine.iterations} Adam steps")),
        (config.fine.enabled and config.fine.iterations > 0,
         Stage("fine", bind(_fine_stage, config=config), f"full-resolution level, {_fine_steps(config)}")),
        (config.affine.enabled, Stage("compose", _compose_stage, "field composed with the affine")),
        (config.unfold.rounds > 0, Stage("unfold", bind(_unfold_stage, config=config), "fold repair")),
    ]
    return tuple(stage for enabled, stage in chosen if enabled)


def start(fixed: jnp.ndarray, moving: jnp.ndarray, init_disp: jnp.ndarray | None) -> State:
    """The state before the first stage: both images normalised to [0, 1], the starting field (zero
    without one), no affine, and the intensity terms allowed until a guard says otherwise."""
    fixed_n, moving_n = normalise(fixed), normalise(moving)
    return State(fixed_n=fixed_n, moving_n=moving_n, moving_aligned=moving_n, matrix=jnp.asarray(IDENTITY_AFFINE),
                 disp=jnp.zeros((3,) + fixed.shape, jnp.float32) if init_disp is None else init_disp,
                 fixed_features=None, moving_features=None, losses=jnp.zeros((0,), jnp.float32),
                 contrast_ncc=jnp.float32(jnp.nan), contrast_gain=jnp.float32(jnp.nan),
                 use_intensity=jnp.bool_(True), matched=jnp.bool_(False), moving_intensity=None,
                 unfold_rounds=jnp.int32(0), folding_voxels=jnp.int32(0), init_disp=init_disp)


def finish(state: State) -> Field:
    """The program's outputs: the field and the figures the stages measured."""
    return Field(disp=state.disp, affine=state.matrix, refine_loss=state.losses,
                 contrast_ncc=state.contrast_ncc, contrast_gain=state.contrast_gain,
                 intensity_used=state.use_intensity, intensity_matched=state.matched,
                 unfold_rounds=state.unfold_rounds, folding_voxels=state.folding_voxels)


def _program(fixed, moving, init_disp, *, config: RegistrationConfig) -> Field:
    """The whole registration as one traced function: start, every stage in order, finish."""
    state = start(fixed, moving, init_disp)
    for stage in stages(config, with_init=init_disp is not None):
        state = stage.apply(state)
    return finish(state)


def report(fixed, moving, disp, init_disp) -> Report:
    """The moved image and the NCC of the normalised images before and after.

    A program of its own, run after the registration program: computed inside it, these outputs
    made it slower by more than they cost alone (XLA schedules the field's last stages worse when
    it must also return images derived from it). "Before" is the starting field where there is one:
    what the registration had to beat."""
    fixed_n, moving_n = normalise(fixed), normalise(moving)
    moved = warp(moving_n, disp, "border")
    before = moving_n if init_disp is None else warp(moving_n, init_disp, "border")
    return Report(moved=moved, ncc_before=ncc(fixed_n, before), ncc_after=ncc(fixed_n, moved))


program = jax.jit(_program, static_argnames=("config",))
report_program = jax.jit(report)


def _batched_program(fixed, moving, *, config: RegistrationConfig) -> Field:
    """`_program` over a leading pair axis: (B, X, Y, Z) stacks in, every output gains the B axis."""
    return jax.vmap(lambda f, m: _program(f, m, None, config=config))(fixed, moving)


def _batched_report(fixed, moving, disp) -> Report:
    """:func:`report` over a leading pair axis."""
    return jax.vmap(lambda f, m, d: report(f, m, d, None))(fixed, moving, disp)


batched_program = jax.jit(_batched_program, static_argnames=("config",))
batched_report_program = jax.jit(_batched_report)
