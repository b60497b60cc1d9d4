"""`jaxreg evaluate`: score a folder of displacement fields with the official LUMIR metrics."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from jaxreg.dataset import resolve_evaluation_config
from jaxreg.errors import InputError
from jaxreg.evaluation.evaluate import METRIC_COLUMNS, EvaluationReport, evaluate_fields, write_csv, write_json

from .main import app

_HEADERS = {"dice": "Dice", "hd95": "HD95", "tre_lm": "TRE_lm", "tre_kp": "TRE_kp", "ndv": "NDV%", "sdlogj": "SDlogJ"}
_FORMATS = {"dice": ".4f", "hd95": ".3f", "tre_lm": ".3f", "tre_kp": ".3f", "ndv": ".5f", "sdlogj": ".4f"}


class NdvMask(str, Enum):
    fixed = "fixed"
    moving = "moving"


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return format(value, _FORMATS[name])


def _table(report: EvaluationReport) -> list[str]:
    columns = [c for c in METRIC_COLUMNS if any(c in p.values for p in report.pairs)]
    width = max([len("pair")] + [len(p.label) for p in report.pairs])
    lines = ["  ".join([f"{'pair':<{width}}"] + [f"{_HEADERS[c]:>9}" for c in columns] + ["    s"])]
    for p in report.pairs:
        if not p.ok:
            lines.append(f"{p.label:<{width}}  {p.status.upper()}: {p.error}")
            continue
        cells = [f"{_fmt(c, p.values.get(c)):>9}" for c in columns]
        notes = []
        if p.details.get("hd95_vanished"):
            notes.append(f"vanished labels {p.details['hd95_vanished']}")
        if p.details.get("tre_vanished"):
            notes.append(f"vanished landmarks {p.details['tre_vanished']}")
        lines.append("  ".join([f"{p.label:<{width}}"] + cells + [f"{p.seconds:5.1f}"] + notes))
    return lines


def _summary(report: EvaluationReport) -> list[str]:
    lines = ["summary over scored pairs (mean ± std, 30% quantile, max, n):"]
    for name, s in report.summary.items():
        lines.append(f"  {_HEADERS[name]:<7} {_fmt(name, s['mean']):>9} ± {_fmt(name, s['std']):<9} "
                     f"q30 {_fmt(name, s['q30']):>9}  max {_fmt(name, s['max']):>9}  n={s['n']}")
    return lines


@app.command("evaluate")
def evaluate_command(
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (dataset.json, imagesVal/, labelsVal/, ...)."),
    fields_dir: Path = typer.Argument(..., help="Folder holding disp_FIXED_MOVING.nii.gz fields."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c",
        help="Evaluation config JSON; default DATASET_DIR/evaluation_config.json, else the dataset's validation pairs."),
    ndv_mask: NdvMask = typer.Option(NdvMask.fixed, "--ndv-mask",
                                     help="Image whose voxels > 0 mask NDV: fixed (LUMIR25) or moving (LUMIR24)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the full report as JSON here."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one row per pair as CSV here."),
    keypoint_order: int = typer.Option(1, "--keypoint-order",
                                       help="Interpolation of the field at keypoints for TRE_kp: 1 linear, 3 cubic."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Pairs scored in parallel (default: CPU cores, at most 4)."),
) -> None:
    """Score displacement fields with the LUMIR metrics (Dice, HD95, TRE, NDV) and SDlogJ.

    Exits 0 only if every pair was scored; otherwise the last line names the fields not scored.
    """
    evaluation = resolve_evaluation_config(dataset_dir, config)
    typer.echo(f"config: {evaluation.source}")
    typer.echo(f"fields: {fields_dir}  ({len(evaluation.pairs)} pairs, NDV mask: {ndv_mask.value} image > 0)")
    report = evaluate_fields(fields_dir, evaluation, ndv_mask=ndv_mask.value, keypoint_order=keypoint_order,
                             workers=workers)
    for line in _table(report) + [""] + _summary(report):
        typer.echo(line)
    if output is not None:
        typer.echo(f"report: {write_json(report, output)}")
    if csv_path is not None:
        typer.echo(f"csv: {write_csv(report, csv_path)}")
    typer.echo(f"{len(report.pairs) - len(report.failed)} of {len(report.pairs)} pairs scored in {report.seconds:.1f} s")
    if not report.ok:
        counts = {}
        for p in report.failed:
            counts[p.status] = counts.get(p.status, 0) + 1
        detail = ", ".join(f"{n} {status}" for status, n in counts.items())
        names = ", ".join(p.field for p in report.failed)
        # a JaxregError: jaxreg's main() prints it as one line and exits non-zero (2)
        raise InputError(f"{len(report.failed)} of {len(report.pairs)} pairs not scored ({detail}): {names}; "
                         "write the missing fields, full resolution and finite, and evaluate again.")
