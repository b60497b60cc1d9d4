"""The registration program: one jitted function chaining the pure stages, and its host wrappers.

Data flow: normalise -> (affine) -> MIND-SSC features -> coarse discrete search -> Adam refinement
-> upsample -> (full-resolution intensity level) -> compose with the affine into ONE voxel
displacement on the fixed grid (LUMIR convention ``moved(x) = moving(x + disp(x))``, channel c along
array axis c) -> (fold repair).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from .stages.affine import affine_search
from .stages.coarse import coarse_search
from .config import RegistrationConfig, load_config
from .errors import InputError
from .stages.features import mind_ssc_pooled
from .ops.filters import avg_pool
from .io import check_finite, load_field, load_labels, load_volume, save_field, save_volume
from .stages.refine import refine, refine_fine
from .stages.unfold import unfold
from .ops.warp import affine_coordinates, compose_affine, resize, sample, warp, warp_field

log = logging.getLogger(__name__)

IDENTITY_AFFINE = np.eye(3, 4, dtype=np.float32)
MIN_SIZE = 8



def normalise(image: jnp.ndarray) -> jnp.ndarray:
    """Rescale intensities to [0, 1] (min -> 0, max -> 1); a constant image becomes all zeros."""
    low, high = image.min(), image.max()
    return (image - low) / jnp.maximum(high - low, 1e-6)


def ncc(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Normalised cross-correlation (1 = identical up to a linear intensity map), over `mask` if given."""
    weight = jnp.ones_like(a) if mask is None else mask.astype(a.dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    a = (a - jnp.sum(a * weight) / count) * weight
    b = (b - jnp.sum(b * weight) / count) * weight
    return jnp.sum(a * b) / jnp.maximum(jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)), 1e-12)


def refinement_features(image: jnp.ndarray, config: RegistrationConfig, use_intensity=True) -> jnp.ndarray:
    """(C, x, y, z) features the refinement matches: MIND-SSC pooled by ``refine.grid_spacing``, plus
    the pooled image times ``refine.intensity_weight`` as one more channel when that is > 0 (an
    intensity SSD term next to MIND, for same-contrast pairs; all zeros where `use_intensity` is False,
    so the same program serves pairs whose contrasts differ)."""
    spacing = config.refine.grid_spacing
    stack = mind_ssc_pooled(image, config.features.radius, config.features.dilation, spacing)
    if config.refine.intensity_weight > 0:
        weight = jnp.where(use_intensity, config.refine.intensity_weight, 0.0)
        stack = jnp.concatenate([stack, weight * avg_pool(image, spacing)[None]])
    return stack


def contrasts_agree(fixed_n: jnp.ndarray, moving_n: jnp.ndarray, disp: jnp.ndarray, config: RegistrationConfig):
    """(brain NCC of fixed and moved, whether the intensity terms may be used): see
    ``RefineConfig.intensity_min_ncc``. The NCC is NaN when the preset has no guard."""
    uses_intensity = config.refine.intensity_weight > 0 or config.fine.enabled
    if not uses_intensity or config.refine.intensity_min_ncc <= -1:
        return jnp.float32(jnp.nan), jnp.bool_(True)
    agreement = ncc(fixed_n, warp(moving_n, disp), fixed_n > 0)
    return agreement, agreement >= config.refine.intensity_min_ncc


