"""Score a folder of displacement fields against a dataset with the official LUMIR metrics.

For every pair of an :class:`~jaxreg.evaluation.config.EvaluationConfig` the field
``disp_{FIXED}_{MOVING}.nii.gz`` is read from the fields folder (a LUMIR field, or an ITK
displacement field that another tool wrote, converted with the pair's image headers:
:func:`jaxreg.transforms.load_as_lumir`) and scored with the metrics that
apply to the pair (:mod:`jaxreg.evaluation.metrics`): Dice and HD95 over the label list, TRE on landmark
volumes (LUMIR's centroid version, ``tre_lm``) and, when landmark CSVs exist, on keypoints
(``tre_kp``), NDV with the fixed (default) or moving image mask, and SDlogJ on every pair.

Missing fields are an error before anything is scored, unless ``allow_missing`` is set: then
they are reported by name and counted. A field on the wrong grid (e.g. half resolution) or with
NaN/inf is reported by name and counted, never skipped silently: ``report.ok`` is False then. The
report (:mod:`jaxreg.evaluation.report`) gives, per metric and over the scored pairs, the mean,
the standard deviation and the 30 % quantile, as the LUMIR leaderboard aggregates.

Pairs are scored by a small thread pool (the heavy NumPy/SciPy work releases the GIL); each
reference volume is read once and dropped when its last pair is done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from . import metrics
from ..errors import ConfigError, InputError
from ..io import load_labels, load_volume
from ..transforms import FIELD_CONVENTIONS, detect_convention, load_as_lumir
from .config import EvalPair, EvaluationConfig, load_keypoints_csv
from .report import EvaluationReport, PairResult, build_report

logger = logging.getLogger(__name__)

__all__ = ["NDV_MASKS", "evaluate_fields", "label_metrics"]

NDV_MASKS = ("fixed", "moving")


# --------------------------------------------------------------------------------------------
# reading each reference volume once
# --------------------------------------------------------------------------------------------

class _VolumeCache:
    """Loads each reference file once, shares it between threads, drops it after its last use."""

    def __init__(self, uses: Counter):
        self._uses = uses
        self._values: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()

    def get(self, kind: str, path: Path, loader):
        key = (kind, path)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = loader(path)
            return self._values[key]

    def release(self, kind: str, path: Path) -> None:
        key = (kind, path)
        with self._guard:
            self._uses[key] -= 1
            if self._uses[key] <= 0:
                self._values.pop(key, None)


def _load_mask(path: Path) -> np.ndarray:
    image, _ = load_volume(path, "image")
    return metrics.image_mask(image)


def _load_label_map(path: Path) -> np.ndarray:
    return load_labels(path, "label map")


def _load_landmarks(path: Path) -> np.ndarray:
    return load_labels(path, "landmark volume")


def _needs(item: EvalPair, ndv_mask: str) -> list[tuple[str, Path]]:
    """The (kind, path) reference files scoring `item` reads."""
    needs = [("mask", item.pair.fixed if ndv_mask == "fixed" else item.pair.moving)]
    if item.fixed_labels is not None:
        needs += [("labels", item.fixed_labels), ("labels", item.moving_labels)]
    if item.fixed_landmarks is not None:
        needs += [("landmarks", item.fixed_landmarks), ("landmarks", item.moving_landmarks)]
    if item.fixed_keypoints is not None:
        needs += [("keypoints", item.fixed_keypoints), ("keypoints", item.moving_keypoints)]
    return needs


_LOADERS = {"mask": _load_mask, "labels": _load_label_map, "landmarks": _load_landmarks,
            "keypoints": load_keypoints_csv}


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------

def _grid_shape(item: EvalPair, config: EvaluationConfig) -> tuple[int, int, int]:
    if config.expected_shape is not None:
        return config.expected_shape
    try:
        return tuple(int(n) for n in nib.load(str(item.pair.fixed)).shape[:3])
    except Exception as err:  # nibabel raises many types for a corrupt header
        raise InputError(f"fixed image '{item.pair.fixed}' cannot be read as NIfTI ({err}).") from None


def _labels_for(chosen, fixed_labels: np.ndarray, moving_labels: np.ndarray) -> np.ndarray:
    """The configured label list, or every label found in the two maps."""
    if chosen is not None:
        return np.asarray(chosen, dtype=np.int64)
    found = []
    for label_map in (fixed_labels, moving_labels):
        if label_map.min() >= 0 and label_map.max() < 10_000_000:  # a histogram is faster than sorting
            found.append(np.flatnonzero(np.bincount(label_map.reshape(-1))))
        else:
            found.append(np.unique(label_map))
    return np.union1d(*found).astype(np.int64)


def _as_list(values: np.ndarray) -> list:
    return [float(v) for v in values]


def label_metrics(fixed_labels: np.ndarray, moving_labels: np.ndarray, disp: np.ndarray, config: EvaluationConfig,
                  wanted, pair: str | None = None) -> tuple[dict, dict]:
    """Dice and/or HD95 (those in `wanted`) of the moving label map warped through `disp` (nearest
    neighbour, as LUMIR), over the config's label lists; `pair` is named in the warning about labels
    that vanished. Returns (values, per-label details)."""
    values: dict = {}
    details: dict = {}
    warped = metrics.warp_labels(moving_labels, disp)
    for name, score, label_list in (("dice", metrics.dice, config.dice_labels),
                                    ("hd95", metrics.hd95, config.hd95_labels)):
        if name not in wanted:
            continue
        labels = _labels_for(label_list, fixed_labels, moving_labels)
        per_label = score(fixed_labels, warped, moving_labels, labels, **({"pair": pair} if name == "hd95" else {}))
        values[name] = metrics.nan_mean(per_label)
        details[f"{name}_labels"] = [int(v) for v in labels]
        details[f"{name}_per_label"] = _as_list(per_label)
        if name == "hd95":  # a structure that vanished under the warp has an infinite HD95
            details["hd95_vanished"] = [int(v) for v, h in zip(labels, per_label) if np.isposinf(h)]
    return values, details


def _score_pair(item: EvalPair, config: EvaluationConfig, fields_dir: Path, cache: _VolumeCache,
                ndv_mask: str, keypoint_order: int, field_convention: str) -> PairResult:
    pair = item.pair
    start = time.perf_counter()
    field_path = fields_dir / pair.field_name
    result = {"key": pair.key, "label": pair.label, "field": pair.field_name}
    if not field_path.is_file():
        return PairResult(status="missing", error=f"displacement field '{field_path}' does not exist", **result)
    try:
        convention = detect_convention(field_path, field_convention)
        disp = load_as_lumir(field_path, fixed=pair.fixed, moving=pair.moving, convention=convention,
                             shape=_grid_shape(item, config))
    except InputError as err:
        return PairResult(status="invalid", error=str(err), seconds=time.perf_counter() - start, **result)

    values: dict = {}
    details: dict = {} if convention == "lumir" else {"field_convention": convention}
    if "dice" in item.metrics or "hd95" in item.metrics:
        fixed_labels = cache.get("labels", item.fixed_labels, _load_label_map)
        moving_labels = cache.get("labels", item.moving_labels, _load_label_map)
        label_values, label_details = label_metrics(fixed_labels, moving_labels, disp, config, item.metrics,
                                                    pair=pair.label)
        values.update(label_values)
        details.update(label_details)
    if "tre" in item.metrics:
        fixed_lm = cache.get("landmarks", item.fixed_landmarks, _load_landmarks)
        moving_lm = cache.get("landmarks", item.moving_landmarks, _load_landmarks)
        tre = metrics.tre_landmark_volumes(fixed_lm, moving_lm, disp, pair=pair.label)
        values["tre_lm"] = tre.mean
        details["tre_lm_landmarks"] = [int(v) for v in tre.landmarks]
        details["tre_lm_per_landmark"] = _as_list(tre.distances)
        details["tre_vanished"] = list(tre.vanished)
        if item.fixed_keypoints is not None:
            fixed_ids, fixed_pts = cache.get("keypoints", item.fixed_keypoints, load_keypoints_csv)
            moving_ids, moving_pts = cache.get("keypoints", item.moving_keypoints, load_keypoints_csv)
            if set(fixed_ids.tolist()) != set(moving_ids.tolist()):
                raise InputError(f"pair {pair.label}: landmark CSVs '{item.fixed_keypoints}' and "
                                 f"'{item.moving_keypoints}' list different landmark ids.")
            order = {int(i): k for k, i in enumerate(moving_ids)}
            moving_sorted = moving_pts[[order[int(i)] for i in fixed_ids]]
            distances = metrics.tre_keypoints(fixed_pts, moving_sorted, disp, order=keypoint_order)
            values["tre_kp"] = float(np.mean(distances))
            details["tre_kp_ids"] = [int(i) for i in fixed_ids]
            details["tre_kp_per_landmark"] = _as_list(distances)
    if "ndv" in item.metrics:
        mask_image = pair.fixed if ndv_mask == "fixed" else pair.moving
        mask = cache.get("mask", mask_image, _load_mask)
        values["ndv"] = metrics.ndv(disp, mask)
    values["sdlogj"] = metrics.sdlogj(disp)
    seconds = time.perf_counter() - start
    logger.info("scored %s in %.1f s", pair.label, seconds)
    return PairResult(status="ok", values=values, details=details, seconds=seconds, **result)


def _missing_fields(fields_dir: Path, config: EvaluationConfig) -> list[str]:
    return [item.pair.field_name for item in config.pairs if not (fields_dir / item.pair.field_name).is_file()]


def evaluate_fields(fields_dir: str | os.PathLike, config: EvaluationConfig, *, ndv_mask: str = "fixed",
                    keypoint_order: int = 1, workers: int | None = None,
                    progress: Callable[[PairResult], None] | None = None,
                    allow_missing: bool = False, field_convention: str = "auto") -> EvaluationReport:
    """Score the fields in `fields_dir` on every pair of `config`.

    Arguments:
        fields_dir: folder holding ``disp_{FIXED}_{MOVING}.nii.gz`` files.
        config: pairs and metrics (:func:`jaxreg.evaluation.config.resolve_evaluation_config`).
        ndv_mask: ``fixed`` (LUMIR25, default) or ``moving`` (LUMIR24's evaluator): which image > 0
            masks NDV.
        keypoint_order: interpolation of the field at the keypoints for ``tre_kp``: 1 (linear,
            as ``PEERS.md`` scores) or 3 (Learn2Reg's cubic default).
        workers: threads; default min(pairs, CPU cores, 4).
        progress: called with each pair's :class:`PairResult`, in config order, as soon as it and
            the pairs before it are done (a table can be printed row by row).
        allow_missing: score the fields that exist and report the missing ones (status
            ``missing``, counted in ``report.missing``) instead of refusing to start.
        field_convention: ``auto`` (each file's header says: :func:`jaxreg.transforms.detect_convention`;
            a field it cannot tell is reported ``invalid`` with the reason), ``lumir`` or ``itk``
            (ITK displacement fields, converted with the pair's fixed and moving image headers).

    Returns:
        The report; ``report.ok`` is False if any pair could not be scored (``report.failed``).

    Raises:
        InputError / ConfigError: a problem with the dataset or the options (not with one field),
        or missing fields without `allow_missing`; all before anything is scored.
    """
    fields_dir = Path(fields_dir)
    if not fields_dir.is_dir():
        raise InputError(f"fields folder '{fields_dir}' does not exist: give the folder holding disp_*.nii.gz files.")
    if ndv_mask not in NDV_MASKS:
        raise ConfigError(f"ndv_mask must be one of {list(NDV_MASKS)}, got {ndv_mask!r}.")
    if keypoint_order not in (1, 3):
        raise ConfigError(f"keypoint_order must be 1 (linear) or 3 (cubic), got {keypoint_order!r}.")
    if field_convention not in FIELD_CONVENTIONS:
        raise ConfigError(f"field_convention must be one of {list(FIELD_CONVENTIONS)}, got {field_convention!r}.")
    missing = _missing_fields(fields_dir, config)
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {len(config.pairs)} fields are missing in '{fields_dir}' ({shown}): "
                         "write them, or score the others alone with allow_missing (jaxreg evaluate --allow-missing).")
    if workers is None:
        workers = min(len(config.pairs), os.cpu_count() or 1, 4)
    workers = max(1, int(workers))
    start = time.perf_counter()

    uses = Counter(need for item in config.pairs for need in _needs(item, ndv_mask))
    cache = _VolumeCache(uses)

    def run(item: EvalPair) -> PairResult:
        try:
            return _score_pair(item, config, fields_dir, cache, ndv_mask, keypoint_order, field_convention)
        finally:
            for kind, path in _needs(item, ndv_mask):
                cache.release(kind, path)

    results = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxreg-evaluate") as pool:
        for result in pool.map(run, config.pairs):  # in config order, each as soon as it is done
            results.append(result)
            if progress is not None:
                progress(result)
    for failed in (r for r in results if not r.ok):
        logger.warning("pair %s not scored (%s): %s", failed.label, failed.status, failed.error)
    return build_report(config, fields_dir, results, seconds=time.perf_counter() - start,
                        ndv_mask=ndv_mask, keypoint_order=keypoint_order)
