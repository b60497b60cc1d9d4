"""`jaxreg batch`: register every pair of a dataset (or a CSV), resumable, optionally scored and zipped."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import List, Optional

import typer

from .evaluate import FIELD_CONVENTION_HELP, FieldConvention
from .terminal import counting, duration, plural, say, warn

PRESET_HELP = "Preset name (see `jaxreg presets`) or path to a TOML config."
SET_HELP = "Override a config value, e.g. --set coarse.enabled=false (repeatable)."


def plan_line(event, header: str) -> str:
    """``batch: 13 pairs, 10 to register, 2 finished earlier (1 still to invert), 1 refused by the
    checks; preset lumir -> out``."""
    refused = event.failed_checks
    to_invert = f" ({event.to_invert} still to invert)" if event.to_invert else ""
    return (f"batch: {plural(event.total, 'pair')}, {event.to_register} to register, {event.finished_earlier} "
            f"finished earlier{to_invert}{f', {refused} refused by the checks' if refused else ''}; {header}")


def pair_line(event) -> str:
    """``[ 3/13] 0004<-0003  ok     27.4 s  Dice 0.5123  ETA 4 min 30 s`` for one finished pair."""
    o = event.outcome
    width = len(str(event.total))
    head = f"[{event.done:>{width}}/{event.total}] {o.pair.label}  "
    if o.status == "failed":
        return head + f"FAILED   {o.error}"
    if o.status == "skipped":
        text = head + "skipped  (finished earlier" + ("; inverted now)" if o.inverse else ")")
    else:
        text = head + f"ok {o.seconds:8.1f} s"
        if o.compile_seconds:
            text += f" (+{o.compile_seconds:.1f} s compilation)"
        if o.guard.get("kept_start"):
            text += "  kept the start (refinement matched worse)"
        decider = ("guard" if "contrast_verdict" in o.contrast
                   else "by rule" if "by rule" in o.contrast.get("contrast_reason", "") else None)  # else the preset's
        if o.contrast.get("contrast_path") == "cross-contrast" and decider:
            action = "intensities mapped" if o.contrast.get("intensity_matched") else "MIND-SSC alone"
            text += f"  cross-contrast: {action} ({decider})"
    if o.inverse:
        text += f"  inverse p99 {o.inverse['inverse_moving_p99']:.2g} vox"
    if "dice" in o.metrics:
        text += f"  Dice {o.metrics['dice']:.4f}"
    return text + (f"  ETA {duration(event.eta_seconds)}" if event.eta_seconds else "")


def batch_command(
    dataset: Optional[Path] = typer.Argument(
        None, help="Dataset JSON (LUMIR layout; its 'validation' pairs) or its folder. Optional with --pairs."),
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="Folder for the fields, run_log.jsonl and run_config.json."),
    preset: str = typer.Option("lumir", "--preset", "-p", help=PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    evaluate: bool = typer.Option(False, "--evaluate", help="Score each field with the built-in LUMIR evaluator."),
    submission: Optional[Path] = typer.Option(
        None, "--submission", help="Also write the LUMIR submission zip: NAME.zip holding NAME/disp_*.nii.gz."),
    init_fields: Optional[Path] = typer.Option(
        None, "--init-fields", help="Start each pair from DIR/disp_FIXED_MOVING.nii.gz (e.g. a learned model's output; "
        "LUMIR or ITK fields, see --field-convention)."),
    guard: bool = typer.Option(True, "--guard/--no-guard",
                               help="With --init-fields: keep the start when the refined field matches the images worse."),
    field_convention: FieldConvention = typer.Option(
        FieldConvention.auto, "--field-convention",
        help="The --init-fields fields' convention: " + FIELD_CONVENTION_HELP),
    inverse: bool = typer.Option(
        False, "--inverse", help="Also write each field's inverse beside it, inverse_FIXED_MOVING.nii.gz (on the "
        "moving grid; never in the submission zip), with its consistency in run_log.jsonl. A resumed run inverts "
        "fields finished earlier without one, without registering them again."),
    root: Optional[Path] = typer.Option(
        None, "--root", help="Folder the dataset JSON's relative paths start from (default: the JSON's folder; "
        "LUMIR25 keeps the JSON apart from the images)."),
    pairs_csv: Optional[Path] = typer.Option(
        None, "--pairs", help="CSV with fixed,moving columns (paths relative to the CSV) instead of the JSON's pairs."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: run only pairs i with i % N == K-1 (N jobs cover all)."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Write a quality-control picture per pair and a sortable index.html here."),
    ray: bool = typer.Option(False, "--ray", help="Run the pairs as Ray tasks: on $RAY_ADDRESS or a cluster started here "
                             "with `ray start`, else on a new local Ray instance. Needs: pip install 'jaxreg[ray]'."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", metavar="HOST:PORT", help="Run on the Ray cluster whose head is at HOST:PORT (implies --ray)."),
    ray_cpus: int = typer.Option(1, "--ray-cpus", help="With --ray on a cluster without GPUs: CPUs reserved per pair."),
    threads_per_device: Optional[int] = typer.Option(
        None, "--threads-per-device", help="Pairs in flight per device (default 4 on GPU/TPU to overlap file "
        "reading and writing with the device, 1 on CPU)."),
) -> int:
    """Register every pair, writing disp_FIXED_MOVING.nii.gz into OUTPUT_DIR.

    Re-running the same command resumes: finished fields are skipped. Exit code = number of
    failed pairs (capped at 125); 2 with an `error:` line when the run cannot start.
    """
    from jaxreg.apps.batch import EVALUATION_JSON, run_batch
    from jaxreg.apps.pairs import pairs_from_csv, parse_shard, select_shard
    from jaxreg.apps.submission import check_submission_path, write_submission
    from jaxreg.config import load_config
    from jaxreg.dataset import find_dataset_json, load_pairs
    from jaxreg.errors import InputError
    from jaxreg.evaluation.config import evaluation_for
    from jaxreg.evaluation.report import report_lines
    from jaxreg.io import check_output_dir, check_output_file

    from .cache import enable_compile_cache

    started = time.perf_counter()
    if dataset is None and pairs_csv is None:
        raise InputError("give a dataset JSON (or its folder), or a pair list with --pairs.")
    check_output_dir(output_dir, "output folder")
    if qc is not None:
        check_output_dir(qc, "--qc folder")
    if submission is not None:
        check_output_file(check_submission_path(submission), "--submission zip")
    shard_k_n = parse_shard(shard) if shard is not None else None
    config = load_config(preset, tuple(set_ or ()))
    if pairs_csv is not None:
        pairs = pairs_from_csv(pairs_csv)
        dataset_dir = find_dataset_json(dataset).parent if dataset is not None else pairs_csv.parent
    else:
        json_path = find_dataset_json(dataset)
        dataset_dir = root if root is not None else json_path.parent
        pairs = load_pairs(json_path, "validation", root=dataset_dir)
    if shard_k_n is not None:
        pairs = select_shard(pairs, *shard_k_n)
    evaluation = evaluation_for(pairs, dataset_dir) if evaluate else None

    header = (f"{f'shard {shard}, ' if shard else ''}preset {config.name}"
              f"{', starting from ' + str(init_fields) if init_fields else ''} -> {output_dir}")
    executor = None
    if ray or ray_address:
        from jaxreg.apps.executors import RayExecutor

        executor = RayExecutor(ray_address, cpus_per_task=ray_cpus)
        header += f" on {executor.name}"
    enable_compile_cache()
    with executor or contextlib.nullcontext(), counting("registering", len(pairs)) as bar:
        def progress(event) -> None:
            if event.outcome is None:
                say(plan_line(event, header))
            else:
                bar.advance(pair_line(event), eta=event.eta_seconds)

        report = run_batch(pairs, output_dir, config=config, init_fields=init_fields, evaluation=evaluation,
                           guard=guard, executor=executor, threads_per_device=threads_per_device, progress=progress,
                           inverse=inverse, init_convention=field_convention.value)

    if report.evaluation is not None:
        for line in report_lines(report.evaluation):
            typer.echo(line)
        typer.echo(f"evaluation: {output_dir / EVALUATION_JSON}")
    if qc is not None:
        from jaxreg.apps.qc import qc_dataset

        done = [(o.pair, o.metrics) for o in report.outcomes if o.status != "failed"]
        with counting("drawing QC pictures", len(done)) as bar:
            index = qc_dataset(done, output_dir, qc, progress=lambda label: bar.advance())
        typer.echo(f"qc: {index}")
    if submission is not None:
        if report.failed:
            warn(f"submission not written: {plural(len(report.failed), 'pair')} failed.")
        else:
            typer.echo(f"submission: {write_submission(output_dir, pairs, submission)}")
    for line in report.contrast_lines():
        typer.echo(line)
    if report.inverse_line() is not None:
        typer.echo(report.inverse_line())
    per_pair = report.seconds_per_pair
    typer.echo(f"batch: {report.count('ok')} ok, {report.count('skipped')} skipped, {report.count('failed')} failed "
               f"of {plural(len(report.outcomes), 'pair')} in {duration(time.perf_counter() - started)}"
               + (f" ({per_pair:.1f} s per pair after compilation)" if per_pair is not None else "")
               + f"; exit code {report.exit_code}")
    return report.exit_code
