"""Dataset JSON -> pair records, every image checked before any work starts.

The LUMIR dataset JSON (``LUMIR25_dataset.json`` layout): ``validation`` is a list of
``{"fixed": "./imagesVal/X_0002_0000.nii.gz", "moving": "./imagesVal/X_0001_0000.nii.gz"}``, paths
relative to the JSON's folder (or to a root folder given apart: LUMIR25's test phase mounts the JSON
and the images separately); the 4-digit subject ID is ``path[-16:-12]`` and the field of a pair is
``disp_{FIXED_ID}_{MOVING_ID}.nii.gz``, also when the images differ in modality. The last 4 digits
are the modality (``_0000`` T1w, ``_0001`` another contrast in LUMIR25), as the official evaluator
and the organisers' container example read them (``path[-11:-7]``); the JSON's ``modality`` object
cannot say it (LUMIR25's names only ``0`` while its validation list holds ``_0001`` images). A typo
fails in a second with a one-line message, not after an hour of registration. What to score on the
pairs is :mod:`jaxreg.evaluation.config`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InputError

__all__ = ["Pair", "existing_file", "find_dataset_json", "load_pairs", "modality_code", "read_json", "subject_id"]

_DATASET_JSON = "dataset.json"


def subject_id(path: str | os.PathLike) -> str:
    """The 4-digit subject ID of a LUMIR file name: ``name[-16:-12]`` of ``X_0002_0000.nii.gz``."""
    text = str(path)
    sid = text[-16:-12]
    if not (text.endswith(".nii.gz") and len(text) >= 16 and sid.isdigit() and text[-12] == "_"
            and text[-17:-16] == "_"):
        raise InputError(f"image name '{text}' does not end in _NNNN_MMMM.nii.gz: LUMIR takes the "
                         "subject ID from the 4 digits at name[-16:-12]; rename the file.")
    return sid


def modality_code(path: str | os.PathLike) -> str | None:
    """The 4-digit modality of a LUMIR file name, ``name[-11:-7]`` (``0001`` of ``X_4033_0001.nii.gz``),
    or None for a name without the LUMIR ending."""
    text = str(path)
    code = text[-11:-7]
    lumir = text.endswith(".nii.gz") and len(text) >= 17 and text[-17] == "_" and text[-12] == "_"
    return code if lumir and code.isdigit() and text[-16:-12].isdigit() else None


@dataclass(frozen=True)
class Pair:
    """One registration: the fixed and moving image files, their subject IDs and modalities.

    Attributes:
        fixed, moving: absolute paths of the images (symbolic links kept: a layout of links finds
            its label maps beside the links, as the official evaluator does).
        fixed_id, moving_id: 4-digit subject IDs (``path[-16:-12]``).
        fixed_modality, moving_modality: 4-digit modality codes (``path[-11:-7]``), None when the
            file names do not carry one (then nothing is known about the contrasts).
    """

    fixed: Path
    moving: Path
    fixed_id: str
    moving_id: str
    fixed_modality: str | None = None
    moving_modality: str | None = None

    @classmethod
    def from_paths(cls, fixed: str | os.PathLike, moving: str | os.PathLike) -> "Pair":
        return cls(Path(fixed), Path(moving), subject_id(fixed), subject_id(moving),
                   modality_code(fixed), modality_code(moving))

    @property
    def modalities_differ(self) -> bool | None:
        """True when the file names give the two images different modalities, False when the same,
        None when either name carries none."""
        if self.fixed_modality is None or self.moving_modality is None:
            return None
        return self.fixed_modality != self.moving_modality

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


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; one-line errors naming `what` for a missing, unreadable or non-object file."""
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


def existing_file(base: Path, relative, what: str) -> Path:
    """``base / relative`` made absolute, which must be a file (`relative` as read from a JSON file).
    Symbolic links are kept, not resolved: files next to a link are looked for next to the link."""
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"{what}: expected a file path string, got {relative!r}.")
    path = Path(os.path.abspath(base / relative))
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


def load_pairs(json_path: str | os.PathLike, split: str = "validation", *,
               root: str | os.PathLike | None = None) -> list[Pair]:
    """Read the pairs of one split of a LUMIR dataset JSON, checking that every image exists.

    Arguments:
        json_path: the dataset JSON, or the folder holding it (see :func:`find_dataset_json`).
        split: the list to read (``validation`` in LUMIR; any list of fixed/moving entries).
        root: the folder the JSON's relative paths start from (default: the JSON's folder; LUMIR25's
            test phase keeps the JSON apart from the images).

    Returns:
        The pairs in file order; image paths are absolute (relative ones are resolved against
        `root`). Labels are not needed, nor looked for.

    Raises:
        InputError: a missing image, a file name without a LUMIR subject ID, a malformed entry.
    """
    json_path = find_dataset_json(json_path)
    data = read_json(json_path, "dataset JSON")
    if split not in data or not isinstance(data[split], list):
        lists = ", ".join(k for k, v in data.items() if isinstance(v, list)) or "none"
        raise ConfigError(f"dataset JSON '{json_path}' has no '{split}' list of pairs (lists: {lists}).")
    base = Path(root) if root is not None else json_path.parent
    pairs = []
    for index, entry in enumerate(data[split]):
        if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
            raise ConfigError(f"dataset JSON '{json_path}', {split}[{index}]: expected an object with "
                              f"'fixed' and 'moving', got {entry!r} (split '{split}' may list single images).")
        fixed = existing_file(base, entry["fixed"], f"{split}[{index}] fixed image")
        moving = existing_file(base, entry["moving"], f"{split}[{index}] moving image")
        pairs.append(Pair(fixed, moving, subject_id(entry["fixed"]), subject_id(entry["moving"]),
                          modality_code(entry["fixed"]), modality_code(entry["moving"])))
    if not pairs:
        raise ConfigError(f"dataset JSON '{json_path}': the '{split}' list is empty.")
    return pairs

