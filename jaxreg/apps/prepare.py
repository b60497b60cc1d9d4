"""Bring a skull-stripped T1 in any orientation and resolution into LUMIR geometry.

LUMIR geometry is the grid of the MNI ICBM152 2009a template shipped as the demo's fixed image
(160 x 224 x 192, 1 mm, RAS array axes; permissive MNI licence, notice in ``jaxreg/demo``).
Steps: headers give the orientation and voxel size; the centres of mass give a first translation;
jaxreg's own affine stage (12 DOF, MIND-SSC features, coarse-to-fine) refines the map from
template voxels to native voxels; the T1 is resampled trilinearly and rescaled to [0, 255] (clipped
at its 99.5th percentile, as the LUMIR-geometry benchmark data were made), label maps with nearest
neighbour, landmark coordinates through the same affine.

Beside each prepared image go the maps back to the native T1 (:func:`write_prepared`): a JSON record
(``<name>_prepare.json``, read by :func:`load_record`; ``jaxreg convert --native`` composes two of
them with a registration) and the same map as an ITK affine (``<name>_affine.txt``: with it,
``antsApplyTransforms -i native.nii.gz -r <name>.nii.gz -t <name>_affine.txt`` redoes the resampling).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..config import AffineConfig
from ..errors import InputError
from ..io import atomic_output, check_not_blank, load_labels, load_nifti, load_volume, save_volume
from ..transforms import check_itk_grid, write_itk_affine

log = logging.getLogger(__name__)

# Coarse-to-fine from a centre-of-mass start: larger steps and a coarser first level than the
# in-pipeline affine, which only corrects small residuals of pre-aligned pairs.
PREPARE_AFFINE = AffineConfig(enabled=True, levels=(8, 4, 2), iterations=(150, 80, 40), learning_rate=0.02)
BRAIN_LITRES = (0.6, 2.2)  # plausible skull-stripped brain volumes; more suggests a skull


@dataclass
class Prepared:
    """A T1 in LUMIR geometry. ``template_vox2native_vox`` is the 4x4 map used to resample; the
    native grid (``native_shape``, ``native_vox2world``) is where it leads back to."""

    image: np.ndarray
    template_vox2native_vox: np.ndarray
    vox2world: np.ndarray
    labels: np.ndarray | None = None
    landmarks: list | None = None  # (id, name, x, y, z) in LUMIR voxel coordinates
    warnings: tuple = ()
    native_shape: tuple | None = None
    native_vox2world: np.ndarray | None = None
    source: str | None = None


@dataclass(frozen=True)
class Record:
    """What leads from a prepared image back to its native T1 (the ``<name>_prepare.json`` file)."""

    native_image: str
    native_shape: tuple
    native_vox2world: np.ndarray
    template_shape: tuple
    template_vox2world: np.ndarray
    template_vox2native_vox: np.ndarray

    @property
    def template_world2native_world(self) -> np.ndarray:
        """4x4 RAS map, template world -> native world (the pull direction)."""
        return self.native_vox2world @ self.template_vox2native_vox @ np.linalg.inv(self.template_vox2world)

    def as_json(self) -> dict:
        return {"description": "jaxreg prepare: template voxel -> native voxel map that resampled the native T1",
                "native_image": self.native_image, "native_shape": [int(n) for n in self.native_shape],
                "native_vox2world": self.native_vox2world.tolist(),
                "template_shape": [int(n) for n in self.template_shape],
                "template_vox2world": self.template_vox2world.tolist(),
                "template_vox2native_vox": self.template_vox2native_vox.tolist(),
                "template_world2native_world": self.template_world2native_world.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        return cls(native_image=str(data["native_image"]), native_shape=tuple(data["native_shape"]),
                   native_vox2world=np.array(data["native_vox2world"], np.float64),
                   template_shape=tuple(data["template_shape"]),
                   template_vox2world=np.array(data["template_vox2world"], np.float64),
                   template_vox2native_vox=np.array(data["template_vox2native_vox"], np.float64))


def sidecar_paths(image) -> tuple[Path, Path]:
    """(JSON record, ITK affine) paths beside a prepared image ``<name>.nii.gz``."""
    image = Path(image)
    stem = image.name[:-7] if image.name.endswith(".nii.gz") else image.stem
    return image.with_name(f"{stem}_prepare.json"), image.with_name(f"{stem}_affine.txt")


def load_record(image) -> Record:
    """The record written beside a prepared image (:func:`sidecar_paths`)."""
    path = sidecar_paths(image)[0]
    if not path.is_file():
        raise InputError(f"'{path}' not found: '{image}' is not an image written by `jaxreg prepare` "
                         "(its record of the native space goes beside it); prepare the native T1 again.")
    try:
        return Record.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"'{path}' is not a readable `jaxreg prepare` record ({err}): prepare the native T1 again.") from None


def template() -> tuple[np.ndarray, np.ndarray]:
    """The ICBM152 2009a template in LUMIR geometry (array, vox2world)."""
    from ..demo import demo_pair

    return load_volume(demo_pair()[0], "template")


def _check_native(data: np.ndarray, vox2world: np.ndarray, path) -> list[str]:
    """Refuse what cannot work; return warnings for what may not."""
    check_not_blank(data, f"T1 image '{path}'")  # the rule every command applies
    mask = data > 0
    voxel_ml = abs(np.linalg.det(vox2world[:3, :3])) / 1000.0
    litres = mask.sum() * voxel_ml / 1000.0
    extent = (np.ptp(np.argwhere(mask), axis=0) + 1) * np.linalg.norm(vox2world[:3, :3], axis=0)
    if extent.max() > 300 or extent.min() < 60:
        raise InputError(f"'{path}': the non-zero region spans {np.round(extent).astype(int).tolist()} mm, "
                         "far from a brain (expected about 100-200 mm per axis): check the header's voxel size.")
    warnings = []
    if litres > BRAIN_LITRES[1]:
        warnings.append(f"the non-zero volume is {litres:.1f} L, more than a brain: the image may include the skull "
                        "(skull-strip it first for a reliable result)")
    elif litres < BRAIN_LITRES[0]:
        warnings.append(f"the non-zero volume is only {litres:.2f} L: is the brain complete?")
    return warnings


def _initial_map(native: np.ndarray, native_vox2world: np.ndarray, templ: np.ndarray,
                 templ_vox2world: np.ndarray) -> np.ndarray:
    """4x4 template voxel -> native voxel: orientation and scale from the headers, centres of mass matched."""
    linear = np.linalg.inv(native_vox2world[:3, :3]) @ templ_vox2world[:3, :3]
    centre_t = np.array(ndimage.center_of_mass(templ > 0))
    centre_n = np.array(ndimage.center_of_mass(native > 0))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre_n - linear @ centre_t
    return matrix


def _resample(volume: np.ndarray, template_vox2native_vox: np.ndarray, shape, order: int) -> np.ndarray:
    return ndimage.affine_transform(volume, template_vox2native_vox[:3, :3], template_vox2native_vox[:3, 3],
                                    output_shape=shape, order=order, mode="constant", cval=0.0)


def _rescale(image: np.ndarray, native: np.ndarray) -> np.ndarray:
    """0 .. 99.5th percentile of the native brain voxels -> 0 .. 255, uint8 (as LUMIR-style data)."""
    top = np.percentile(native[native > 0], 99.5)
    return np.clip(np.rint(np.clip(image, 0, top) / max(top, 1e-6) * 255.0), 0, 255).astype(np.uint8)


def read_landmarks_csv(path) -> list[tuple]:
    """``id,name,x_mm,y_mm,z_mm`` (world millimetres of the native image)."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [(row["id"], row.get("name", ""), float(row["x_mm"]), float(row["y_mm"]), float(row["z_mm"]))
                for row in rows]
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"landmarks '{path}' cannot be read ({err}): expected columns id,name,x_mm,y_mm,z_mm") from None


