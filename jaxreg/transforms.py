"""Field conventions and the transform files other tools read: LUMIR voxel fields <-> ITK fields.

Both conventions describe the same pull map, fixed point -> moving point (``docs/conventions.md``):

- LUMIR (jaxreg's own): ``disp`` (3, X, Y, Z) on the fixed voxel grid, in voxels, channel c along
  array axis c: fixed voxel i is pulled from moving voxel index ``j = i + disp(i)``. After the pull
  the vector lives in the MOVING image's index space, so its header places the moving end.
- ITK (antsApplyTransforms, Greedy, FireANTs, elastix's ``transformix -def all``, SimpleITK's
  ``DisplacementFieldTransform``): vectors ``d`` (X, Y, Z, 3) on the fixed image's grid, in
  millimetres of ITK's physical LPS space: fixed point p is pulled from moving point ``q = p + d(p)``.

nibabel's affines (``vox2world``) map voxel indices to RAS millimetres; ITK's physical space is LPS
(x and y negated). ITK's NIfTI reader keeps the values of a vector image (intent ``vector``, 1007,
what ANTs and SimpleITK write) as stored, i.e. LPS, but negates x and y of a NIfTI ``displacement
vector`` (intent 1006), which the NIfTI standard defines in RAS; both are read here.

A field file says its convention in its header (:func:`detect_convention`): every ITK writer (ANTs,
Greedy, elastix, SimpleITK, so FireANTs) sets the vector intent, a LUMIR field has none. Commands that
take a field (``evaluate``, ``--init-disp``, ``batch --init-fields``) read either through
:func:`load_as_lumir`.

Everything here is NumPy/SciPy on the host, computed in float64 one slab of the first axis at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import ConfigError, InputError, one_line
from .io import FIELD_GZIP_LEVEL, atomic_output, atomic_save, check_finite, load_field, load_nifti

log = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
INTENT_VECTOR = 1007  # NIFTI_INTENT_VECTOR: ITK reads the values as they are (LPS)
INTENT_DISPLACEMENT = 1006  # NIFTI_INTENT_DISPVECT: RAS by the NIfTI standard
SHEAR_TOLERANCE = 1e-3  # |cos| between voxel axes that ITK's NIfTI reader still takes as orthogonal
SAME_GRID_MM = 1e-4  # two vox2world that differ by less than this are one grid
FIELD_CONVENTIONS = ("auto", "lumir", "itk")


def _slab_points(shape, x: int) -> np.ndarray:
    """(3, Y, Z) float64 voxel indices of the slab ``[x, :, :]`` of a grid of `shape`."""
    j, k = np.meshgrid(np.arange(shape[1], dtype=np.float64), np.arange(shape[2], dtype=np.float64), indexing="ij")
    return np.stack([np.full_like(j, x), j, k])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix @ [p, 1]`` for points (3, ...) and a 4x4 (or 3x4) affine."""
    return np.einsum("ij,j...->i...", matrix[:3, :3], points) + matrix[:3, 3].reshape((3,) + (1,) * (points.ndim - 1))


def check_itk_grid(vox2world: np.ndarray, what: str) -> None:
    """Refuse a sheared voxel grid: ITK stores a grid as origin, spacing and a rotation, so it would
    read such a header differently from nibabel and every vector would point elsewhere."""
    matrix = np.asarray(vox2world, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(matrix)):
        raise InputError(f"{what} has a degenerate voxel-to-world matrix: check its header.")
    cosines = (matrix / norms).T @ (matrix / norms) - np.eye(3)
    if np.abs(cosines).max() > SHEAR_TOLERANCE:
        raise InputError(f"{what} has a sheared voxel grid (its axes are not orthogonal), which ITK cannot "
                         "represent: reslice it onto an orthogonal grid first.")


def same_grid(shape_a, vox2world_a, shape_b, vox2world_b) -> bool:
    """Whether two grids are the same voxels in the same places."""
    return (tuple(shape_a) == tuple(shape_b)
            and np.abs(np.asarray(vox2world_a, float) - np.asarray(vox2world_b, float)).max() < SAME_GRID_MM)


# --------------------------------------------------------------------------------------------
# LUMIR voxel field <-> ITK physical field
# --------------------------------------------------------------------------------------------