def _program(fixed, moving, init_disp, *, config: RegistrationConfig):
    """The whole registration as one traced function. Returns a dict of arrays."""
    shape = fixed.shape
    fixed_n, moving_n = normalise(fixed), normalise(moving)

    if config.affine.enabled:
        matrix = affine_search(fixed_n, moving_n, config.affine)
        moving_aligned = sample(moving_n, affine_coordinates(matrix, shape), "border")
    else:
        matrix = jnp.asarray(IDENTITY_AFFINE)
        moving_aligned = moving_n

    radius, dilation = config.features.radius, config.features.dilation

    def features(image, factor):
        return mind_ssc_pooled(image, radius, dilation, factor)

    disp = jnp.zeros((3,) + shape, jnp.float32) if init_disp is None else init_disp
    if config.coarse.enabled:
        # with a starting field, the coarse search looks for what remains after it
        spacing = config.coarse.grid_spacing
        start = moving_aligned if init_disp is None else warp(moving_aligned, init_disp)
        step = coarse_search(features(fixed_n, spacing), features(start, spacing), config.coarse)
        step = resize(step, shape)
        # new field: first the coarse step, then the starting field: x -> x + s(x) + d(x + s(x))
        disp = step if init_disp is None else step + warp_field(disp, step, "border")
    # intensity terms only when the contrasts agree, judged after the contrast-blind coarse search
    contrast_ncc, use_intensity = contrasts_agree(fixed_n, moving_aligned, disp, config)
    losses = jnp.zeros((0,), jnp.float32)
    if config.refine.enabled and config.refine.iterations > 0:
        # same pooling factor as the coarse stage: XLA computes the MIND-SSC features once
        fixed_f, moving_f = (refinement_features(image, config, use_intensity) for image in (fixed_n, moving_aligned))
        disp, losses = refine(fixed_f, moving_f, disp, config.refine)
    if config.fine.enabled and config.fine.iterations > 0:
        disp = jax.lax.cond(use_intensity, lambda d: refine_fine(fixed_n, moving_aligned, d, config.fine),
                            lambda d: d, disp)

    total = compose_affine(matrix, disp) if config.affine.enabled else disp
    unfold_rounds = folding_voxels = jnp.int32(0)
    if config.unfold.rounds > 0:
        total, unfold_rounds, folding_voxels = unfold(total, config.unfold)
    moved = warp(moving_n, total, "border")
    return {
        "disp": total,
        "affine": matrix,
        "moved": moved,
        "refine_loss": losses,
        "contrast_ncc": contrast_ncc,
        "intensity_used": use_intensity,
        "unfold_rounds": unfold_rounds,
        "folding_voxels": folding_voxels,
        "ncc_before": ncc(fixed_n, moving_n),
        "ncc_after": ncc(fixed_n, moved),
    }


program = jax.jit(_program, static_argnames=("config",))

_executables: dict = {}
_compile_lock = threading.Lock()
_cache_configured = False


def enable_persistent_cache() -> str | None:
    """Keep compiled programs on disk so a second process does not compile again.

    The folder is ``$JAXREG_CACHE_DIR`` (set it empty to disable), else ``~/.cache/jaxreg/xla``.
    Programs that compile in under 0.5 s are not kept, unless JAX's own
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. Returns the folder in use, or None.
    """
    global _cache_configured
    folder = os.environ.get("JAXREG_CACHE_DIR", str(Path.home() / ".cache" / "jaxreg" / "xla"))
    if not _cache_configured:
        _cache_configured = True
        if folder:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                jax.config.update("jax_compilation_cache_dir", folder)
                if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own wins
                    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            except (OSError, AttributeError) as err:  # read-only home, old jax: compile every time
                log.warning("persistent compilation cache disabled: %s", err)
                return None
    return folder or None


def _compile(key, jitted, *args, config: RegistrationConfig):
    """Compile `jitted` for these abstract arguments once per process (ahead of time, so compilation
    is timed apart). Returns (executable, compile_seconds; 0.0 when cached)."""
    with _compile_lock:  # batch threads asking at once compile once
        if key in _executables:
            return _executables[key], 0.0
        enable_persistent_cache()
        start = time.perf_counter()
        executable = jitted.lower(*args, config=config).compile()
        _executables[key] = executable
        return executable, time.perf_counter() - start


def compiled_program(config: RegistrationConfig, shape: tuple[int, int, int], with_init: bool, device=None):
    """The compiled program for this config and grid (on `device`, default: JAX's default device).
    Returns (executable, compile_seconds)."""
    sharding = None if device is None else SingleDeviceSharding(device)
    image = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=sharding)
    init = jax.ShapeDtypeStruct((3,) + tuple(shape), jnp.float32, sharding=sharding) if with_init else None
    key = (config, tuple(shape), with_init, None if device is None else device.id)
    return _compile(key, program, image, image, init, config=config)


