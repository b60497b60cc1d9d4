"""Apply a displacement field to an image, a label map or a set of points, as ``register`` does.

The field is a LUMIR pull field on the fixed grid (``moved(x) = moving(x + disp(x))``), or an ITK
displacement field (physical LPS millimetres: ANTs, Greedy, FireANTs, elastix, SimpleITK), which is
first turned into one with the moving image's header (:mod:`jaxreg.transforms`).

- Images: trilinear (``linear``) or cubic B-spline (``cubic``) with coordinates clamped at the border
  (as ``register``'s moved image), written as float32.
- Label maps (``nearest``): exactly as the LUMIR evaluator warps segmentations
  (:func:`jaxreg.evaluation.metrics.warp_labels`: ``map_coordinates(order=0)``, background outside),
  in the label map's own dtype.
- Points: fixed-space points p go to the moving-space points ``p + disp(p)`` they are pulled from
  (disp trilinear). The reverse, moving -> fixed, is the same call with the inverse field
  (``jaxreg invert``), which lives on the moving grid.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..evaluation.metrics import warp_labels
from ..io import atomic_output, check_finite, load_field, load_nifti, save_volume
from ..transforms import is_itk_field, itk_to_lumir, load_itk_field

log = logging.getLogger(__name__)

INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 3}
SPLINE_PAD = 12  # scipy's margin for spline coefficients beyond a clamped border
VOXEL_COLUMNS = ("x", "y", "z")  # voxel indices of the grid the points are on
WORLD_COLUMNS = ("x_mm", "y_mm", "z_mm")  # RAS millimetres of that grid's header (nibabel's world)


def as_field(disp) -> np.ndarray:
    """A LUMIR field as (3, X, Y, Z) float32, from an array in either layout or a NIfTI path."""
    if isinstance(disp, (str, os.PathLike)):
        return load_field(disp)
    disp = np.asarray(disp, np.float32)
    if disp.ndim == 4 and disp.shape[-1] == 3 and disp.shape[0] != 3:
        disp = np.moveaxis(disp, -1, 0)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(f"displacement has shape {disp.shape}: expected (3, X, Y, Z) or (X, Y, Z, 3).")
    check_finite(disp, "displacement")
    return disp


def _order(interpolation: str) -> int:
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}.")
    return INTERPOLATIONS[interpolation]


def warp_image(image: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """``image(x + disp(x))`` on the field's grid, spline of `order` (1 trilinear, 3 cubic), clamped at
    the border; float32. Computed one slab of the first axis at a time."""
    coefficients, pad = np.asarray(image, np.float64), 0
    if order > 1:  # as scipy's map_coordinates prefilters for mode="nearest": edge-padded, then filtered
        pad = SPLINE_PAD
        coefficients = ndimage.spline_filter(np.pad(coefficients, pad, mode="edge"), order=order, mode="nearest")
    out = np.empty(disp.shape[1:], np.float32)
    plane = np.stack(np.meshgrid(np.arange(disp.shape[2]), np.arange(disp.shape[3]), indexing="ij")).astype(np.float64)
    for x in range(disp.shape[1]):
        coords = np.concatenate([np.full((1,) + plane.shape[1:], float(x)), plane]) + disp[:, x] + pad
        out[x] = ndimage.map_coordinates(coefficients, coords, order=order, mode="nearest", prefilter=False)
    return out


def map_points(disp, points: np.ndarray, *, order: int = 1) -> np.ndarray:
    """The moving-space voxel points ``p + disp(p)`` of fixed-space voxel points `points` (N, 3);
    disp sampled with a spline of `order` (1 trilinear, 3 cubic), clamped at the border."""
    disp = as_field(disp)
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"points have shape {points.shape}: expected (N, 3).")
    check_finite(points, "points")
    sampled = np.stack([ndimage.map_coordinates(disp[c].astype(np.float64), points.T, order=order, mode="nearest")
                        for c in range(3)], axis=1)
    return points + sampled


def apply(disp, moving, *, interpolation: str = "linear") -> np.ndarray:
    """Bring `moving` into fixed space through the LUMIR pull field `disp`.

    Arguments:
        disp: (3, X, Y, Z) or (X, Y, Z, 3) array, or a LUMIR field NIfTI path.
        moving: a 3-D image or label map (array), or (N, 3) points in fixed voxel coordinates.
        interpolation: ``linear`` or ``cubic`` (images; also how disp is sampled at points) or
            ``nearest`` (label maps: the LUMIR evaluator's warp, dtype kept).

    Returns:
        The moved image (X, Y, Z) float32, the warped label map (X, Y, Z) in `moving`'s dtype, or the
        (N, 3) moving-space voxel points of the given fixed-space points.

    Raises:
        InputError: a field or input of the wrong shape, non-finite values, labels that are not integers.
    """
    order = _order(interpolation)
    disp = as_field(disp)
    moving = np.asarray(moving)
    if moving.ndim == 2:
        return map_points(disp, moving, order=max(order, 1))
    if moving.ndim != 3:
        raise InputError(f"input has shape {moving.shape}: expected a 3-D volume or (N, 3) points.")
    if order == 0:
        warped = warp_labels(moving, disp)  # integer-valued float maps come back as int64
        return warped.astype(moving.dtype, copy=False)
    check_finite(moving.astype(np.float32, copy=False), "input image")
    return warp_image(moving, disp, order)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def _header(path, what: str) -> tuple[tuple, np.ndarray]:
    img = load_nifti(path, what)
    return tuple(img.shape[:3]), np.asarray(img.affine, np.float64)


def _field_for(disp_path, *, itk: bool, moving_vox2world, fixed) -> tuple[np.ndarray, np.ndarray]:
    """(LUMIR field, vox2world of its grid) from a LUMIR or an ITK field file."""
    if itk:
        if fixed is not None:
            raise InputError("--fixed is for LUMIR fields: an ITK field's own header is the fixed grid.")
        vectors, field_vox2world = load_itk_field(disp_path)
        if moving_vox2world is None:
            raise InputError("an ITK field maps points to physical space: give --moving, the image the points "
                             "are mapped into, so its header places them.")
        return itk_to_lumir(vectors, field_vox2world, vectors.shape[:3], field_vox2world, moving_vox2world), field_vox2world
    if is_itk_field(disp_path):
        log.warning("'%s' looks like an ITK displacement field (5-D vector image): if it is one, pass --itk", disp_path)
    disp = load_field(disp_path)
    if fixed is not None:
        shape, vox2world = _header(fixed, "fixed image")
        if shape != disp.shape[1:]:
            raise InputError(f"the field is on a {disp.shape[1:]} grid, the fixed image '{fixed}' on {shape}.")
        return disp, vox2world
    return disp, np.asarray(load_nifti(disp_path, "displacement field").affine, np.float64)


def read_points(path) -> tuple[list[dict], list[str], tuple[str, str, str]]:
    """Rows, column names, and the coordinate columns (``x,y,z`` voxels or ``x_mm,y_mm,z_mm``)."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except OSError as err:
        raise InputError(f"points '{path}' cannot be read ({err.strerror}).") from None
    for names in (VOXEL_COLUMNS, WORLD_COLUMNS):
        if set(names) <= set(columns):
            break
    else:
        raise InputError(f"points '{path}' has columns {columns}: expected x,y,z (voxels) or x_mm,y_mm,z_mm "
                         "(world millimetres), plus any others (kept).")
    for line, row in enumerate(rows, start=2):
        try:
            [float(row[name]) for name in names]
        except (TypeError, ValueError):
            raise InputError(f"points '{path}', line {line}: a coordinate is not a number.") from None
    return rows, columns, names


def apply_files(disp, input_path, output, *, interpolation: str = "linear", itk: bool = False, fixed=None,
                moving=None) -> Path:
    """Apply a field file to an image, label map (``nearest``) or point CSV file and write the result.

    Arguments:
        disp: a LUMIR field, or with ``itk=True`` an ITK displacement field (on the fixed grid).
        input_path: NIfTI image or label map on the moving grid, or a CSV of fixed-space points
            (columns ``x,y,z`` in voxels, or ``x_mm,y_mm,z_mm`` in world millimetres; others kept).
        output: NIfTI (on the fixed grid, with the fixed header) or CSV (same columns, moving space).
        fixed: for a LUMIR field, the image whose header the output gets (default: the field's own
            header; an ITK field's header is always the fixed grid).
        moving: header of the moving image: places world-millimetre points in moving space, and an
            ITK field's moving end for points (images and label maps carry their own header).

    Returns:
        The output path.
    """
    order = _order(interpolation)
    is_points = str(input_path).lower().endswith(".csv")
    moving_vox2world = None if moving is None else _header(moving, "moving image")[1]
    if is_points:
        rows, columns, names = read_points(input_path)
        disp, vox2world = _field_for(disp, itk=itk, moving_vox2world=moving_vox2world, fixed=fixed)
        points = np.array([[float(row[n]) for n in names] for row in rows], np.float64).reshape(-1, 3)
        world = names == WORLD_COLUMNS
        if world:
            points = (np.linalg.inv(vox2world) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
        mapped = map_points(disp, points, order=max(order, 1))
        if world:
            target = vox2world if moving_vox2world is None else moving_vox2world
            mapped = (target @ np.c_[mapped, np.ones(len(mapped))].T).T[:, :3]
        with atomic_output(output) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row, point in zip(rows, mapped):
                writer.writerow(dict(row, **{n: f"{value:.4f}" for n, value in zip(names, point)}))
        return Path(output)
    img = load_nifti(input_path, "input image")
    volume = np.asanyarray(img.dataobj)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise InputError(f"input '{input_path}' has shape {volume.shape}: expected a 3-D image or label map.")
    disp, vox2world = _field_for(disp, itk=itk, moving_vox2world=np.asarray(img.affine, np.float64), fixed=fixed)
    warped = apply(disp, volume, interpolation=interpolation)
    dtype = volume.dtype if order == 0 else np.float32
    return save_volume(warped, output, vox2world, dtype)
