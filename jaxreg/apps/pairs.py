"""Pair lists for a batch run: from a CSV, checked for clashing field names, split into shards.

Dataset JSON files are read by :func:`jaxreg.dataset.load_pairs`; a CSV with ``fixed`` and
``moving`` columns (:func:`pairs_from_csv`) lists any images, named by :func:`pair_id`.
``--shard K/N`` keeps pairs ``i % N == K - 1`` (:func:`select_shard`), so N jobs cover a list once.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..dataset import Pair, modality_code, subject_id
from ..errors import ConfigError, InputError

__all__ = ["check_unique_fields", "pair_id", "pairs_from_csv", "parse_shard", "select_shard"]

_LUMIR_NAME = re.compile(r".*_\d{4}_\d{4}\.nii\.gz$")


def pair_id(path: str | os.PathLike) -> str:
    """The ID of an image in field names: LUMIR's ``name[-16:-12]`` when the name ends in
    ``_NNNN_NNNN.nii.gz``, else the file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    if _LUMIR_NAME.match(name):
        return subject_id(name)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_unique_fields(pairs: Sequence[Pair], where: str) -> None:
    """Refuse two pairs that would write the same field (same fixed and moving IDs)."""
    seen: dict[str, Pair] = {}
    for pair in pairs:
        if pair.field_name in seen:
            first = seen[pair.field_name]
            raise ConfigError(f"{where}: pairs '{first.moving}' -> '{first.fixed}' and '{pair.moving}' -> "
                              f"'{pair.fixed}' would both write {pair.field_name}: list each pair once and give "
                              "images distinct IDs.")
        seen[pair.field_name] = pair


def pairs_from_csv(csv_path: str | os.PathLike) -> list[Pair]:
    """Read a pair list: a CSV with ``fixed`` and ``moving`` columns (header required).

    Paths are absolute or relative to the CSV's folder; every image must exist. IDs follow
    :func:`pair_id`, so two pairs that would write the same field are an error.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"pair list '{csv_path}' does not exist: check the path.")
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"pair list '{csv_path}' cannot be read as CSV ({err}).") from None
    if not rows or not {"fixed", "moving"} <= set(columns):
        raise ConfigError(f"pair list '{csv_path}' must have a header with 'fixed' and 'moving' columns "
                          f"and at least one row (found columns: {columns or 'none'}).")
    base = csv_path.parent
    pairs = []
    for line, row in enumerate(rows, start=2):
        paths = []
        for role in ("fixed", "moving"):
            text = (row.get(role) or "").strip()
            if not text:
                raise ConfigError(f"pair list '{csv_path}', line {line}: empty '{role}' path.")
            path = Path(os.path.abspath(base / text))  # links kept, as load_pairs keeps them
            if not path.is_file():
                raise InputError(f"pair list '{csv_path}', line {line}: {role} image '{path}' does not exist: "
                                 "check the path (relative paths start at the CSV's folder).")
            paths.append(path)
        pairs.append(Pair(paths[0], paths[1], pair_id(paths[0]), pair_id(paths[1]),
                          modality_code(paths[0].name), modality_code(paths[1].name)))
    check_unique_fields(pairs, str(csv_path))
    return pairs


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"shard must be K/N with 1 <= K <= N (e.g. 2/4 for the second of four jobs), got {text!r}.")
    return int(match.group(1)), int(match.group(2))


def select_shard(pairs: Sequence, k: int, n: int) -> list:
    """Pairs ``i`` (0-based, list order) with ``i % n == k - 1``: N jobs K=1..N cover the list exactly once."""
    if not 1 <= k <= n:
        raise ConfigError(f"shard must satisfy 1 <= K <= N, got {k}/{n}.")
    return [p for i, p in enumerate(pairs) if i % n == k - 1]
