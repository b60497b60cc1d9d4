"""The evaluation report: per-pair results, the leaderboard summary, and its JSON, CSV and text forms.

:func:`jaxreg.evaluation.evaluate.evaluate_fields` and ``jaxreg batch --evaluate`` build their
reports with :func:`build_report`, and both commands print them with :func:`report_lines` (or
row by row with :class:`ReportTable`), so the same fields give the same report whichever command
scored them.
"""

from __future__ import annotations

import csv
import io as _stringio
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_output
from .config import EvaluationConfig

__all__ = [
    "METRIC_COLUMNS",
    "EvaluationReport",
    "PairResult",
    "ReportTable",
    "build_report",
    "columns_for",
    "report_lines",
    "summarize",
    "summary_lines",
    "write_csv",
    "write_json",
    "write_text_atomic",
]

#: Pair-level values a report can hold, in display order.
METRIC_COLUMNS = ("dice", "hd95", "tre_lm", "tre_kp", "ndv", "sdlogj")
_HEADERS = {"dice": "Dice", "hd95": "HD95", "tre_lm": "TRE_lm", "tre_kp": "TRE_kp", "ndv": "NDV%", "sdlogj": "SDlogJ"}
_FORMATS = {"dice": ".4f", "hd95": ".3f", "tre_lm": ".3f", "tre_kp": ".3f", "ndv": ".5f", "sdlogj": ".4f"}


@dataclass(frozen=True)
class PairResult:
    """The outcome of one pair.

    Attributes:
        key: ``FIXED_MOVING``; label: ``FIXED<-MOVING``; field: the field's file name.
        status: ``ok``, ``missing`` (no field file) or ``invalid`` (unreadable, wrong grid, NaN/inf).
        error: why the pair was not scored (one line), else None.
        values: pair-level metric values (keys from :data:`METRIC_COLUMNS` that apply to the pair).
        details: per-label Dice/HD95 lists, per-landmark distances, and ``hd95_vanished`` /
            ``tre_vanished``: labels or landmarks that vanished under the warp.
        seconds: wall time spent on the pair.
    """

    key: str
    label: str
    field: str
    status: str
    error: str | None = None
    values: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class EvaluationReport:
    """All pair results of one run plus the summary (see :func:`summarize`); ``columns`` are the
    metric columns the config's pairs produce, in display order."""

    name: str
    config_source: str
    fields_dir: str
    ndv_mask: str
    keypoint_order: int
    pairs: tuple[PairResult, ...]
    summary: dict
    seconds: float
    columns: tuple[str, ...] = METRIC_COLUMNS

    @property
    def failed(self) -> tuple[PairResult, ...]:
        """Pairs not scored: missing or invalid fields."""
        return tuple(p for p in self.pairs if not p.ok)

    @property
    def missing(self) -> tuple[PairResult, ...]:
        """Pairs whose field file does not exist (only with ``allow_missing``)."""
        return tuple(p for p in self.pairs if p.status == "missing")

    @property
    def ok(self) -> bool:
        """True only if every pair was scored."""
        return not self.failed

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "config": self.config_source,
            "fields_dir": self.fields_dir,
            "ndv_mask": self.ndv_mask,
            "keypoint_order": self.keypoint_order,
            "pairs_total": len(self.pairs),
            "pairs_scored": len(self.pairs) - len(self.failed),
            "pairs_missing": len(self.missing),
            "pairs_failed": {p.key: f"{p.status}: {p.error}" for p in self.failed},
            "summary": self.summary,
            "pairs": {p.key: {"fixed_moving": p.label, "field": p.field, "status": p.status, "error": p.error,
                              "seconds": round(p.seconds, 3), **p.values, "details": p.details}
                      for p in self.pairs},
            "seconds": round(self.seconds, 3),
        }


def columns_for(config: EvaluationConfig) -> tuple[str, ...]:
    """The metric columns scoring `config` produces (known before any pair is scored)."""
    wanted = {"sdlogj"} if config.pairs else set()
    for item in config.pairs:
        wanted.update(name for name in ("dice", "hd95", "ndv") if name in item.metrics)
        if "tre" in item.metrics:
            wanted.add("tre_lm")
            if item.fixed_keypoints is not None:
                wanted.add("tre_kp")
    return tuple(name for name in METRIC_COLUMNS if name in wanted)


def summarize(pairs: Sequence[PairResult]) -> dict:
    """Per metric over the scored pairs that have it: mean, std (population), 30 % quantile, max, n.

    The leaderboard aggregates this way (``np.mean``, ``np.std``, ``np.quantile(.3)``), so one
    NaN pair (a vanished landmark) makes the TRE mean NaN and one inf pair (a vanished label)
    makes the HD95 mean inf: look at the per-pair values to see which.
    """
    summary = {}
    for name in METRIC_COLUMNS:
        column = np.array([p.values[name] for p in pairs if p.ok and name in p.values], dtype=np.float64)
        if column.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            summary[name] = {
                "mean": float(np.mean(column)),
                "std": float(np.std(column)),
                "q30": float(np.quantile(column, 0.3)),
                "max": float(np.max(column)),
                "n": int(column.size),
            }
    return summary