def prepare(t1_path, *, labels_path=None, landmarks_path=None, config: AffineConfig = PREPARE_AFFINE,
            similarity: str = "ncc", progress=None) -> Prepared:
    """Affinely register a native T1 to the LUMIR template and resample it (and its labels and landmarks).
    `progress`, if given, is called with the name of each step as it starts."""
    import jax.numpy as jnp

    from ..stages.affine import affine_search
    from ..ops.intensity import normalise

    step = progress or (lambda name: None)
    step("reading")
    img = load_nifti(t1_path, "T1 image")
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[-1] > 1:
        raise InputError(f"'{t1_path}' is a 4-D series of {data.shape[-1]} volumes: give one 3-D T1 volume.")
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) < 8):
        raise InputError(f"'{t1_path}' has shape {data.shape}: a 2-D image cannot be brought into 3-D LUMIR geometry.")
    native, native_vox2world = load_volume(t1_path, "T1 image")
    warnings = _check_native(native, native_vox2world, t1_path)
    for warning in warnings:
        log.warning("%s: %s", t1_path, warning)
    templ, templ_vox2world = template()

    step("aligning to the template")
    start = _initial_map(native, native_vox2world, templ, templ_vox2world)
    moving = _resample(native, start, templ.shape, order=1).astype(np.float32)
    refine = np.asarray(affine_search(normalise(jnp.asarray(templ)), normalise(jnp.asarray(moving)), config, similarity))
    refine4 = np.vstack([refine, [0, 0, 0, 1]])
    total = start @ refine4  # template vox -> start grid vox -> native vox
    step("resampling")

    prepared = Prepared(image=_rescale(_resample(native, total, templ.shape, order=1), native),
                        template_vox2native_vox=total, vox2world=templ_vox2world, warnings=tuple(warnings),
                        native_shape=tuple(native.shape), native_vox2world=native_vox2world,
                        source=str(Path(t1_path).absolute()))
    if labels_path is not None:
        labels = load_labels(labels_path, "label map")
        if labels.shape != native.shape:
            raise InputError(f"label map '{labels_path}' is {labels.shape}, the T1 is {native.shape}.")
        prepared.labels = _resample(labels, total, templ.shape, order=0).astype(np.int32)
    if landmarks_path is not None:
        native_world2template_vox = np.linalg.inv(total) @ np.linalg.inv(native_vox2world)
        prepared.landmarks = [(i, name, *(native_world2template_vox @ np.array([x, y, z, 1.0]))[:3])
                              for i, name, x, y, z in read_landmarks_csv(landmarks_path)]
    return prepared