def lumir_to_itk(disp: np.ndarray, fixed_vox2world: np.ndarray, moving_vox2world: np.ndarray) -> np.ndarray:
    """ITK displacement (X, Y, Z, 3), LPS millimetres, of the LUMIR field `disp` (3, X, Y, Z).

    ``d(i) = LPS(moving_vox2world @ (i + disp(i)) - fixed_vox2world @ i)``: the fixed voxel's
    physical point and the moving point it is pulled from, both placed by their own image's header.
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(f"displacement has shape {disp.shape}: expected (3, X, Y, Z).")
    fixed_lps = RAS_TO_LPS @ np.asarray(fixed_vox2world, np.float64)
    moving_lps = RAS_TO_LPS @ np.asarray(moving_vox2world, np.float64)
    out = np.empty(disp.shape[1:] + (3,), np.float32)
    for x in range(disp.shape[1]):
        points = _slab_points(disp.shape[1:], x)
        moved = _apply(moving_lps, points + disp[:, x].astype(np.float64))
        out[x] = np.moveaxis(moved - _apply(fixed_lps, points), 0, -1)
    return out


def itk_to_lumir(itk_disp: np.ndarray, field_vox2world: np.ndarray, fixed_shape, fixed_vox2world: np.ndarray,
                 moving_vox2world: np.ndarray) -> np.ndarray:
    """LUMIR field (3, X, Y, Z) on the fixed grid of the ITK displacement `itk_disp` (LPS mm).

    `itk_disp` (X', Y', Z', 3) lives on the grid `field_vox2world`; when that is not the fixed grid
    it is sampled at the fixed voxels' physical points as ITK's ``DisplacementFieldTransform`` does:
    trilinear, clamped within half a voxel of the grid, zero displacement farther out. Then ``disp(i) = moving_vox2world^-1 @
    (p + d(p)) - i`` with ``p = fixed_vox2world @ i``.
    """
    itk_disp = np.asarray(itk_disp)
    if itk_disp.ndim != 4 or itk_disp.shape[-1] != 3:
        raise InputError(f"ITK displacement has shape {itk_disp.shape}: expected (X, Y, Z, 3).")
    fixed_shape = tuple(int(n) for n in fixed_shape)
    fixed_lps = RAS_TO_LPS @ np.asarray(fixed_vox2world, np.float64)
    world2moving = np.linalg.inv(RAS_TO_LPS @ np.asarray(moving_vox2world, np.float64))
    resample = not same_grid(itk_disp.shape[:3], field_vox2world, fixed_shape, fixed_vox2world)
    if resample:
        log.info("the ITK field's grid is not the fixed image's: sampling it trilinearly at the fixed voxels")
        fixed2field = np.linalg.inv(RAS_TO_LPS @ np.asarray(field_vox2world, np.float64)) @ fixed_lps
        channels = [np.ascontiguousarray(itk_disp[..., c], np.float64) for c in range(3)]
    out = np.empty((3,) + fixed_shape, np.float32)
    for x in range(fixed_shape[0]):
        points = _slab_points(fixed_shape, x)
        if resample:
            where = _apply(fixed2field, points)
            vectors = np.stack([ndimage.map_coordinates(channel, where, order=1, mode="nearest")
                                for channel in channels])
            outside = np.any([(where[k] < -0.5) | (where[k] > itk_disp.shape[k] - 0.5) for k in range(3)], axis=0)
            vectors[:, outside] = 0.0
        else:
            vectors = np.moveaxis(itk_disp[x].astype(np.float64), -1, 0)
        out[:, x] = _apply(world2moving, _apply(fixed_lps, points) + vectors) - points
    return out


# --------------------------------------------------------------------------------------------
# files: ITK displacement fields (NIfTI) and ITK affine transforms (text)
# --------------------------------------------------------------------------------------------

def _open_header(path: str | os.PathLike, what: str) -> nib.Nifti1Image:
    """The NIfTI at `path`, its data not read; one-line errors for a missing or damaged file."""
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist: check the path.") from None
    except Exception as err:  # nibabel raises many types for a damaged header
        raise InputError(f"{what} '{path}' cannot be read as NIfTI ({one_line(err)}): is the file complete?") from None


def _field_layout(path: str | os.PathLike, what: str) -> tuple[tuple[int, ...], int]:
    """(stored shape, intent code) of a NIfTI field, from its header alone."""
    header = _open_header(path, what).header
    return tuple(int(n) for n in header.get_data_shape()), int(header["intent_code"])


def _image_grid(path: str | os.PathLike, what: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, vox2world) of an image, from its header alone."""
    img = _open_header(path, what)
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, np.float64)


