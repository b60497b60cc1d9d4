"""LUMIR25's leaderboard: its four published evaluation configs, scored and aggregated as the
official evaluator does (``LUMIR25_Evalution_GC/evaluation.py`` in ``JHU-MedImage-Reg/LUMIR25_L2R25``).

The organisers score a validation submission with four configs, given to their evaluator as
``-l1 -s1 -s2 -s3`` (file name -> task, and the Dice aggregate of that task alone):

- ``LUMIR25_VAL_LUMIR24_Landmark_evaluation_config.json``: in-domain landmarks (NDV, TRE);
- ``LUMIR25_VAL_LUMIR24_Segmentation_evaluation_config.json``: in-domain segmentation, ``ID_dice``;
- ``LUMIR25_VAL_HighField_Segmentation_evaluation_config.json``: high-field, ``OOD_dice``;
- ``LUMIR25_VAL_MultiModal_Segmentation_evaluation_config.json``: cross-contrast, ``MM_dice``.

Each pair is scored with :func:`jaxreg.evaluation.evaluate.evaluate_fields` (NDV masked by the
fixed image, LUMIR25's mask). The report then takes the official ``metrics.json`` form:

- ``cases``: one entry per pair, keyed ``FFFF_0000<--MMMM_0001`` (subject and modality codes),
  holding each method of its config under the config's own name (``Non-diffeomorphic Volumes``,
  ``DSC``, ``HD95``, ``TRE_lm``) as ``{"mean": value, "detailed": per-label list or value}``. The
  tasks' cases are merged in the evaluator's order (landmarks, then the three segmentation tasks):
  a pair listed by two configs is one case, with the later config's values.
- ``aggregates``: per method name over every case that has it, ``mean``, ``std`` (population) and
  ``"30"``, the 30 % quantile, or the 70 % quantile for ``TRE_lm`` (a robustness figure: higher
  TRE is worse); then ``ID_dice``, ``OOD_dice`` and ``MM_dice``, the same three figures of ``DSC``
  over one task's cases. As there, one NaN or inf pair makes its aggregate NaN or inf.

Configs may be given one by one too (any names, e.g. the organisers' ``LUMIR25_Simple_*``); a task's
Dice aggregate appears when its config's name says which task it is.
"""

from __future__ import annotations

import csv
import io as _stringio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .config import EvaluationConfig, load_evaluation_config
from .evaluate import evaluate_fields
from .report import EvaluationReport, PairResult, report_lines, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "Lumir25Report", "Task", "aggregates_of", "case_key", "evaluate_lumir25", "lumir25_config_paths",
           "lumir25_lines", "task_of", "write_lumir25_csv", "write_lumir25_json"]

EVAL_VERSION = "3.0"  # what the official evaluator writes


@dataclass(frozen=True)
class Task:
    """One leaderboard task: its config file's name, the part of it that names the task, and the
    Dice aggregate it feeds (None for landmarks)."""

    name: str
    file_name: str
    aggregate: str | None


#: The four tasks, in the order the official evaluator merges their cases (-l1, -s1, -s2, -s3).
TASKS = (
    Task("LUMIR24_Landmark", "LUMIR25_VAL_LUMIR24_Landmark_evaluation_config.json", None),
    Task("LUMIR24_Segmentation", "LUMIR25_VAL_LUMIR24_Segmentation_evaluation_config.json", "ID_dice"),
    Task("HighField_Segmentation", "LUMIR25_VAL_HighField_Segmentation_evaluation_config.json", "OOD_dice"),
    Task("MultiModal_Segmentation", "LUMIR25_VAL_MultiModal_Segmentation_evaluation_config.json", "MM_dice"),
)
_ROBUSTNESS = {"TRE_lm": 0.7}  # every other method: 0.3
_OFFICIAL_VALUE = {"ndv": "ndv", "dice": "dice", "hd95": "hd95", "tre": "tre_lm", "sdlogj": "sdlogj"}


def task_of(config_path: str | os.PathLike) -> Task | None:
    """The task a config file is for, from its name (``..._HighField_Segmentation_evaluation_config.json``), or None."""
    name = Path(config_path).name
    for task in TASKS:
        if f"_{task.name}_" in name:
            return task
    return None


