"""`jaxreg batch`: register every pair of a dataset (or a CSV), resumable, optionally scored and zipped."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from .main import app

PRESET_HELP = "Preset name (lumir, lumir-multimodal, convexadam-lumir, fast) or path to a TOML config."
SET_HELP = "Override a config value, e.g. --set coarse.enabled=false (repeatable)."


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _progress_line(event, header: str) -> str:
    """The plan, then one line per pair: ``[ 3/13] 0004<-0003  ok  27.4 s  Dice 0.5123  ETA 4 min 30 s``."""
    o = event.outcome
    if o is None:
        failing = event.total - event.to_register - event.finished_earlier
        return (f"batch: {event.total} pairs, {event.to_register} to register, {event.finished_earlier} finished "
                f"earlier{f', {failing} failing their checks' if failing else ''}; {header}")
    width = len(str(event.total))
    head = f"[{event.done:>{width}}/{event.total}] {o.pair.label}  "
    if o.status == "failed":
        return head + f"FAILED   {o.error}"
    if o.status == "skipped":
        text = head + "skipped  (finished earlier)"
    else:
        text = head + f"ok {o.seconds:8.1f} s"
        if o.compile_seconds:
            text += f" (+{o.compile_seconds:.1f} s compilation)"
        if o.guard.get("kept_start"):
            text += "  kept the start (refinement matched worse)"
        if o.contrast.get("intensity_used") is False:
            text += f"  MIND-SSC only (contrasts differ: brain NCC {o.contrast['contrast_ncc']:.2f})"
    if "dice" in o.metrics:
        text += f"  Dice {o.metrics['dice']:.4f}"
    return text + (f"  ETA {_duration(event.eta_seconds)}" if event.eta_seconds is not None else "")


@app.command("batch")
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
        None, "--init-fields", help="Start each pair from DIR/disp_FIXED_MOVING.nii.gz (e.g. a learned model's output)."),
    guard: bool = typer.Option(True, "--guard/--no-guard",
                               help="With --init-fields: keep the start when the refined field matches the images worse."),
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
    from jaxreg.apps import batch
    from jaxreg.config import load_config
    from jaxreg.dataset import find_dataset_json, load_pairs

    from .evaluate import _summary, _table

    if dataset is None and pairs_csv is None:
        raise typer.BadParameter("give a dataset JSON, or a pair list with --pairs")
    config = load_config(preset, tuple(set_ or ()))
    if pairs_csv is not None:
        pairs = batch.pairs_from_csv(pairs_csv)
        dataset_dir = find_dataset_json(dataset).parent if dataset is not None else pairs_csv.parent
    else:
        json_path = find_dataset_json(dataset)
        pairs, dataset_dir = load_pairs(json_path, "validation"), json_path.parent
    if shard is not None:
        pairs = batch.select_shard(pairs, *batch.parse_shard(shard))
    evaluation = batch.evaluation_for(pairs, dataset_dir) if evaluate else None

    header = (f"{f'shard {shard}, ' if shard else ''}preset {config.name}"
              f"{', starting from ' + str(init_fields) if init_fields else ''} -> {output_dir}")
    executor = None
    if ray or ray_address:
        from jaxreg.apps.cluster import RayExecutor

        executor = RayExecutor(ray_address, cpus_per_task=ray_cpus)
        header += f" on {executor.name}"
    with executor or contextlib.nullcontext():
        report = batch.run_batch(pairs, output_dir, config=config, init_fields=init_fields, evaluation=evaluation,
                                 guard=guard, executor=executor, threads_per_device=threads_per_device,
                                 progress=lambda event: typer.echo(_progress_line(event, header), err=True))

    if report.evaluation is not None:
        for line in _table(report.evaluation) + [""] + _summary(report.evaluation):
            typer.echo(line)
        typer.echo(f"evaluation: {output_dir / batch.EVALUATION_JSON}")
    if qc is not None:
        from jaxreg.apps.qc import qc_dataset

        done = [(o.pair, o.metrics) for o in report.outcomes if o.status != "failed"]
        typer.echo(f"qc: {qc_dataset(done, output_dir, qc)}")
    if submission is not None:
        if report.failed:
            typer.echo(f"submission not written: {len(report.failed)} pairs failed.", err=True)
        else:
            typer.echo(f"submission: {batch.write_submission(output_dir, pairs, submission)}")
    per_pair = report.seconds_per_pair
    typer.echo(f"batch: {report.count('ok')} ok, {report.count('skipped')} skipped, {report.count('failed')} failed "
               f"of {len(report.outcomes)} pairs in {_duration(report.seconds)}"
               + (f" ({per_pair:.1f} s per pair after compilation)" if per_pair is not None else "")
               + f"; exit code {report.exit_code}")
    return report.exit_code
