"""`jaxreg evaluate`: score a folder of displacement fields with the official LUMIR metrics."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .terminal import counting, duration, plural


class NdvMask(str, Enum):
    fixed = "fixed"
    moving = "moving"


class FieldConvention(str, Enum):
    """How a given field file is read (``jaxreg.transforms.detect_convention``); shared by the
    commands that take fields made elsewhere."""

    auto = "auto"
    lumir = "lumir"
    itk = "itk"


FIELD_CONVENTION_HELP = ("lumir (voxels on the fixed grid), itk (an ITK displacement field in LPS mm, as ANTs, "
                         "Greedy, elastix or SimpleITK write it; converted with the images' headers) or auto: "
                         "each file's header says (ITK writers set the vector intent).")


def evaluate_command(
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (dataset.json, imagesVal/, labelsVal/, ...)."),
    fields_dir: Path = typer.Argument(..., help="Folder holding disp_FIXED_MOVING.nii.gz fields."),
    config: Optional[List[Path]] = typer.Option(
        None, "--config", "-c",
        help="Evaluation config JSON; default DATASET_DIR/evaluation_config.json, else the dataset's validation pairs. "
        "Given more than once: the configs are scored and aggregated as LUMIR25's leaderboard does (see --lumir25)."),
    lumir25: Optional[Path] = typer.Option(
        None, "--lumir25", metavar="GROUND_TRUTH_DIR",
        help="Score with LUMIR25's four published configs (LUMIR25_VAL_*_evaluation_config.json in this folder), "
        "their paths relative to DATASET_DIR, and report per task and the leaderboard's aggregates; -o writes "
        "the official metrics.json."),
    ndv_mask: NdvMask = typer.Option(NdvMask.fixed, "--ndv-mask",
                                     help="Image whose voxels > 0 mask NDV: fixed (LUMIR25) or moving (LUMIR24)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the full report as JSON here."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one row per pair as CSV here."),
    keypoint_order: int = typer.Option(1, "--keypoint-order",
                                       help="Interpolation of the field at keypoints for TRE_kp: 1 linear, 3 cubic."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Pairs scored in parallel (default: CPU cores, at most 4)."),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Score the fields that exist and list the missing ones (exit 0) instead of "
        "refusing to start."),
    field_convention: FieldConvention = typer.Option(
        FieldConvention.auto, "--field-convention", help="The fields' convention: " + FIELD_CONVENTION_HELP),
) -> None:
    """Score displacement fields with the LUMIR metrics (Dice, HD95, TRE, NDV) and SDlogJ.

    The table is printed row by row as pairs are scored. Exits 0 only if every pair was scored
    (with --allow-missing: every pair whose field exists); otherwise the last line names the
    fields not scored.
    """
    from jaxreg.errors import InputError
    from jaxreg.evaluation.config import resolve_evaluation_config
    from jaxreg.evaluation.evaluate import evaluate_fields
    from jaxreg.evaluation.report import ReportTable, summary_lines, write_csv, write_json
    from jaxreg.io import check_output_file

    started = time.perf_counter()
    for path, what in ((output, "--output report"), (csv_path, "--csv file")):
        if path is not None:
            check_output_file(path, what)
    if lumir25 is not None or len(config or []) > 1:
        return _evaluate_lumir25(dataset_dir, fields_dir, config or [], lumir25, output, csv_path, workers,
                                 allow_missing, field_convention.value, started)
    evaluation = resolve_evaluation_config(dataset_dir, config[0] if config else None)
    typer.echo(f"config: {evaluation.source}")
    typer.echo(f"fields: {fields_dir}  ({plural(len(evaluation.pairs), 'pair')}, "
               f"NDV mask: {ndv_mask.value} image > 0)")
    table = ReportTable.for_config(evaluation)
    typer.echo(table.header())
    with counting("scoring", len(evaluation.pairs)) as bar:
        def row(result) -> None:
            typer.echo(table.row(result))
            bar.advance()

        report = evaluate_fields(fields_dir, evaluation, ndv_mask=ndv_mask.value, keypoint_order=keypoint_order,
                                 workers=workers, progress=row, allow_missing=allow_missing,
                                 field_convention=field_convention.value)
    for line in [""] + summary_lines(report):
        typer.echo(line)
    if output is not None:
        typer.echo(f"report: {write_json(report, output)}")
    if csv_path is not None:
        typer.echo(f"csv: {write_csv(report, csv_path)}")
    scored = len(report.pairs) - len(report.failed)
    typer.echo(f"{scored} of {plural(len(report.pairs), 'pair')} scored in {duration(time.perf_counter() - started)}")
    not_scored = [p for p in report.failed if not (allow_missing and p.status == "missing")]
    if not_scored:
        counts: dict[str, int] = {}
        for p in not_scored:
            counts[p.status] = counts.get(p.status, 0) + 1
        detail = ", ".join(f"{n} {status}" for status, n in counts.items())
        names = ", ".join(p.field for p in not_scored)
        # a JaxregError: main() prints it as one line and exits 2
        raise InputError(f"{len(not_scored)} of {plural(len(report.pairs), 'pair')} not scored ({detail}): {names}; "
                         "write the missing fields, full resolution and finite, and evaluate again.")


def _evaluate_lumir25(dataset_dir, fields_dir, configs, ground_truth, output, csv_path, workers, allow_missing,
                      field_convention, started) -> None:
    """`jaxreg evaluate --lumir25` / several --config: the leaderboard's tasks and aggregates."""
    from jaxreg.errors import InputError
    from jaxreg.evaluation.lumir25 import (evaluate_lumir25, lumir25_config_paths, lumir25_lines, write_lumir25_csv,
                                           write_lumir25_json)

    paths = (lumir25_config_paths(ground_truth) if ground_truth is not None else []) + list(configs)
    typer.echo(f"configs: {', '.join(str(p) for p in paths)}; paths relative to {dataset_dir}; NDV mask: fixed image > 0")
    with counting("scoring", None) as bar:
        report = evaluate_lumir25(fields_dir, paths, dataset_dir, workers=workers, allow_missing=allow_missing,
                                  progress=lambda path, result: bar.advance(), field_convention=field_convention)
    for line in lumir25_lines(report):
        typer.echo(line)
    if output is not None:
        typer.echo(f"report (official metrics.json keys): {write_lumir25_json(report, output)}")
    if csv_path is not None:
        typer.echo(f"csv: {write_lumir25_csv(report, csv_path)}")
    typer.echo(f"scored in {duration(time.perf_counter() - started)}")
    not_scored = [p for p in report.failed if not (allow_missing and p.status == "missing")]
    if not_scored:
        raise InputError(f"{len(not_scored)} pairs not scored: {', '.join(p.field for p in not_scored)}; "
                         "write the missing fields, full resolution and finite, and evaluate again.")
