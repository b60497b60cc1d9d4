"""Dataset JSON and evaluation configs -> pair records, every path checked before any work starts.

Two LUMIR file formats are read here:

- the dataset JSON (``LUMIR25_dataset.json`` layout): ``validation`` is a list of
  ``{"fixed": "./imagesVal/X_0002_0000.nii.gz", "moving": "./imagesVal/X_0001_0000.nii.gz"}``,
  paths relative to the JSON's folder; the 4-digit subject ID is ``path[-16:-12]`` and the field
  of a pair is ``disp_{FIXED_ID}_{MOVING_ID}.nii.gz``;
- the evaluation config (``*_evaluation_config.json``): ``evaluation_methods`` (``ndv``,
  ``dice``/``hd95`` with ``labels``, ``tre`` with ``dest``), ``eval_pairs``, optionally
  ``expected_shape``. jaxreg also reads the superset used by its benchmark folders: a ``metrics``
  list on each pair (only those methods run on it), a top-level ``labels`` list and ``label_dirs``
  (the folder replacing the image folder for each metric's files). Without ``label_dirs`` the
  LUMIR rule applies: ``images`` -> ``labels`` (Dice, HD95) or -> ``dest`` (TRE) in the path.

Every file a run needs is checked here, so a typo fails in a second with a one-line message, not
after an hour of registration.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "EvalPair",
    "EvaluationConfig",
    "Pair",
    "default_evaluation_config",
    "find_dataset_json",
    "load_evaluation_config",
    "load_keypoints_csv",
    "load_pairs",
    "resolve_evaluation_config",
    "subject_id",
]

#: Metric names a config may list (LUMIR's, plus Learn2Reg's ``sdlogj``).
METRICS = ("ndv", "dice", "hd95", "tre", "sdlogj")
_LABEL_METRICS = ("dice", "hd95")
_DATASET_JSON = "dataset.json"
_CONFIG_JSON = "evaluation_config.json"


def subject_id(path: str | os.PathLike) -> str:
    """The 4-digit subject ID of a LUMIR file name: ``name[-16:-12]`` of ``X_0002_0000.nii.gz``."""
    text = str(path)
    sid = text[-16:-12]
    if not (text.endswith(".nii.gz") and len(text) >= 16 and sid.isdigit() and text[-12] == "_"
            and text[-17:-16] == "_"):
        raise InputError(f"image name '{text}' does not end in _NNNN_MMMM.nii.gz: LUMIR takes the "
                         "subject ID from the 4 digits at name[-16:-12]; rename the file.")
    return sid


@dataclass(frozen=True)
class Pair:
    """One registration: the fixed and moving image files and their subject IDs.

    Attributes:
        fixed, moving: absolute paths of the images.
        fixed_id, moving_id: 4-digit subject IDs (``path[-16:-12]``).
    """

    fixed: Path
    moving: Path
    fixed_id: str
    moving_id: str

    @classmethod
    def from_paths(cls, fixed: str | os.PathLike, moving: str | os.PathLike) -> "Pair":
        return cls(Path(fixed), Path(moving), subject_id(fixed), subject_id(moving))

    @property
    def field_name(self) -> str:
        """File name of the pair's displacement field, LUMIR's short form."""
        return f"disp_{self.fixed_id}_{self.moving_id}.nii.gz"

    @property
    def key(self) -> str:
        """``FIXED_MOVING``, e.g. ``0002_0001``: the pair's key in reports."""
        return f"{self.fixed_id}_{self.moving_id}"

    @property
    def label(self) -> str:
        """``FIXED<-MOVING``, e.g. ``0002<-0001``: how the pair is shown to people."""
        return f"{self.fixed_id}<-{self.moving_id}"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist: check the path.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{what} '{path}' cannot be read as JSON ({str(err).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a JSON object at the top level.")
    return data


def _existing(base: Path, relative, what: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"{what}: expected a file path string, got {relative!r}.")
    path = (base / relative).resolve()
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist: check the path (paths are relative to '{base}').")
    return path


def find_dataset_json(dataset: str | os.PathLike) -> Path:
    """The dataset JSON: `dataset` itself if it is a file, else ``dataset.json`` or the one ``*_dataset.json`` in it."""
    dataset = Path(dataset)
    if dataset.is_file():
        return dataset
    if not dataset.is_dir():
        raise InputError(f"dataset '{dataset}' does not exist: give the dataset folder or its JSON file.")
    if (dataset / _DATASET_JSON).is_file():
        return dataset / _DATASET_JSON
    candidates = sorted(dataset.glob("*_dataset.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"no {_DATASET_JSON} or *_dataset.json in '{dataset}': give the dataset JSON file itself.")
    names = ", ".join(c.name for c in candidates)
    raise InputError(f"several dataset JSON files in '{dataset}' ({names}): give the one to use.")


def load_pairs(json_path: str | os.PathLike, split: str = "validation") -> list[Pair]:
    """Read the pairs of one split of a LUMIR dataset JSON, checking that every image exists.

    Arguments:
        json_path: the dataset JSON, or the folder holding it (see :func:`find_dataset_json`).
        split: the list to read (``validation`` in LUMIR; any list of fixed/moving entries).

    Returns:
        The pairs in file order; image paths are absolute (relative ones are resolved against the
        JSON's folder). Labels are not needed, nor looked for.

    Raises:
        InputError: a missing image, a file name without a LUMIR subject ID, a malformed entry.
    """
    json_path = find_dataset_json(json_path)
    data = _read_json(json_path, "dataset JSON")
    if split not in data or not isinstance(data[split], list):
        lists = ", ".join(k for k, v in data.items() if isinstance(v, list)) or "none"
        raise ConfigError(f"dataset JSON '{json_path}' has no '{split}' list of pairs (lists: {lists}).")
    base = json_path.parent
    pairs = []
    for index, entry in enumerate(data[split]):
        if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
            raise ConfigError(f"dataset JSON '{json_path}', {split}[{index}]: expected an object with "
                              f"'fixed' and 'moving', got {entry!r} (split '{split}' may list single images).")
        fixed = _existing(base, entry["fixed"], f"{split}[{index}] fixed image")
        moving = _existing(base, entry["moving"], f"{split}[{index}] moving image")
        pairs.append(Pair(fixed, moving, subject_id(entry["fixed"]), subject_id(entry["moving"])))
    if not pairs:
        raise ConfigError(f"dataset JSON '{json_path}': the '{split}' list is empty.")
    return pairs


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
    """

    name: str
    pairs: tuple[EvalPair, ...]
    dice_labels: tuple[int, ...] | None = None
    hd95_labels: tuple[int, ...] | None = None
    expected_shape: tuple[int, int, int] | None = None
    source: str = field(default="", compare=False)


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


def _reference_path(image: str, folder: str | None, lumir_word: str) -> str:
    """Where a reference file of `image` lives: its folder replaced, or LUMIR's 'images' -> word rule."""
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


def _keypoint_csv(landmarks: Path) -> Path | None:
    name = landmarks.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            csv_path = landmarks.with_name(name[: -len(suffix)] + ".csv")
            return csv_path if csv_path.is_file() else None
    return None


def _build_pair(base: Path, entry: dict, index: int, metrics: tuple[str, ...],
                label_dirs: dict, tre_dest: str, where: str) -> EvalPair:
    if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
        raise ConfigError(f"{where}: eval_pairs[{index}] must be an object with 'fixed' and 'moving'.")
    fixed_rel, moving_rel = entry["fixed"], entry["moving"]
    pair = Pair(_existing(base, fixed_rel, f"eval_pairs[{index}] fixed image"),
                _existing(base, moving_rel, f"eval_pairs[{index}] moving image"),
                subject_id(fixed_rel), subject_id(moving_rel))
    files = {}
    if any(m in metrics for m in _LABEL_METRICS):
        folder = label_dirs.get("dice", label_dirs.get("hd95"))
        files["fixed_labels"] = _existing(base, _reference_path(fixed_rel, folder, "labels"),
                                          f"pair {pair.label}: fixed label map")
        files["moving_labels"] = _existing(base, _reference_path(moving_rel, folder, "labels"),
                                           f"pair {pair.label}: moving label map")
    if "tre" in metrics:
        folder = label_dirs.get("tre")
        fixed_lm = _existing(base, _reference_path(fixed_rel, folder, tre_dest), f"pair {pair.label}: fixed landmark volume")
        moving_lm = _existing(base, _reference_path(moving_rel, folder, tre_dest), f"pair {pair.label}: moving landmark volume")
        files.update(fixed_landmarks=fixed_lm, moving_landmarks=moving_lm)
        fixed_csv, moving_csv = _keypoint_csv(fixed_lm), _keypoint_csv(moving_lm)
        if fixed_csv is not None and moving_csv is not None:
            files.update(fixed_keypoints=fixed_csv, moving_keypoints=moving_csv)
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
    data = _read_json(config_path, "evaluation config")
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
        pairs.append(_build_pair(base, entry, index, metrics, label_dirs, tre_dest, where))
    return EvaluationConfig(
        name=str(data.get("name", config_path.stem)),
        pairs=tuple(pairs),
        dice_labels=dice_labels,
        hd95_labels=hd95_labels,
        expected_shape=_spatial_shape(data.get("expected_shape"), where),
        source=str(config_path),
    )


def default_evaluation_config(dataset: str | os.PathLike) -> EvaluationConfig:
    """The config used when a dataset has none: its validation pairs, scored with what its files allow.

    Every pair gets ``ndv``; ``dice`` and ``hd95`` (over every label found in the two maps,
    background 0 included) when both label maps exist (LUMIR rule ``images`` -> ``labels``);
    ``tre`` when both landmark volumes exist (``images`` -> ``landmarks``). ``source`` says so.
    """
    json_path = find_dataset_json(dataset)
    data = _read_json(json_path, "dataset JSON")
    base = json_path.parent.resolve()
    pairs = load_pairs(json_path, "validation")
    entries = data["validation"]
    result = []
    for index, (pair, entry) in enumerate(zip(pairs, entries)):
        metrics = ["ndv"]
        if all((base / _reference_path(entry[k], None, "labels")).is_file() for k in ("fixed", "moving")):
            metrics += ["dice", "hd95"]
        if all((base / _reference_path(entry[k], None, "landmarks")).is_file() for k in ("fixed", "moving")):
            metrics.append("tre")
        result.append(_build_pair(base, entry, index, tuple(metrics), {}, "landmarks", str(json_path)))
    n_seg = sum("dice" in p.metrics for p in result)
    n_tre = sum("tre" in p.metrics for p in result)
    source = (f"default (no evaluation config): the {len(result)} validation pairs of {json_path}; ndv on all, "
              f"dice+hd95 over all labels found (incl. 0) on the {n_seg} with label maps, "
              f"tre on the {n_tre} with landmark volumes")
    return EvaluationConfig(name=str(data.get("name", json_path.stem)), pairs=tuple(result), source=source)


def resolve_evaluation_config(dataset_dir: str | os.PathLike,
                              config_path: str | os.PathLike | None = None) -> EvaluationConfig:
    """The config ``jaxreg evaluate`` uses: `config_path` if given, else ``evaluation_config.json`` in
    the dataset folder (`dataset_dir` may also be the dataset JSON) if present, else
    :func:`default_evaluation_config`. ``source`` of the result says which."""
    dataset_dir = Path(dataset_dir)
    folder = dataset_dir if dataset_dir.is_dir() else dataset_dir.parent
    if config_path is not None:
        return load_evaluation_config(config_path, folder)
    if (folder / _CONFIG_JSON).is_file():
        return load_evaluation_config(folder / _CONFIG_JSON, folder)
    config = default_evaluation_config(dataset_dir)
    logger.info("%s", config.source)
    return config
