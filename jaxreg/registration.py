"""The host side of a registration: check the inputs, run the compiled program, gather the result.

:func:`register` takes arrays or paths and returns a :class:`RegistrationResult`;
:func:`register_files` also writes the LUMIR field (and optionally the moved image and warped labels).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from os import PathLike

import jax
import numpy as np

from .compilation import compiled_program
from .config import RegistrationConfig, load_config
from .errors import InputError
from .transforms import detect_convention, load_as_lumir
from .io import (check_finite, check_not_blank, load_field, load_labels, load_volume, save_field, save_volume,
                 stored_dtype)

log = logging.getLogger(__name__)

MIN_SIZE = 8


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What one registration did, in numbers (run logs, the CLI's report, ``--summary`` JSON).

    ``contrast_ncc`` is the brain NCC after the coarse search that the contrast guard judges, and
    ``contrast_match_gain`` how much mapping the moved intensities into the fixed contrast raised it
    (None where the preset does not measure them); ``intensity_terms_matched``: the intensity terms ran
    on the moving image mapped into the fixed contrast (``[contrast] match``); ``ndv_percent`` is filled in by
    :func:`register_files` (LUMIR25 mask: fixed image > 0).
    """

    preset: str
    seconds: float
    compile_seconds: float
    ncc_before: float
    ncc_after: float
    refine_loss_first: float | None
    refine_loss_last: float | None
    max_displacement_vox: float
    contrast_ncc: float | None
    intensity_terms_used: bool
    contrast_match_gain: float | None
    intensity_terms_matched: bool
    unfold_rounds: int
    folding_voxels: int
    ndv_percent: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def contrast_verdict(self, assumed_different: bool = False) -> str | None:
        """One line on what the contrast guard found and did (None where the preset has no guard).
        `assumed_different`: the config said the contrasts differ (``contrast.assume``)."""
        if self.contrast_ncc is None:
            return None
        found = f"brain NCC {self.contrast_ncc:.2f}"
        if self.contrast_match_gain is not None:
            found += f" ({self.contrast_match_gain:+.2f} through an intensity map)"
        if assumed_different:
            verdict = "the contrasts differ, as configured"
        else:
            verdict = f"the contrasts {'differ' if self.intensity_terms_matched or not self.intensity_terms_used else 'agree'}"
        return f"{found} after the coarse search: {verdict}; {self.contrast_action}"

    @property
    def contrast_action(self) -> str:
        """What the intensity terms did, in words."""
        if self.intensity_terms_matched:
            return "intensity terms on the moving image mapped into the fixed contrast"
        return "intensity terms used" if self.intensity_terms_used else "MIND-SSC alone"


@dataclass(frozen=True, kw_only=True)
class RegistrationResult:
    """What :func:`register` returns. ``disp`` is (3, X, Y, Z) float32 voxels on the fixed grid."""

    disp: np.ndarray
    moved: np.ndarray
    affine: np.ndarray
    config: RegistrationConfig
    summary: Summary

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
    """Fixed and moving must share one 3-D grid large enough for the pyramid, and each hold a brain."""
    if fixed.shape != moving.shape:
        raise InputError(f"fixed image is {fixed.shape} but moving image is {moving.shape}: "
                         "both must be on the same grid (bring them into LUMIR geometry first).")
    if min(fixed.shape) < MIN_SIZE:
        raise InputError(f"images of shape {fixed.shape} are too small: every axis needs >= {MIN_SIZE} voxels.")
    check_not_blank(fixed, "fixed image")
    check_not_blank(moving, "moving image")


def register(fixed, moving, *, preset: str | PathLike = "lumir", overrides=(),
             config: RegistrationConfig | None = None, init_disp=None, progress=None) -> RegistrationResult:
    """Register `moving` to `fixed` and return the displacement field and a summary.

    Arguments:
        fixed, moving: 3-D arrays or paths to NIfTI files on the same grid.
        preset: preset name (``lumir``, ``convexadam-lumir``, ``fast``) or a TOML path.
        overrides: ``stage.key=value`` strings applied on top of the preset.
        config: a ready :class:`RegistrationConfig` (wins over `preset` and `overrides`).
        init_disp: optional starting field: a (3,X,Y,Z) / (X,Y,Z,3) array in the LUMIR convention, or a
            NIfTI path (a LUMIR field, or an ITK one if its header says so and the images are paths).
        progress: optional callable, called with the name of each step as it starts
            (``compiling``, ``registering``; :func:`register_files` adds ``loading``, ``writing``).

    Returns:
        :class:`RegistrationResult` with ``disp`` (3, X, Y, Z) in voxels, ``moved`` (moving image
        pulled through ``disp``, normalised to [0, 1]), the affine and a :class:`Summary`.

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
            init = _starting_field_file(init_disp, fixed, moving, fixed_a.shape)
        else:
            init = np.asarray(init_disp, np.float32)
            if init.ndim == 4 and init.shape[-1] == 3 and init.shape[0] != 3:
                init = np.moveaxis(init, -1, 0)
            if init.shape != (3,) + fixed_a.shape:
                raise InputError(f"initial field has shape {init.shape}: expected (3,)+{fixed_a.shape} or {fixed_a.shape}+(3,).")
            check_finite(init, "initial field")
    return run_program(config, fixed_a, moving_a, init, progress=progress)


def _starting_field_file(path, fixed, moving, shape) -> np.ndarray:
    """A starting field file as a LUMIR array: its header says its convention; an ITK field is
    converted with the images' headers, so the images must then be paths."""
    if detect_convention(path, "auto", "initial field") == "lumir":
        return load_field(path, shape, "initial field")
    if not all(isinstance(image, (str, PathLike)) for image in (fixed, moving)):
        raise InputError(f"initial field '{path}' is an ITK displacement field: pass the images as paths, whose "
                         "headers place it, or convert it first with jaxreg.transforms.load_as_lumir.")
    return load_as_lumir(path, fixed=fixed, moving=moving, convention="itk", shape=shape, what="initial field")


