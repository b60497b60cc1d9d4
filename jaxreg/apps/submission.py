"""The LUMIR validation submission: one zip holding one folder with every field of the run."""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..dataset import Pair
from ..errors import ConfigError, InputError
from ..io import atomic_output

log = logging.getLogger(__name__)

__all__ = ["check_submission_path", "write_submission"]

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: entries carry no file time
_COPY_CHUNK = 1 << 22


def check_submission_path(zip_path: str | os.PathLike) -> Path:
    """The zip's name must end in ``.zip`` (the folder inside takes its stem)."""
    zip_path = Path(zip_path)
    if zip_path.suffix.lower() != ".zip":
        raise ConfigError(f"submission '{zip_path}' must end in .zip.")
    return zip_path


def write_submission(fields_dir: str | os.PathLike, pairs: Sequence[Pair], zip_path: str | os.PathLike,
                     folder: str | None = None) -> Path:
    """Zip the fields of `pairs` as the LUMIR validation submission: ``folder.zip`` holding one
    folder ``folder/`` with every ``disp_{FIXED}_{MOVING}.nii.gz`` (LUMIR_L2R README, "Validation
    Submission guidelines"); inverse fields (``inverse_{FIXED}_{MOVING}.nii.gz``) and anything
    else in `fields_dir` stay out. `folder` defaults to the zip's name without ``.zip``. Every
    field must be present; the zip is written atomically (fields are stored, they are already
    compressed), with no file times in it, so the same fields always give the same bytes."""
    fields_dir, zip_path = Path(fields_dir), check_submission_path(zip_path)
    folder = folder or zip_path.stem
    missing = [p.field_name for p in pairs if not (fields_dir / p.field_name).is_file()]
    if missing:
        raise InputError(f"submission not written: {len(missing)} of {len(pairs)} fields are missing in "
                         f"'{fields_dir}' ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                         "finish the run first (re-running the same command resumes).")

    with atomic_output(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for pair in pairs:
            entry = zipfile.ZipInfo(f"{folder}/{pair.field_name}", date_time=_ZIP_TIME)
            entry.external_attr = 0o644 << 16
            with open(fields_dir / pair.field_name, "rb") as source, archive.open(entry, "w") as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)
    log.info("wrote submission %s (%d fields in %s/)", zip_path, len(pairs), folder)
    return zip_path