def lumir25_config_paths(ground_truth: str | os.PathLike) -> list[Path]:
    """The four configs in `ground_truth` under their published names, in the evaluator's order.

    Raises:
        InputError: naming the ones missing (the organisers' folder is ``LUMIR25_Evalution_GC/ground-truth``).
    """
    folder = Path(ground_truth)
    if not folder.is_dir():
        raise InputError(f"LUMIR25 ground-truth folder '{folder}' does not exist: give the folder holding "
                         "LUMIR25_VAL_*_evaluation_config.json.")
    paths = [folder / task.file_name for task in TASKS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"'{folder}' lacks {', '.join(missing)}: the four LUMIR25 configs must keep their "
                         "published names (or give them one by one with --config).")
    return paths


def case_key(pair) -> str:
    """``FFFF_MMMM<--FFFF_MMMM`` as the official evaluator keys a pair (subject and modality codes)."""
    return f"{pair.fixed_id}_{pair.fixed_modality}<--{pair.moving_id}_{pair.moving_modality}"


@dataclass(frozen=True)
class Lumir25Report:
    """The per-config reports and their official ``metrics.json`` form.

    Attributes:
        tasks: ``(config path, task or None, config, report)`` per config, in the evaluator's order.
        cases, aggregates: as in the official ``metrics.json`` (module docstring).
        name: the last config's ``name``, as the official evaluator reports.
    """

    tasks: tuple[tuple[Path, Task | None, EvaluationConfig, EvaluationReport], ...]
    cases: dict
    aggregates: dict
    name: str
    seconds: float

    @property
    def failed(self) -> tuple[PairResult, ...]:
        return tuple(p for *_, report in self.tasks for p in report.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        """The official keys (``name``, ``aggregates``, ``cases``, ``eval_version``) and jaxreg's own
        under ``jaxreg``: each config's task, pairs and the pairs that could not be scored."""
        return {
            "name": self.name,
            "aggregates": self.aggregates,
            "cases": self.cases,
            "eval_version": EVAL_VERSION,
            "jaxreg": {
                "configs": [{"config": str(path), "task": task.name if task else None, "pairs": len(report.pairs),
                             "summary": report.summary} for path, task, _, report in self.tasks],
                "ndv_mask": "fixed",
                "pairs_failed": {f"{path.name}: {p.label}": f"{p.status}: {p.error}"
                                 for path, _, _, report in self.tasks for p in report.failed},
                "seconds": round(self.seconds, 3),
            },
        }


def _case(result: PairResult, config: EvaluationConfig) -> dict:
    """One pair in the official form: each of the config's methods under its name, mean and detailed."""
    case = {}
    for metric, name in config.method_names.items():
        value = result.values.get(_OFFICIAL_VALUE[metric])
        if value is None:
            continue
        detailed = result.details.get(f"{metric}_per_label", value) if metric in ("dice", "hd95") else value
        case[name] = {"mean": value, "detailed": detailed}
    return case


def _aggregate(values: list[float], quantile: float) -> dict:
    """mean, std and the robustness quantile exactly as the official evaluator computes them."""
    column = np.array(values)
    with np.errstate(invalid="ignore"):
        return {"mean": float(column.mean()), "std": float(column.std()), "30": float(np.quantile(column, quantile))}


def aggregates_of(task_cases: Sequence[tuple[Task | None, dict]]) -> tuple[dict, dict]:
    """(merged cases, aggregates) of the per-config cases, in the evaluator's way (module docstring)."""
    merged: dict = {}
    for _, cases in task_cases:
        merged.update(cases)
    aggregates = {}
    for name in sorted({metric for case in merged.values() for metric in case}):
        values = [case[name]["mean"] for case in merged.values() if name in case]
        aggregates[name] = _aggregate(values, _ROBUSTNESS.get(name, 0.3))
    for task, cases in task_cases:
        if task is None or task.aggregate is None:
            continue
        values = [case["DSC"]["mean"] for case in cases.values() if "DSC" in case]
        if values:
            aggregates[task.aggregate] = _aggregate(values, 0.3)
    return merged, aggregates


def evaluate_lumir25(fields_dir: str | os.PathLike, config_paths: Sequence[str | os.PathLike],
                     data_dir: str | os.PathLike, *, workers: int | None = None, allow_missing: bool = False,
                     progress: Callable[[Path, PairResult], None] | None = None,
                     field_convention: str = "auto") -> Lumir25Report:
    """Score `fields_dir` on each config and aggregate as the LUMIR25 leaderboard does.

    Arguments:
        fields_dir: the folder of ``disp_{FIXED}_{MOVING}.nii.gz`` (short IDs, as submitted).
        config_paths: the configs, e.g. :func:`lumir25_config_paths`; put in the evaluator's task
            order when their names say their tasks, else kept in the order given.
        data_dir: the folder the configs' relative paths start from (the evaluator's ``-d``):
            ``imagesVal/``, ``labelsVal/``, ``landmarksVal/``.
        workers, allow_missing, field_convention: as :func:`jaxreg.evaluation.evaluate.evaluate_fields`.
        progress: called with (config path, pair result) as pairs are scored.

    Raises:
        InputError / ConfigError: a config or reference file missing or malformed; missing fields
        without `allow_missing`; all before anything is scored.
    """
    start = time.perf_counter()
    order = {task.name: index for index, task in enumerate(TASKS)}
    paths = sorted((Path(p) for p in config_paths),
                   key=lambda p: order.get(task_of(p).name, len(TASKS)) if task_of(p) else len(TASKS))
    configs = [(path, task_of(path), load_evaluation_config(path, data_dir)) for path in paths]
    tasks, task_cases = [], []
    for path, task, config in configs:
        logger.info("scoring %s (%s): %d pairs", path.name, task.name if task else "task not named", len(config.pairs))
        report = evaluate_fields(fields_dir, config, ndv_mask="fixed", workers=workers, allow_missing=allow_missing,
                                 field_convention=field_convention,
                                 progress=None if progress is None else (lambda result, p=path: progress(p, result)))
        tasks.append((path, task, config, report))
        task_cases.append((task, {case_key(item.pair): _case(result, config)
                                  for item, result in zip(config.pairs, report.pairs) if result.ok}))
    cases, aggregates = aggregates_of(task_cases)
    return Lumir25Report(tasks=tuple(tasks), cases=cases, aggregates=aggregates,
                         name=configs[-1][2].name if configs else "", seconds=time.perf_counter() - start)


def _figure(name: str, value: float) -> str:
    return f"{value:.5f}" if "Volumes" in name else f"{value:.4f}"


def lumir25_lines(report: Lumir25Report) -> list[str]:
    """The report as text: each config's table and summary, then the leaderboard's aggregates."""
    lines = []
    for path, task, _, task_report in report.tasks:
        lines += [f"{task.name if task else 'config'}: {path.name} ({len(task_report.pairs)} pairs)"]
        lines += [f"  {line}" for line in report_lines(task_report)] + [""]
    lines.append("LUMIR25 aggregates, as the leaderboard computes them (mean ± std, robustness quantile: "
                 "30 %, TRE 70 %; NDV masked by the fixed image):")
    width = max([len(name) for name in report.aggregates] + [4])
    for name, figures in report.aggregates.items():
        quantile = "q70" if _ROBUSTNESS.get(name) == 0.7 else "q30"
        lines.append(f"  {name:<{width}}  {_figure(name, figures['mean'])} ± {_figure(name, figures['std'])}  "
                     f"{quantile} {_figure(name, figures['30'])}")
    return lines


def write_lumir25_json(report: Lumir25Report, path: str | os.PathLike) -> Path:
    """The report as the official ``metrics.json`` (atomic; NaN and inf written as JSON's
    ``NaN`` / ``Infinity``, as the evaluator's ``json.dump(..., allow_nan=True)`` does)."""
    return write_text_atomic(json.dumps(report.to_dict(), indent=4, allow_nan=True) + "\n", path)


def write_lumir25_csv(report: Lumir25Report, path: str | os.PathLike) -> Path:
    """One row per case: task, case key, field, and each method's pair value (atomic)."""
    names = sorted({name for case in report.cases.values() for name in case})
    buffer = _stringio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "case", "field", "status", *names])
    for config_path, task, config, task_report in report.tasks:
        for item, result in zip(config.pairs, task_report.pairs):
            case = report.cases.get(case_key(item.pair), {}) if result.ok else {}
            writer.writerow([task.name if task else config_path.name, case_key(item.pair), result.field,
                             result.status, *(repr(case[n]["mean"]) if n in case else "" for n in names)])
    return write_text_atomic(buffer.getvalue(), path)