def run_program(config: RegistrationConfig, fixed: np.ndarray, moving: np.ndarray, init: np.ndarray | None,
                device=None, progress=None) -> RegistrationResult:
    """Run the compiled program on checked arrays (on `device`, default: JAX's default device) and
    gather the result and its summary. `progress`: see :func:`register`."""
    step = progress or (lambda name: None)
    step("compiling")
    executable, compile_seconds = compiled_program(config, fixed.shape, init is not None, device)
    step("registering")
    start = time.perf_counter()
    inputs = [None if a is None else jax.device_put(a, device) for a in (fixed, moving, init)]
    out = jax.device_get(jax.block_until_ready(executable(*inputs)))
    seconds = time.perf_counter() - start
    losses = np.asarray(out.refine_loss)
    summary = Summary(
        preset=config.name,
        seconds=seconds,
        compile_seconds=compile_seconds,
        ncc_before=float(out.ncc_before),
        ncc_after=float(out.ncc_after),
        refine_loss_first=float(losses[0]) if losses.size else None,
        refine_loss_last=float(losses[-1]) if losses.size else None,
        max_displacement_vox=float(np.abs(out.disp).max()),
        contrast_ncc=None if np.isnan(out.contrast_ncc) else float(out.contrast_ncc),
        intensity_terms_used=bool(out.intensity_used),
        contrast_match_gain=None if np.isnan(out.contrast_gain) else float(out.contrast_gain),
        intensity_terms_matched=bool(out.intensity_matched),
        unfold_rounds=int(out.unfold_rounds),
        folding_voxels=int(out.folding_voxels),
    )
    log.info("registered in %.1f s (+ %.1f s compilation)", seconds, compile_seconds)
    return RegistrationResult(disp=np.asarray(out.disp, np.float32), moved=np.asarray(out.moved, np.float32),
                              affine=np.asarray(out.affine), config=config, summary=summary)


def register_files(fixed_path, moving_path, output, *, moved_output=None, warp_labels=(), preset="lumir",
                   overrides=(), config: RegistrationConfig | None = None, init_disp=None,
                   progress=None) -> tuple[RegistrationResult, dict]:
    """Register two NIfTI files and write the LUMIR field (and optionally the moved image and warped
    label maps). Everything is read and checked before anything is computed or written.

    `warp_labels` is a sequence of (moving label map path, output path); label maps are warped with
    nearest neighbour exactly as the LUMIR evaluator does. The summary gains ``ndv_percent`` (fixed
    image mask); warped label maps keep the dtype of their file. `progress`: see :func:`register`.
    Returns (result, {what: path written}).
    """
    from .evaluation.metrics import ndv  # host-side, scipy; imported late to keep startup light
    from .evaluation.metrics import warp_labels as warp_nearest

    step = progress or (lambda name: None)
    step("loading")
    fixed, fixed_vox2world = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    check_pair(fixed, moving)
    label_maps = []
    for source, target in warp_labels:
        labels = load_labels(source, "moving label map")
        if labels.shape != moving.shape:
            raise InputError(f"label map '{source}' is {labels.shape} but the moving image is {moving.shape}.")
        label_maps.append((labels, target, stored_dtype(source)))
    result = register(fixed, moving, preset=preset, overrides=overrides, config=config, init_disp=init_disp,
                      progress=progress)
    ndv_percent = float(ndv(result.disp, fixed > 0))  # LUMIR25 mask: fixed image > 0
    result = replace(result, summary=replace(result.summary, ndv_percent=ndv_percent))
    step("writing")
    written = {"disp": save_field(result.disp, output, fixed_vox2world)}
    if moved_output is not None:
        low, high = float(moving.min()), float(moving.max())
        moved = result.moved * max(high - low, 1e-6) + low
        written["moved"] = save_volume(moved, moved_output, fixed_vox2world, np.float32)
    for labels, target, dtype in label_maps:
        warped = warp_nearest(labels, result.disp)
        written[f"labels:{target}"] = save_volume(warped, target, fixed_vox2world, dtype)
    return result, written