def write_prepared(prepared: Prepared, output, *, labels_output=None, landmarks_output=None) -> dict:
    """Write the image (uint8), labels (int32) and landmark CSV (LUMIR voxel coordinates) atomically,
    and beside the image the maps back to the native T1 (:func:`sidecar_paths`)."""
    written = {"image": save_volume(prepared.image, output, prepared.vox2world, np.uint8)}
    if prepared.native_vox2world is not None:
        written.update(_write_sidecars(prepared, output))
    if prepared.labels is not None and labels_output is not None:
        written["labels"] = save_volume(prepared.labels, labels_output, prepared.vox2world, np.int32)
    if prepared.landmarks is not None and landmarks_output is not None:
        with atomic_output(landmarks_output) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "name", "x", "y", "z"])
            for i, name, x, y, z in prepared.landmarks:
                writer.writerow([i, name, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"])
        written["landmarks"] = Path(landmarks_output)
    return written


def _write_sidecars(prepared: Prepared, output) -> dict:
    """The JSON record and, where ITK can hold the native grid, the ITK affine."""
    record_path, affine_path = sidecar_paths(output)
    record = Record(native_image=prepared.source or "", native_shape=tuple(prepared.native_shape),
                    native_vox2world=np.asarray(prepared.native_vox2world, np.float64),
                    template_shape=tuple(prepared.image.shape), template_vox2world=np.asarray(prepared.vox2world, np.float64),
                    template_vox2native_vox=np.asarray(prepared.template_vox2native_vox, np.float64))
    with atomic_output(record_path) as tmp:
        tmp.write_text(json.dumps(dict(record.as_json(), itk_affine=affine_path.name), indent=2))
    written = {"record": record_path}
    try:
        check_itk_grid(record.native_vox2world, "the native T1")
    except InputError as err:
        log.warning("no ITK affine written: %s", err)
        return written
    written["affine"] = write_itk_affine(record.template_world2native_world, affine_path)
    return written


def prepare_folder(folder, output_dir, *, prefix: str = "PREP", progress=None) -> Path:
    """Prepare every NIfTI in `folder` into ``output_dir/imagesTr/{prefix}_{NNNN}_0000.nii.gz`` (each
    with its record and ITK affine beside it) and write a LUMIR-style ``dataset.json`` (``training``
    list; ``source`` maps each ID to its input).
    `progress`, if given, is called with (number done, number of images, input path) after each image."""
    folder, output_dir = Path(folder), Path(output_dir)
    inputs = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not inputs:
        raise InputError(f"no .nii / .nii.gz files in '{folder}'.")
    training, sources = [], {}
    for number, path in enumerate(inputs):
        name = f"{prefix}_{number:04d}_0000.nii.gz"
        write_prepared(prepare(path), output_dir / "imagesTr" / name)
        training.append({"image": f"./imagesTr/{name}"})
        sources[f"{number:04d}"] = str(path)
        log.info("prepared %s -> %s", path, name)
        if progress is not None:
            progress(number + 1, len(inputs), path)
    dataset = {"name": f"{folder.name} in LUMIR geometry (jaxreg prepare)", "tensorImageShape": {"0": [160, 224, 192]},
               "numTraining": len(training), "training": training, "numValidation": 0, "validation": [],
               "source": sources}
    with atomic_output(output_dir / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset, indent=2))
    return output_dir / "dataset.json"
