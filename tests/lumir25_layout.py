"""A LUMIR25 validation folder, as a participant downloads it, made at test time from the OASIS dev sets.

LUMIR25's validation data cannot be shipped, and ``../shared/data`` (OASIS-TRT-20, read at run
time, never copied into the repository) is what the project may use. :func:`build_lumir25_layout`
lays it out under a temporary folder exactly as the organisers publish theirs
(``JHU-MedImage-Reg/LUMIR25_L2R25``, ``LUMIR25_Evalution_GC/ground-truth``):

    ROOT/LUMIR25_dataset.json          the dataset JSON, apart from the images; its relative
                                       paths ("./imagesVal/...") resolve against input/
    ROOT/input/imagesVal/              LUMIRMRI_XXXX_0000.nii.gz (T1w), LUMIRMRI_XXXX_0001.nii.gz
                                       (the other contrast), symbolic links into ../shared
                                       (copies with ``copy=True``)
    ROOT/ground-truth/                 what the official evaluator reads (its -d folder):
        imagesVal -> ../input/imagesVal, labelsVal/, landmarksVal/,
        LUMIR25_VAL_LUMIR24_Segmentation_evaluation_config.json   (ndv, dice, hd95)
        LUMIR25_VAL_HighField_Segmentation_evaluation_config.json (ndv, dice, hd95)
        LUMIR25_VAL_MultiModal_Segmentation_evaluation_config.json (ndv, dice, hd95)
        LUMIR25_VAL_LUMIR24_Landmark_evaluation_config.json       (ndv, tre)

The four tasks and what stands in for each (subject numbers are OASIS-TRT-20's):

- LUMIR24 segmentation (in-domain, IDs 3454-3463): T1w pairs N+1 <- N, N = 1..9, as LUMIR24.
- HighField segmentation (out-of-domain, IDs 4014-4023): no high-field scans exist here, so T1w
  pairs of subjects 3-12 registered the other way (N <- N+1), under their own IDs. They test that
  the task is read, run, named and scored as published; they are not a domain shift.
- MultiModal segmentation (IDs 4024-4032 fixed T1w ``_0000`` <- 4033-4041 moving ``_0001``):
  ``oasis-trt20-mm``'s pairs, a real T1w <- a synthetic T2w- or FLAIR-like image of another subject.
- LUMIR24 landmarks (IDs 3484-3487): the three pairs among the AFIDs subjects (6 <- 4, 7 <- 6,
  4 <- 7, subject 4 appearing under two IDs as the chain needs), single-voxel landmark volumes.

Label lists are OASIS's (99 labels, background 0 included), not LUMIR's 133; the configs'
format is LUMIR25's: no per-pair metric list, one label list per method.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data_paths import OASIS, OASIS_MM

DATASET_JSON = "LUMIR25_dataset.json"
CONFIG_NAMES = {  # task -> published file name
    "LUMIR24_Segmentation": "LUMIR25_VAL_LUMIR24_Segmentation_evaluation_config.json",
    "HighField_Segmentation": "LUMIR25_VAL_HighField_Segmentation_evaluation_config.json",
    "MultiModal_Segmentation": "LUMIR25_VAL_MultiModal_Segmentation_evaluation_config.json",
    "LUMIR24_Landmark": "LUMIR25_VAL_LUMIR24_Landmark_evaluation_config.json",
}
#: The order of the published ``validation`` list.
TASK_ORDER = ("LUMIR24_Segmentation", "HighField_Segmentation", "MultiModal_Segmentation", "LUMIR24_Landmark")

# task -> [((fixed ID, modality, OASIS subject), (moving ID, modality, OASIS subject)), ...]
_TASK_PAIRS = {
    "LUMIR24_Segmentation": [((3454 + n, 0, n + 1), (3453 + n, 0, n)) for n in range(1, 10)],
    "HighField_Segmentation": [((4014 + k, 0, 12 - k), (4013 + k, 0, 13 - k)) for k in range(1, 10)],
    "MultiModal_Segmentation": [((4023 + n, 0, n + 1), (4032 + n, 1, n)) for n in range(1, 10)],
    "LUMIR24_Landmark": [((3485, 0, 6), (3484, 0, 4)), ((3486, 0, 7), (3485, 0, 6)), ((3487, 0, 4), (3486, 0, 7))],
}


def data_available() -> bool:
    """Whether the OASIS dev sets this layout is made from are readable."""
    return (OASIS / "dataset.json").is_file() and (OASIS_MM / "dataset.json").is_file()


def image_name(subject_id: int, modality: int) -> str:
    return f"LUMIRMRI_{subject_id:04d}_{modality:04d}.nii.gz"


@dataclass(frozen=True)
class Lumir25Layout:
    """Where the pieces of a built LUMIR25-layout folder are (see the module docstring)."""

    root: Path
    dataset_json: Path
    input_dir: Path
    ground_truth: Path
    configs: dict = field(default_factory=dict)  # task -> config path
    pairs: dict = field(default_factory=dict)  # task -> [(fixed image name, moving image name)]

    @property
    def validation(self) -> list[tuple[str, str]]:
        """Every pair, in the dataset JSON's order."""
        return [pair for task in TASK_ORDER for pair in self.pairs.get(task, [])]

    @property
    def field_names(self) -> list[str]:
        """The displacement field of every pair under its official name (short IDs, no modality)."""
        return [f"disp_{fixed[9:13]}_{moving[9:13]}.nii.gz" for fixed, moving in self.validation]

    def config_paths(self) -> list[Path]:
        return [self.configs[task] for task in TASK_ORDER if task in self.configs]


