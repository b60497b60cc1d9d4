"""Where the tests find the benchmark data (``../shared/data`` beside the checkout, or the environment).

The data's licence forbids copying it into the repository: tests read it in place and are skipped,
with this path in the reason, where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("JAXREG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OASIS = Path(os.environ.get("JAXREG_OASIS_DIR", SHARED_DATA / "oasis-trt20"))
OASIS_MM = SHARED_DATA / "oasis-trt20-mm"


def benchmark_data_missing() -> str | None:
    """Why the benchmark tests cannot run here, or None when the data is in place."""
    for folder in (OASIS, OASIS_MM):
        if not (folder / "dataset.json").is_file():
            return f"needs the benchmark data at {folder} (../shared/data beside the checkout)"
    return None