def _batched_program(fixed, moving, *, config: RegistrationConfig):
    """`_program` over a leading pair axis: (B, X, Y, Z) stacks in, every output gains the B axis."""
    return jax.vmap(lambda f, m: _program(f, m, None, config=config))(fixed, moving)


batched_program = jax.jit(_batched_program, static_argnames=("config",))


def compiled_batched_program(config: RegistrationConfig, shape: tuple[int, int, int], pairs: int):
    """The compiled program registering `pairs` same-grid pairs at once (vmap). On an accelerator
    this raises pairs per second while one pair leaves the device partly idle; on CPU it only
    multiplies the memory. Returns (executable, compile_seconds)."""
    stack = jax.ShapeDtypeStruct((pairs,) + tuple(shape), jnp.float32)
    return _compile((config, tuple(shape), "batched", pairs), batched_program, stack, stack, config=config)


@dataclass
class RegistrationResult:
    """What :func:`register` returns. ``disp`` is (3, X, Y, Z) float32 voxels on the fixed grid."""

    disp: np.ndarray
    moved: np.ndarray
    affine: np.ndarray
    config: RegistrationConfig
    summary: dict = field(default_factory=dict)

    @property
    def disp_lumir(self) -> np.ndarray:
        """The field in the LUMIR file layout, (X, Y, Z, 3) float32."""
        return np.ascontiguousarray(np.moveaxis(self.disp, 0, -1))


def _as_volume(x, what: str) -> np.ndarray:
    if isinstance(x, (str, PathLike)):
        return load_volume(x, what)[0]
    x = np.asarray(x)
    if x.ndim != 3:
        raise InputError(f"{what} has shape {x.shape}: expected a 3-D volume.")
    x = x.astype(np.float32)
    check_finite(x, what)
    return x


def check_pair(fixed: np.ndarray, moving: np.ndarray) -> None:
    """Fixed and moving must share one 3-D grid large enough for the pyramid."""
    if fixed.shape != moving.shape:
        raise InputError(f"fixed image is {fixed.shape} but moving image is {moving.shape}: "
                         "both must be on the same grid (bring them into LUMIR geometry first).")
    if min(fixed.shape) < MIN_SIZE:
        raise InputError(f"images of shape {fixed.shape} are too small: every axis needs >= {MIN_SIZE} voxels.")


def register(fixed, moving, *, preset: str | PathLike = "lumir", overrides=(),
             config: RegistrationConfig | None = None, init_disp=None) -> RegistrationResult:
    """Register `moving` to `fixed` and return the displacement field and a summary.

    Arguments:
        fixed, moving: 3-D arrays or paths to NIfTI files on the same grid.
        preset: preset name (``lumir``, ``convexadam-lumir``, ``fast``) or a TOML path.
        overrides: ``stage.key=value`` strings applied on top of the preset.
        config: a ready :class:`RegistrationConfig` (wins over `preset` and `overrides`).
        init_disp: optional starting field (3,X,Y,Z) / (X,Y,Z,3) array or NIfTI path, LUMIR convention.

    Returns:
        :class:`RegistrationResult` with ``disp`` (3, X, Y, Z) in voxels, ``moved`` (moving image
        pulled through ``disp``, normalised to [0, 1]), the affine and a summary dict.

    Raises:
        InputError: unreadable files, wrong shapes, non-finite voxels.
        ConfigError: unknown preset or key, invalid value.
    """
    config = config or load_config(preset, overrides)
    fixed_a = _as_volume(fixed, "fixed image")
    moving_a = _as_volume(moving, "moving image")
    check_pair(fixed_a, moving_a)
    init = None
    if init_disp is not None:
        if isinstance(init_disp, (str, PathLike)):
            init = load_field(init_disp, fixed_a.shape, "initial field")
        else:
            init = np.asarray(init_disp, np.float32)
            if init.ndim == 4 and init.shape[-1] == 3 and init.shape[0] != 3:
                init = np.moveaxis(init, -1, 0)
            if init.shape != (3,) + fixed_a.shape:
                raise InputError(f"initial field has shape {init.shape}: expected (3,)+{fixed_a.shape} or {fixed_a.shape}+(3,).")
            check_finite(init, "initial field")
    return run_program(config, fixed_a, moving_a, init)


