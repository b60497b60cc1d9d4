"""What to score on which pair: evaluation configs, and the one default rule for datasets without one.

A LUMIR evaluation config (``*_evaluation_config.json``) lists ``evaluation_methods`` (``ndv``,
``dice``/``hd95`` with ``labels``, ``tre`` with ``dest``), ``eval_pairs`` and optionally
``expected_shape``. jaxreg also reads the superset used by its benchmark folders: a ``metrics``
list on each pair (only those methods run on it), a top-level ``labels`` list and ``label_dirs``
(the folder replacing the image folder for each metric's files). Without ``label_dirs`` the LUMIR
rule applies: ``images`` -> ``labels`` (Dice, HD95) or -> ``dest`` (TRE) in the path.

Without a config, :func:`default_eval_pair` decides for each pair from the files next to its
images; ``jaxreg evaluate`` (:func:`resolve_evaluation_config`) and ``jaxreg batch --evaluate``
(:func:`evaluation_for`) both use it, so they score the same metrics. Every reference file is
checked here, before anything is registered or scored.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from ..dataset import Pair, existing_file, find_dataset_json, load_pairs, modality_code, read_json, subject_id
from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_JSON",
    "METRICS",
    "EvalPair",
    "EvaluationConfig",
    "default_eval_pair",
    "evaluation_for",
    "load_evaluation_config",
    "load_keypoints_csv",
    "resolve_evaluation_config",
]

#: Metric names a config may list (LUMIR's, plus Learn2Reg's ``sdlogj``).
METRICS = ("ndv", "dice", "hd95", "tre", "sdlogj")
#: The config file looked for in a dataset folder.
CONFIG_JSON = "evaluation_config.json"
_LABEL_METRICS = ("dice", "hd95")


@dataclass(frozen=True)
class EvalPair:
    """A pair to score, the metrics that apply to it and the reference files they need.

    ``*_labels`` are label maps (Dice, HD95), ``*_landmarks`` landmark volumes (LUMIR TRE) and
    ``*_keypoints`` the optional landmark CSVs next to them (keypoint TRE). None when unused.
    """

    pair: Pair
    metrics: tuple[str, ...]
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    fixed_keypoints: Path | None = None
    moving_keypoints: Path | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    """What to score: the pairs, their metrics, the label lists and where the config came from.

    Attributes:
        name: a name for reports.
        pairs: the pairs, in config order.
        dice_labels, hd95_labels: labels scored by Dice / HD95 (LUMIR includes background 0);
            None means every label found in the pair's two maps.
        expected_shape: the field grid (X, Y, Z) the config demands, or None (then the fixed image's).
        source: the config file, or a sentence describing the default that was used.
        method_names: the config's ``evaluation_methods`` as ``{metric: name}`` in file order
            (``{"ndv": "Non-diffeomorphic Volumes", "dice": "DSC", ...}``): the keys of the
            official evaluator's ``metrics.json``; empty for the default rule.
    """

    name: str
    pairs: tuple[EvalPair, ...]
    dice_labels: tuple[int, ...] | None = None
    hd95_labels: tuple[int, ...] | None = None
    expected_shape: tuple[int, int, int] | None = None
    source: str = field(default="", compare=False)
    method_names: dict = field(default_factory=dict, compare=False)


def load_keypoints_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a landmark CSV with columns ``id,name,x,y,z`` (float voxel coordinates).

    Returns:
        (ids, points): int array (N,) and float64 array (N, 3), in file order.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        ids = np.array([int(row["id"]) for row in rows], dtype=np.int64)
        points = np.array([[float(row[k]) for k in ("x", "y", "z")] for row in rows], dtype=np.float64).reshape(-1, 3)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"landmark CSV '{path}' cannot be read ({type(err).__name__}: {err}): "
                         "expected columns id,name,x,y,z.") from None
    if len(np.unique(ids)) != len(ids):
        raise InputError(f"landmark CSV '{path}' lists an id twice: each landmark id must be unique.")
    return ids, points


def _keypoint_csv(landmarks: Path) -> Path | None:
    """The landmark CSV beside a landmark volume (``X.nii.gz`` -> ``X.csv``), if it exists."""
    name = landmarks.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            csv_path = landmarks.with_name(name[: -len(suffix)] + ".csv")
            return csv_path if csv_path.is_file() else None
    return None


def _landmark_files(fixed_landmarks: Path, moving_landmarks: Path) -> dict:
    """The TRE reference files of a pair: both landmark volumes, plus both CSVs when both exist."""
    files = {"fixed_landmarks": fixed_landmarks, "moving_landmarks": moving_landmarks}
    fixed_csv, moving_csv = _keypoint_csv(fixed_landmarks), _keypoint_csv(moving_landmarks)
    if fixed_csv is not None and moving_csv is not None:
        files.update(fixed_keypoints=fixed_csv, moving_keypoints=moving_csv)
    return files


# --------------------------------------------------------------------------------------------
# the default rule
# --------------------------------------------------------------------------------------------

def _reference_file(image: Path, word: str) -> Path:
    """LUMIR's rule on the image's folder: ``imagesVal/X.nii.gz`` -> ``{word}Val/X.nii.gz``."""
    return image.parent.parent / image.parent.name.replace("images", word) / image.name


def default_eval_pair(pair: Pair) -> EvalPair:
    """How a pair is scored when no config lists it, from the files next to its images.

    Every pair gets ``ndv``; ``dice`` and ``hd95`` (over every label found in the two maps,
    background 0 included) when both label maps exist (``imagesVal/X`` -> ``labelsVal/X``);
    ``tre`` when both landmark volumes exist (``imagesVal/X`` -> ``landmarksVal/X``), on their
    keypoints too when both landmark CSVs lie beside them (``landmarksVal/X.csv``).
    """
    metrics = ["ndv"]
    files: dict = {}
    fixed_labels, moving_labels = _reference_file(pair.fixed, "labels"), _reference_file(pair.moving, "labels")
    if fixed_labels.is_file() and moving_labels.is_file():
        metrics += ["dice", "hd95"]
        files.update(fixed_labels=fixed_labels, moving_labels=moving_labels)
    fixed_lm, moving_lm = _reference_file(pair.fixed, "landmarks"), _reference_file(pair.moving, "landmarks")
    if fixed_lm.is_file() and moving_lm.is_file():
        metrics.append("tre")
        files.update(_landmark_files(fixed_lm, moving_lm))
    return EvalPair(pair=pair, metrics=tuple(metrics), **files)


def _default_config(pairs: Sequence[Pair], name: str, where: str) -> EvaluationConfig:
    """Every pair under :func:`default_eval_pair`; ``source`` says what the rule found."""
    items = tuple(default_eval_pair(pair) for pair in pairs)
    n_seg = sum("dice" in item.metrics for item in items)
    n_tre = sum("tre" in item.metrics for item in items)
    n_kp = sum(item.fixed_keypoints is not None for item in items)
    source = (f"default (no evaluation config): the {len(items)} pairs of {where}; ndv on all, dice+hd95 over all "
              f"labels found (incl. 0) on the {n_seg} with label maps, tre on the {n_tre} with landmark volumes "
              f"({n_kp} with landmark CSVs)")
    return EvaluationConfig(name=name, pairs=items, source=source)


# --------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------

def _label_list(value, where: str) -> tuple[int, ...]:
    def is_integer(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()

    if not isinstance(value, list) or not value or not all(is_integer(v) for v in value):
        raise ConfigError(f"{where}: 'labels' must be a non-empty list of integers.")
    labels = tuple(int(v) for v in value)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: 'labels' lists a label twice.")
    return labels


def _spatial_shape(value, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'expected_shape' must be a list like [160, 224, 192, 3].") from None
    if len(shape) == 4 and shape[-1] == 3:
        return shape[:3]
    if len(shape) == 4 and shape[0] == 3:
        return shape[1:]
    if len(shape) == 3:
        return shape
    raise ConfigError(f"{where}: 'expected_shape' {list(shape)} is not [X, Y, Z, 3].")


def _config_reference_path(image: str, folder: str | None, lumir_word: str) -> str:
    """Where a config's reference file of `image` lives: its folder replaced, or the official
    evaluator's rule on the path as written in the config (``images`` -> word)."""
    if folder is not None:
        p = PurePosixPath(image)
        return str(p.parent.parent / folder / p.name)
    return image.replace("images", lumir_word)


def _check_metrics(names, where: str) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: 'metrics' must be a list of names from {list(METRICS)}.")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"{where}: unknown metric(s) {unknown}: must be among {list(METRICS)}.")
    return tuple(dict.fromkeys(names))


def _config_pair(base: Path, entry: dict, index: int, metrics: tuple[str, ...],
                 label_dirs: dict, tre_dest: str, where: str) -> EvalPair:
    if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
        raise ConfigError(f"{where}: eval_pairs[{index}] must be an object with 'fixed' and 'moving'.")
    fixed_rel, moving_rel = entry["fixed"], entry["moving"]
    pair = Pair(existing_file(base, fixed_rel, f"eval_pairs[{index}] fixed image"),
                existing_file(base, moving_rel, f"eval_pairs[{index}] moving image"),
                subject_id(fixed_rel), subject_id(moving_rel), modality_code(fixed_rel), modality_code(moving_rel))
    files: dict = {}
    if any(m in metrics for m in _LABEL_METRICS):
        folder = label_dirs.get("dice", label_dirs.get("hd95"))
        files["fixed_labels"] = existing_file(base, _config_reference_path(fixed_rel, folder, "labels"),
                                              f"pair {pair.label}: fixed label map")
        files["moving_labels"] = existing_file(base, _config_reference_path(moving_rel, folder, "labels"),
                                               f"pair {pair.label}: moving label map")
    if "tre" in metrics:
        folder = label_dirs.get("tre")
        files.update(_landmark_files(
            existing_file(base, _config_reference_path(fixed_rel, folder, tre_dest), f"pair {pair.label}: fixed landmark volume"),
            existing_file(base, _config_reference_path(moving_rel, folder, tre_dest), f"pair {pair.label}: moving landmark volume")))
    return EvalPair(pair=pair, metrics=metrics, **files)


def load_evaluation_config(config_path: str | os.PathLike,
                           dataset_dir: str | os.PathLike | None = None) -> EvaluationConfig:
    """Read a LUMIR evaluation config (or jaxreg's per-pair superset) and check every file it needs.

    Arguments:
        config_path: the ``*_evaluation_config.json``.
        dataset_dir: the folder the config's paths are relative to (default: the config's folder).

    Raises:
        ConfigError: unknown metric, malformed entry, Dice/HD95 labels given in neither place.
        InputError: a missing image, label map or landmark volume (named, with its pair).
    """
    config_path = Path(config_path)
    data = read_json(config_path, "evaluation config")
    where = f"evaluation config '{config_path}'"
    base = Path(dataset_dir) if dataset_dir is not None else config_path.parent
    if not base.is_dir():
        raise InputError(f"dataset folder '{base}' does not exist.")
    base = base.resolve()

    methods = data.get("evaluation_methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, dict) and "metric" in m for m in methods):
        raise ConfigError(f"{where}: 'evaluation_methods' must be a list of objects with a 'metric'.")
    method_names = _check_metrics([m["metric"] for m in methods], where)
    by_metric = {m["metric"]: m for m in methods}
    top_labels = _label_list(data["labels"], where) if "labels" in data else None
    dice_labels = _label_list(by_metric["dice"]["labels"], where) if "labels" in by_metric.get("dice", {}) else top_labels
    hd95_labels = _label_list(by_metric["hd95"]["labels"], where) if "labels" in by_metric.get("hd95", {}) else top_labels
    tre_dest = str(by_metric.get("tre", {}).get("dest", "landmarks"))
    label_dirs = data.get("label_dirs", {}) or {}
    if not isinstance(label_dirs, dict) or not all(isinstance(v, str) for v in label_dirs.values()):
        raise ConfigError(f"{where}: 'label_dirs' must map metric names to folder names.")

    entries = data.get("eval_pairs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'eval_pairs' must be a non-empty list of fixed/moving pairs.")
    pairs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "metrics" in entry:
            metrics = _check_metrics(entry["metrics"], f"{where}, eval_pairs[{index}]")
        else:
            metrics = method_names
        pairs.append(_config_pair(base, entry, index, metrics, label_dirs, tre_dest, where))
    return EvaluationConfig(
        name=str(data.get("name", config_path.stem)),
        pairs=tuple(pairs),
        dice_labels=dice_labels,
        hd95_labels=hd95_labels,
        expected_shape=_spatial_shape(data.get("expected_shape"), where),
        source=str(config_path),
        method_names={m["metric"]: str(m.get("name", m["metric"])) for m in methods},
    )


# --------------------------------------------------------------------------------------------
# choosing the config
# --------------------------------------------------------------------------------------------

def _folder_of(dataset: str | os.PathLike) -> Path:
    dataset = Path(dataset)
    return dataset if dataset.is_dir() else dataset.parent


def evaluation_for(pairs: Sequence[Pair], dataset_dir: str | os.PathLike, config_path: str | os.PathLike | None = None,
                   *, name: str | None = None) -> EvaluationConfig:
    """How to score exactly `pairs` (a batch run's): for each pair the entry of the evaluation
    config (`config_path`, else ``dataset_dir/evaluation_config.json`` when present) that lists
    the same fixed and moving files, else :func:`default_eval_pair`. Every reference file is
    checked here, before anything is compiled."""
    dataset_dir = Path(dataset_dir)
    if config_path is None and (dataset_dir / CONFIG_JSON).is_file():
        config_path = dataset_dir / CONFIG_JSON
    if config_path is None:
        config = _default_config(pairs, name or dataset_dir.name, f"this run in {dataset_dir}")
    else:
        listed = load_evaluation_config(config_path, dataset_dir)
        known = {(item.pair.fixed.resolve(), item.pair.moving.resolve()): item for item in listed.pairs}
        items, unlisted = [], 0
        for pair in pairs:
            item = known.get((pair.fixed.resolve(), pair.moving.resolve()))
            unlisted += item is None
            items.append(default_eval_pair(pair) if item is None else replace(item, pair=pair))
        config = replace(listed, pairs=tuple(items),
                         source=f"{listed.source}" + (f" (default rule for the {unlisted} pairs it does not list)"
                                                      if unlisted else ""))
    if not any("dice" in item.metrics for item in config.pairs):
        logger.info("no label maps for these pairs: evaluation gives NDV and SDlogJ only")
    return config


def resolve_evaluation_config(dataset: str | os.PathLike,
                              config_path: str | os.PathLike | None = None) -> EvaluationConfig:
    """What ``jaxreg evaluate`` scores: the pairs of `config_path` if given, else of
    ``evaluation_config.json`` in the dataset folder (`dataset` may also be the dataset JSON), else
    the dataset's validation pairs under :func:`default_eval_pair`. ``source`` says which."""
    folder = _folder_of(dataset)
    if config_path is not None:
        return load_evaluation_config(config_path, folder)
    if (folder / CONFIG_JSON).is_file():
        return load_evaluation_config(folder / CONFIG_JSON, folder)
    json_path = find_dataset_json(dataset)
    name = str(read_json(json_path, "dataset JSON").get("name", json_path.stem))
    config = _default_config(load_pairs(json_path, "validation"), name, f"the validation list of {json_path}")
    logger.info("%s", config.source)
    return config