def _source(oasis_subject: int, modality: int, folder: str) -> Path:
    """The OASIS file standing in for a LUMIR25 image / label map / landmark volume."""
    base = OASIS_MM if modality == 1 else OASIS
    return base / folder / f"OASISTRT_{oasis_subject:04d}_{modality:04d}.nii.gz"


def _link(target: Path, link: Path, copy: bool = False) -> None:
    if not target.is_file():
        raise FileNotFoundError(f"{target} is missing from the shared data")
    if link.is_symlink() or link.exists():
        if not copy and link.resolve() != target.resolve():
            raise ValueError(f"{link} already stands for {link.resolve()}, not {target}")
        return
    if copy:
        shutil.copyfile(target, link)
    else:
        link.symlink_to(target)


def _dataset_json(validation: list[tuple[str, str]]) -> dict:
    """LUMIR25_dataset.json with the published keys; training images are listed but absent (a
    participant may well run the validation without the 51 GB training set)."""
    training = [{"image": f"./imagesTr/{image_name(i, 0)}"} for i in range(3)]
    return {
        "name": "LUMIR",
        "release": "0.1",
        "description": "LUMIR25 validation layout made from OASIS-TRT-20 for jaxreg's tests (never shipped).",
        "license": "See ../shared/data/oasis-trt20/LICENSE.md: internal non-commercial benchmark use only.",
        "reference": "Klein A, Tourville J. Front Neurosci 6:171 (2012); Marcus DS et al. J Cogn Neurosci 19(9) (2007).",
        "pairings": "unpaired",
        "provided_data": {"0": ["image"]},
        "modality": {"0": "T1w Brain MRI"},
        "labels": {},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": [160, 224, 192]},
        "numTraining": len(training),
        "training": training,
        "numValidation": len(validation),
        "validation": [{"fixed": f"./imagesVal/{f}", "moving": f"./imagesVal/{m}"} for f, m in validation],
    }


def evaluation_config(task: str, pairs: list[tuple[str, str]], labels: list[int]) -> dict:
    """One evaluation config in LUMIR25's published format."""
    if task == "LUMIR24_Landmark":
        methods = [{"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
                   {"name": "TRE_lm", "metric": "tre", "dest": "landmarks"}]
    else:
        methods = [{"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
                   {"name": "DSC", "metric": "dice", "labels": list(labels)},
                   {"name": "HD95", "metric": "hd95", "labels": list(labels)}]
    return {
        "name": "LUMIR",
        "evaluation_methods": methods,
        "expected_shape": [160, 224, 192, 3],
        "eval_pairs": [{"fixed": f"./imagesVal/{f}", "moving": f"./imagesVal/{m}"} for f, m in pairs],
        "eval_config_version": 0.0,
        "masked_evaluation": False,
    }


def build_lumir25_layout(root: str | os.PathLike, *, pairs_per_task: int | None = None,
                         tasks: tuple[str, ...] = TASK_ORDER, copy: bool = False) -> Lumir25Layout:
    """Lay out a LUMIR25 validation folder under `root` (created; links into ``../shared/data``).

    Arguments:
        root: an empty or absent folder (a test's ``tmp_path``; never inside the repository).
        pairs_per_task: keep only the first pairs of each task (all when None: 9, 9, 9 and 3).
        tasks: which of :data:`TASK_ORDER` to include.
        copy: copy the files instead of linking them (for a container, which cannot follow links
            out of its mounts); the copies stay under `root`, which the caller removes.

    Returns:
        The :class:`Lumir25Layout`; ``layout.validation`` lists the pairs in the JSON's order.
    """
    root = Path(root)
    input_dir, ground_truth = root / "input", root / "ground-truth"
    images = input_dir / "imagesVal"
    for folder in (images, ground_truth / "labelsVal", ground_truth / "landmarksVal"):
        folder.mkdir(parents=True, exist_ok=True)
    if not (ground_truth / "imagesVal").exists():
        (ground_truth / "imagesVal").symlink_to(Path("..") / "input" / "imagesVal", target_is_directory=True)
    labels = json.loads((OASIS / "evaluation_config.json").read_text())["labels"]

    chosen = {}
    for task in tasks:
        entries = _TASK_PAIRS[task][:pairs_per_task]
        names = []
        for fixed, moving in entries:
            for subject_id, modality, oasis_subject in (fixed, moving):
                name = image_name(subject_id, modality)
                _link(_source(oasis_subject, modality, "imagesVal"), images / name, copy)
                if task == "LUMIR24_Landmark":
                    _link(_source(oasis_subject, 0, "landmarksVal"), ground_truth / "landmarksVal" / name, copy)
                else:
                    _link(_source(oasis_subject, modality, "labelsVal"), ground_truth / "labelsVal" / name, copy)
            names.append((image_name(fixed[0], fixed[1]), image_name(moving[0], moving[1])))
        chosen[task] = names

    validation = [pair for task in TASK_ORDER for pair in chosen.get(task, [])]
    dataset = json.dumps(_dataset_json(validation), indent=4) + "\n"
    (root / DATASET_JSON).write_text(dataset)
    (ground_truth / DATASET_JSON).write_text(dataset)  # the organisers keep one beside the configs too
    configs = {}
    for task, pairs in chosen.items():
        configs[task] = ground_truth / CONFIG_NAMES[task]
        configs[task].write_text(json.dumps(evaluation_config(task, pairs, labels), indent=4) + "\n")
    return Lumir25Layout(root=root, dataset_json=root / DATASET_JSON, input_dir=input_dir,
                         ground_truth=ground_truth, configs=configs, pairs=chosen)
