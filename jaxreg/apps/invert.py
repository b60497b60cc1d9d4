"""Write the inverse of a registration's field (:mod:`jaxreg.ops.invert`) with its consistency error."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..io import load_volume, save_field
from ..ops.invert import ConsistencyError, consistency, invert
from .apply import as_field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InverseReport:
    """What :func:`write_inverse` wrote and how consistent the pair is, in voxels:
    ``on_moving`` = ``|phi(psi(y)) - y|`` over the moving brain (what the inverse solves),
    ``on_fixed`` = ``|psi(phi(x)) - x|`` over the fixed brain (through both fields' interpolation)."""

    path: Path
    on_moving: ConsistencyError
    on_fixed: ConsistencyError


def _mask(image, what: str):
    """Brain mask (image > 0) of an image given as array or path, or None."""
    if image is None:
        return None
    array = load_volume(image, what)[0] if isinstance(image, (str, os.PathLike)) else np.asarray(image)
    if array.ndim != 3:
        raise InputError(f"{what} has shape {array.shape}: expected a 3-D image.")
    return array > 0


def write_inverse(disp, output, *, fixed=None, moving=None, vox2world=None) -> InverseReport:
    """Invert a LUMIR field and write the inverse (a LUMIR field on the moving grid).

    Arguments:
        disp: a :class:`~jaxreg.registration.RegistrationResult`, a (3, X, Y, Z) / (X, Y, Z, 3)
            array or a LUMIR field path.
        output: the inverse field (.nii.gz). It pulls the fixed image onto the moving grid and maps
            moving-space points to fixed space (``jaxreg apply``).
        fixed, moving: the registered images (arrays or paths), optional: their voxels > 0 mask the
            reported errors (default: every voxel).
        vox2world: header of the output; default the moving image's (when a path), else the field's
            (when a path), else identity.

    Returns:
        :class:`InverseReport`.
    """
    header = None
    if hasattr(disp, "disp"):  # a RegistrationResult (not imported: it would import jax's program)
        disp = disp.disp
    field = as_field(disp)  # read and checked before any header is looked at
    fixed_mask, moving_mask = _mask(fixed, "fixed image"), _mask(moving, "moving image")
    for source in (disp, moving):  # the moving image's header wins
        if isinstance(source, (str, os.PathLike)):
            header = nib.load(str(source)).affine
    disp = field
    if fixed_mask is not None and fixed_mask.shape != disp.shape[1:]:
        raise InputError(f"the fixed image is {fixed_mask.shape}, the field's grid {disp.shape[1:]}.")
    inverse = invert(disp, shape=None if moving_mask is None else moving_mask.shape)  # on the moving grid
    on_moving, on_fixed = consistency(disp, inverse.disp, fixed_mask=fixed_mask, moving_mask=moving_mask)
    log.info("inverse consistency |phi(psi(y)) - y| on the moving grid: %s", on_moving.line())
    log.info("inverse consistency |psi(phi(x)) - x| on the fixed grid: %s", on_fixed.line())
    path = save_field(inverse.disp, output, vox2world if vox2world is not None else header)
    return InverseReport(path=path, on_moving=on_moving, on_fixed=on_fixed)
