"""The embedded demo pair: ICBM152 2009a (fixed) and Colin27 (moving) in LUMIR geometry.

Permissively licensed (MNI/McGill notice in LICENSE.md beside these files, which must travel with
them). See README_demo_data.md for provenance.
"""

from importlib import resources
from pathlib import Path


def demo_pair() -> tuple[Path, Path]:
    """Paths of (fixed, moving) demo images inside the installed package."""
    root = resources.files(__name__)
    return Path(str(root / "MNIDEMO_0001_0000.nii.gz")), Path(str(root / "MNIDEMO_0000_0000.nii.gz"))