def is_itk_field(path: str | os.PathLike) -> bool:
    """Whether a NIfTI file is shaped like an ITK displacement field: 5-D [X,Y,Z,1,3] (ANTs,
    Greedy, SimpleITK) or a vector / displacement-vector intent."""
    try:
        shape, intent = _field_layout(path, "field")
    except InputError:  # unreadable: the caller's own reader reports it
        return False
    return (len(shape) == 5 and shape[3:] == (1, 3)) or intent in (INTENT_VECTOR, INTENT_DISPLACEMENT)


def load_itk_field(path: str | os.PathLike, what: str = "ITK displacement field") -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK displacement field as (vectors (X, Y, Z, 3) float32 in LPS mm, vox2world)."""
    img = load_nifti(path, what)
    data = np.asanyarray(img.dataobj)
    intent = int(img.header["intent_code"])
    if data.ndim == 5 and data.shape[3:] == (1, 3):
        data = data[:, :, :, 0, :]
    elif not (data.ndim == 4 and data.shape[3] == 3 and intent in (INTENT_VECTOR, INTENT_DISPLACEMENT)):
        raise InputError(f"{what} '{path}' has shape {tuple(data.shape)}: expected the 5-D [X,Y,Z,1,3] vector "
                         "image that ANTs, Greedy and SimpleITK write (a LUMIR field needs no conversion).")
    vectors = np.asarray(data, dtype=np.float32)
    if intent == INTENT_DISPLACEMENT:  # RAS by the NIfTI standard: to ITK's LPS
        vectors = vectors * np.array([-1.0, -1.0, 1.0], np.float32)
    check_finite(vectors, f"{what} '{path}'")
    check_itk_grid(img.affine, f"{what} '{path}'")
    return vectors, np.asarray(img.affine, np.float64)


def detect_convention(path: str | os.PathLike, convention: str = "auto", what: str = "displacement field") -> str:
    """The convention of the field file at `path`: ``lumir`` or ``itk``.

    ``auto`` reads it from the header: a vector or displacement-vector intent (1007, 1006) is an ITK
    field (every ITK writer sets it); a field without one is LUMIR's, unless it is stored 5-D
    [X, Y, Z, 1, 3], ITK's layout, which a LUMIR field may also take: that is ambiguous, and
    refused with a line saying to choose. ``lumir`` or ``itk`` is returned as given.
    """
    if convention not in FIELD_CONVENTIONS:
        raise ConfigError(f"field convention must be one of {', '.join(FIELD_CONVENTIONS)}, got {convention!r}.")
    if convention != "auto":
        return convention
    shape, intent = _field_layout(path, what)
    if intent in (INTENT_VECTOR, INTENT_DISPLACEMENT):
        return "itk"
    if len(shape) == 5 and shape[3:] == (1, 3):
        raise InputError(f"{what} '{path}' is stored [X,Y,Z,1,3] without a vector intent: it may be an ITK field "
                         "(LPS mm) or a LUMIR field (voxels); say which with --field-convention itk or lumir.")
    return "lumir"


def load_as_lumir(path: str | os.PathLike, *, fixed: str | os.PathLike, moving: str | os.PathLike,
                  convention: str = "auto", shape=None, what: str = "displacement field") -> np.ndarray:
    """A field file in either convention as a LUMIR field (3, X, Y, Z) float32 on the fixed grid.

    Arguments:
        path: a LUMIR field, or an ITK displacement field on the fixed grid or any grid covering it.
        fixed, moving: the registered images (paths); their headers place an ITK field's two ends.
        convention: ``auto`` (:func:`detect_convention`), ``lumir`` or ``itk``.
        shape: the fixed grid the field must be on (default: the fixed image's).
        what: how the field is named in error messages.
    """
    if detect_convention(path, convention, what) == "lumir":
        return load_field(path, tuple(shape) if shape is not None else _image_grid(fixed, "fixed image")[0], what)
    fixed_shape, fixed_vox2world = _image_grid(fixed, "fixed image")
    _, moving_vox2world = _image_grid(moving, "moving image")
    if shape is not None and tuple(shape) != fixed_shape:
        raise InputError(f"the fixed image '{fixed}' is on a {fixed_shape} grid, not {tuple(shape)}: "
                         f"the ITK field '{path}' cannot be placed on the expected grid.")
    check_itk_grid(fixed_vox2world, f"fixed image '{fixed}'")
    check_itk_grid(moving_vox2world, f"moving image '{moving}'")
    vectors, field_vox2world = load_itk_field(path, what)
    if not same_grid(vectors.shape[:3], field_vox2world, fixed_shape, fixed_vox2world):
        log.warning("the ITK field '%s' is not on the fixed image's grid: it is resampled trilinearly onto it", path)
    return itk_to_lumir(vectors, field_vox2world, fixed_shape, fixed_vox2world, moving_vox2world)


def save_itk_field(itk_disp: np.ndarray, path: str | os.PathLike, vox2world: np.ndarray) -> Path:
    """Write (X, Y, Z, 3) LPS vectors as ANTs does: float32 [X, Y, Z, 1, 3], intent ``vector``, the
    grid in both qform and sform (code 1, scanner), so every ITK-based tool reads the same geometry."""
    check_itk_grid(vox2world, "the output grid")
    data = np.ascontiguousarray(np.asarray(itk_disp, np.float32)[:, :, :, None, :])
    img = nib.Nifti1Image(data, None)
    img.set_qform(vox2world, code=1)
    img.set_sform(vox2world, code=1)
    img.header.set_intent(INTENT_VECTOR)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    return atomic_save(img, path, FIELD_GZIP_LEVEL)


def write_itk_affine(fixed_world2moving_world: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 4x4 RAS affine (fixed world point -> moving world point: the pull direction ITK
    resamples with) as an ITK text transform that antsApplyTransforms and SimpleITK read."""
    lps = RAS_TO_LPS @ np.asarray(fixed_world2moving_world, np.float64) @ RAS_TO_LPS
    numbers = " ".join(repr(float(v)) for v in list(lps[:3, :3].ravel()) + list(lps[:3, 3]))
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {numbers}\nFixedParameters: 0 0 0\n")
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK text affine written by :func:`write_itk_affine` (or by ANTs as
    ``.txt``): the fixed world -> moving world map, centre of rotation included."""
    try:
        fields = dict(line.split(":", 1) for line in Path(path).read_text().splitlines() if ":" in line)
        kind = fields["Transform"].strip()
        parameters = np.array(fields["Parameters"].split(), np.float64)
        centre = np.array(fields["FixedParameters"].split(), np.float64)
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"'{path}' is not an ITK text transform ({err}).") from None
    if not kind.startswith(("AffineTransform", "MatrixOffsetTransformBase")) or parameters.size != 12 or centre.size != 3:
        raise InputError(f"'{path}' holds a {kind}, not a 3-D affine transform.")
    matrix = parameters[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = parameters[9:] + centre - matrix @ centre
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


# --------------------------------------------------------------------------------------------
# native space: a registration in LUMIR geometry composed with both subjects' prepare affines
# --------------------------------------------------------------------------------------------

def compose_native(disp: np.ndarray, native_fixed_shape, fixed_template2native: np.ndarray,
                   moving_template2native: np.ndarray) -> np.ndarray:
    """The registration between two native images, as a LUMIR-convention field on the native fixed grid.

    `disp` (3, X, Y, Z) registers two images in LUMIR (template) geometry; each was resampled from
    its native image by a template voxel -> native voxel affine (``jaxreg prepare``). A native fixed
    voxel a is template voxel ``t = fixed_template2native^-1 a``, pulled from template voxel
    ``t + disp(t)`` (trilinear, clamped at the template grid's border), which is native moving voxel
    ``b = moving_template2native (t + disp(t))``. Returns ``b - a`` (3, *native_fixed_shape): one
    field, so the native moving image is resampled once.
    """
    channels = [np.asarray(channel, np.float64) for channel in disp]
    native2template = np.linalg.inv(np.asarray(fixed_template2native, np.float64))
    moving_template2native = np.asarray(moving_template2native, np.float64)
    shape = tuple(int(n) for n in native_fixed_shape)
    out = np.empty((3,) + shape, np.float32)
    for x in range(shape[0]):
        points = _slab_points(shape, x)
        template = _apply(native2template, points)
        pulled = template + np.stack([ndimage.map_coordinates(channel, template, order=1, mode="nearest")
                                      for channel in channels])
        out[:, x] = _apply(moving_template2native, pulled) - points
    return out
