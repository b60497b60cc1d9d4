"""Field files for other tools: LUMIR <-> ITK displacement fields, and a registration between two
prepared images turned into one ITK field between their native T1s.

The conventions and formulas are in :mod:`jaxreg.transforms`; this module reads the headers that
place each end of the field and writes the result atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import load_field, load_nifti, save_field
from ..transforms import (check_itk_grid, compose_native, is_itk_field, load_as_lumir, lumir_to_itk, same_grid,
                          save_itk_field)

FORMATS = ("itk", "lumir")


def _header(path, what: str) -> tuple[tuple, np.ndarray]:
    img = load_nifti(path, what)
    return tuple(img.shape[:3]), np.asarray(img.affine, np.float64)


def convert_field(disp, output, *, fixed, moving, to: str = "itk") -> Path:
    """Convert a field file between the LUMIR and the ITK convention.

    Arguments:
        disp: ``to="itk"``: a LUMIR field on the fixed grid; ``to="lumir"``: an ITK displacement
            field (ANTs ``*Warp.nii.gz``, Greedy ``-o``, FireANTs, elastix ``transformix -def all``
            saved as NIfTI, SimpleITK), on the fixed grid or any grid covering it.
        output: the converted field (.nii.gz), on the fixed grid with the fixed image's header.
        fixed, moving: the images the field registers; their headers place the field's two ends
            (the moving header matters: a LUMIR vector ends in moving voxel index space).
        to: ``itk`` or ``lumir``.

    Returns:
        The output path.
    """
    if to not in FORMATS:
        raise InputError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}.")
    fixed_shape, fixed_vox2world = _header(fixed, "fixed image")
    _, moving_vox2world = _header(moving, "moving image")
    check_itk_grid(fixed_vox2world, f"fixed image '{fixed}'")
    check_itk_grid(moving_vox2world, f"moving image '{moving}'")
    if to == "itk":
        if is_itk_field(disp):
            raise InputError(f"'{disp}' is already an ITK displacement field (5-D vector image): "
                             "use --to lumir to convert it to a LUMIR field.")
        vectors = lumir_to_itk(load_field(disp, fixed_shape), fixed_vox2world, moving_vox2world)
        return save_itk_field(vectors, output, fixed_vox2world)
    lumir = load_as_lumir(disp, fixed=fixed, moving=moving, convention="itk", what="ITK displacement field")
    return save_field(lumir, output, fixed_vox2world)


def export_native(disp, output, *, fixed, moving) -> Path:
    """Write the registration of two prepared images as an ITK field between their native T1s.

    Arguments:
        disp: LUMIR field registering the prepared `moving` image to the prepared `fixed` image.
        output: ITK displacement field (.nii.gz) on the native fixed T1's grid: with it any ITK-based
            tool (or ``jaxreg apply --itk``) resamples the native moving T1 or its labels onto the
            native fixed T1 in one step.
        fixed, moving: the images ``jaxreg prepare`` wrote (their ``_prepare.json`` records are read
            from beside them).

    Returns:
        The output path.
    """
    from .prepare import load_record  # the record's format belongs to prepare

    fixed_record, moving_record = load_record(fixed), load_record(moving)
    for record, name in ((fixed_record, fixed), (moving_record, moving)):
        check_itk_grid(record.native_vox2world, f"the native T1 of '{name}'")
    if not same_grid(fixed_record.template_shape, fixed_record.template_vox2world, moving_record.template_shape,
                     moving_record.template_vox2world):
        raise InputError(f"'{fixed}' and '{moving}' were prepared onto different template grids: prepare both "
                         "with the same jaxreg.")
    native = compose_native(load_field(disp, fixed_record.template_shape), fixed_record.native_shape,
                            fixed_record.template_vox2native_vox, moving_record.template_vox2native_vox)
    vectors = lumir_to_itk(native, fixed_record.native_vox2world, moving_record.native_vox2world)
    return save_itk_field(vectors, output, fixed_record.native_vox2world)