def run_program(config: RegistrationConfig, fixed: np.ndarray, moving: np.ndarray, init: np.ndarray | None,
                device=None) -> RegistrationResult:
    """Run the compiled program on checked arrays (on `device`, default: JAX's default device) and
    gather the result and its summary."""
    executable, compile_seconds = compiled_program(config, fixed.shape, init is not None, device)
    start = time.perf_counter()
    inputs = [None if a is None else jax.device_put(a, device) for a in (fixed, moving, init)]
    out = jax.device_get(jax.block_until_ready(executable(*inputs)))
    seconds = time.perf_counter() - start
    losses = np.asarray(out["refine_loss"])
    summary = {
        "preset": config.name,
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "ncc_before": float(out["ncc_before"]),
        "ncc_after": float(out["ncc_after"]),
        "refine_loss_first": float(losses[0]) if losses.size else None,
        "refine_loss_last": float(losses[-1]) if losses.size else None,
        "max_displacement_vox": float(np.abs(out["disp"]).max()),
        "contrast_ncc": None if np.isnan(out["contrast_ncc"]) else float(out["contrast_ncc"]),
        "intensity_terms_used": bool(out["intensity_used"]),
        "unfold_rounds": int(out["unfold_rounds"]),
        "folding_voxels": int(out["folding_voxels"]),
    }
    log.info("registered in %.1f s (+ %.1f s compilation)", seconds, compile_seconds)
    return RegistrationResult(disp=np.asarray(out["disp"], np.float32), moved=np.asarray(out["moved"], np.float32),
                              affine=np.asarray(out["affine"]), config=config, summary=summary)


def register_files(fixed_path, moving_path, output, *, moved_output=None, warp_labels=(), preset="lumir",
                   overrides=(), config: RegistrationConfig | None = None, init_disp=None) -> tuple[RegistrationResult, dict]:
    """Register two NIfTI files and write the LUMIR field (and optionally the moved image and warped
    label maps). Everything is read and checked before anything is computed or written.

    `warp_labels` is a sequence of (moving label map path, output path); label maps are warped with
    nearest neighbour exactly as the LUMIR evaluator does. The summary gains ``ndv_percent`` (fixed
    image mask). Returns (result, {what: path written}).
    """
    from .evaluation.metrics import ndv  # host-side, scipy; imported late to keep startup light
    from .evaluation.metrics import warp_labels as warp_nearest

    fixed, fixed_vox2world = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    check_pair(fixed, moving)
    label_maps = []
    for source, target in warp_labels:
        labels = load_labels(source, "moving label map")
        if labels.shape != moving.shape:
            raise InputError(f"label map '{source}' is {labels.shape} but the moving image is {moving.shape}.")
        label_maps.append((labels, target))
    result = register(fixed, moving, preset=preset, overrides=overrides, config=config, init_disp=init_disp)
    result.summary["ndv_percent"] = float(ndv(result.disp, fixed > 0))  # LUMIR25 mask: fixed image > 0
    written = {"disp": save_field(result.disp, output, fixed_vox2world)}
    if moved_output is not None:
        low, high = float(moving.min()), float(moving.max())
        moved = result.moved * max(high - low, 1e-6) + low
        written["moved"] = save_volume(moved, moved_output, fixed_vox2world, np.float32)
    for labels, target in label_maps:
        warped = warp_nearest(labels, result.disp)
        written[f"labels:{target}"] = save_volume(warped, target, fixed_vox2world, np.int32)
    return result, written