def build_report(config: EvaluationConfig, fields_dir: str | os.PathLike, results: Sequence[PairResult], *,
                 seconds: float, ndv_mask: str = "fixed", keypoint_order: int = 1) -> EvaluationReport:
    """The report of `results` (the pairs of `config`, in its order) scored from `fields_dir`."""
    results = tuple(results)
    return EvaluationReport(name=config.name, config_source=config.source, fields_dir=str(Path(fields_dir).resolve()),
                            ndv_mask=ndv_mask, keypoint_order=keypoint_order, pairs=results,
                            summary=summarize(results), seconds=seconds, columns=columns_for(config))


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------

def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return format(value, _FORMATS[name])


@dataclass(frozen=True)
class ReportTable:
    """The report's table as text: a header and one row per pair. The columns and the label width are
    fixed up front (:meth:`for_config`), so rows can be printed while the pairs are being scored."""

    columns: tuple[str, ...]
    label_width: int = len("pair")

    @classmethod
    def for_config(cls, config: EvaluationConfig) -> "ReportTable":
        return cls(columns_for(config), max([len("pair")] + [len(item.pair.label) for item in config.pairs]))

    @classmethod
    def for_report(cls, report: EvaluationReport) -> "ReportTable":
        return cls(report.columns, max([len("pair")] + [len(p.label) for p in report.pairs]))

    def header(self) -> str:
        return "  ".join([f"{'pair':<{self.label_width}}"] + [f"{_HEADERS[c]:>9}" for c in self.columns] + ["    s"])

    def row(self, result: PairResult) -> str:
        """``0002<-0001     0.5724     5.140  ...  2.1``, or the status and error of a pair not scored."""
        if not result.ok:
            return f"{result.label:<{self.label_width}}  {result.status.upper()}: {result.error}"
        cells = [f"{_fmt(c, result.values.get(c)):>9}" for c in self.columns]
        notes = []
        if result.details.get("hd95_vanished"):
            notes.append(f"vanished labels {result.details['hd95_vanished']}")
        if result.details.get("tre_vanished"):
            notes.append(f"vanished landmarks {result.details['tre_vanished']}")
        return "  ".join([f"{result.label:<{self.label_width}}"] + cells + [f"{result.seconds:5.1f}"] + notes)


def summary_lines(report: EvaluationReport) -> list[str]:
    """The summary: per metric mean ± std, 30 % quantile, max and n; then the missing fields, if any."""
    lines = ["summary over scored pairs (mean ± std, 30% quantile, max, n):"]
    for name, s in report.summary.items():
        lines.append(f"  {_HEADERS[name]:<7} {_fmt(name, s['mean']):>9} ± {_fmt(name, s['std']):<9} "
                     f"q30 {_fmt(name, s['q30']):>9}  max {_fmt(name, s['max']):>9}  n={s['n']}")
    if report.missing:
        lines.append(f"  {len(report.missing)} of {len(report.pairs)} fields missing, not scored: "
                     + ", ".join(p.field for p in report.missing))
    return lines


def report_lines(report: EvaluationReport) -> list[str]:
    """The whole report as text: header, one row per pair, a blank line, the summary."""
    table = ReportTable.for_report(report)
    return [table.header()] + [table.row(p) for p in report.pairs] + [""] + summary_lines(report)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write `text` through a temporary file in the target folder, then rename (never a truncated report)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)


def write_json(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """The whole report as JSON (atomic). NaN and inf are written as ``NaN`` / ``Infinity``, as the
    LUMIR evaluator does; Python's ``json`` reads them back."""
    return write_text_atomic(json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n", path)


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return "" if value is None else str(value)


def write_csv(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """One row per pair (atomic): ids, status, the metric columns, vanished labels/landmarks, error."""
    buffer = _stringio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pair", "fixed", "moving", "field", "status", *METRIC_COLUMNS,
                     "hd95_vanished", "tre_vanished", "seconds", "error"])
    for p in report.pairs:
        fixed, moving = p.label.split("<-")
        writer.writerow([p.label, fixed, moving, p.field, p.status,
                         *(_cell(p.values.get(name)) for name in METRIC_COLUMNS),
                         " ".join(str(v) for v in p.details.get("hd95_vanished", [])),
                         " ".join(str(v) for v in p.details.get("tre_vanished", [])),
                         f"{p.seconds:.2f}", p.error or ""])
    return write_text_atomic(buffer.getvalue(), path)
