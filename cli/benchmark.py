"""`jaxreg benchmark`: compile time, time per stage, total time and peak memory for one pair."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .terminal import status


def benchmark_command(
    fixed: Optional[Path] = typer.Argument(None, help="Fixed image (default: the embedded full-size demo pair)."),
    moving: Optional[Path] = typer.Argument(None, help="Moving image."),
    preset: str = typer.Option("lumir", "--preset", "-p", help="Preset name or TOML path."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config value (repeatable)."),
    repeats: int = typer.Option(2, help="Timed runs of the whole program after compilation."),
    stages: bool = typer.Option(True, help="Also time each stage on its own."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="Python of an environment with `convexadam` and `torch`: time the reference "
        "ConvexAdam (LUMIR settings) on the same pair in the same run and print the speed-up."),
    reference_threads: int = typer.Option(0, help="torch CPU threads for --reference (0: torch's default)."),
    reference_repeats: int = typer.Option(1, help="Timed runs of the reference (the best is compared)."),
    throughput: Optional[str] = typer.Option(
        None, "--throughput", help="Comma-separated pair counts, e.g. 1,2,4,8: pairs per second when that many "
        "pairs go through one vmapped program (pays on GPU/TPU)."),
    scaling: bool = typer.Option(False, "--scaling", help="Also time 1, 4 and 16 pairs in a row at half and full size."),
    against: Optional[str] = typer.Option(
        None, "--against", help="Another preset: time both programs alternately in this process (best of "
        "max(3, --repeats) each) and print the ratio, steadier than two separate runs."),
):
    """Print compile time, seconds per stage, seconds per pair and peak memory (figures, not a test)."""
    from jaxreg.config import load_config
    from jaxreg.demo import demo_pair
    from jaxreg.errors import InputError

    from .cache import enable_compile_cache

    if (fixed is None) != (moving is None):
        raise InputError("give both FIXED and MOVING, or neither for the demo pair.")
    if fixed is None:
        fixed, moving = demo_pair()
    config = load_config(preset, tuple(set_ or ()))
    other = load_config(against) if against else None  # checked before any work
    counts = _counts(throughput) if throughput else ()
    enable_compile_cache()
    with status("benchmark") as progress:
        _benchmark(fixed, moving, config, preset, other, against, counts, repeats=repeats, stages=stages,
                   scaling=scaling, reference=reference, reference_threads=reference_threads,
                   reference_repeats=reference_repeats, progress=progress)


def _benchmark(fixed, moving, config, preset, other, against, counts, *, repeats, stages, scaling, reference,
               reference_threads, reference_repeats, progress) -> None:
    """Run what was asked and print its figures as they come."""
    from jaxreg.apps.benchmark import alternate_presets, run_benchmark, run_scaling, run_throughput
    from jaxreg.io import load_volume

    report = run_benchmark(fixed, moving, config, repeats=repeats, stages=stages, progress=progress)
    typer.echo(f"pair          {Path(fixed).name} <- {Path(moving).name}, shape {report.shape}, device {report.device}")
    typer.echo(f"preset        {report.preset}")
    typer.echo(f"compile       {report.compile_seconds:.1f} s")
    typer.echo("per pair      " + ", ".join(f"{t:.2f} s" for t in report.total_seconds)
               + f"  (best {min(report.total_seconds):.2f} s)")
    typer.echo(f"peak memory   {report.peak_memory_gb:.2f} GB (process RSS, incl. compilation)")
    if report.device_peak_gb is not None:
        typer.echo(f"device memory {report.device_peak_gb:.2f} GB peak (accelerator allocator)")
    for name, seconds in report.stages.items():
        typer.echo(f"  stage  {seconds:7.2f} s  {name}")
    if report.stages:
        typer.echo(f"  stages {report.stages_seconds:7.2f} s  in all (the whole program: median "
                   f"{report.median_seconds:.2f} s)")
    for stage, floor, seconds in (("refinement", report.refine_floor_seconds, report.refine_seconds),
                                  ("full-resolution level", report.fine_floor_seconds, report.fine_seconds)):
        if floor:
            typer.echo(f"{stage} vs memory bandwidth: {report.bandwidth_gbps:.1f} GB/s measured, floor "
                       f"{floor:.2f} s, measured {seconds:.2f} s = {seconds / floor:.0f}x the limit")
    best = min(report.total_seconds)
    if counts or scaling or other is not None:
        fixed_a, moving_a = load_volume(fixed, "fixed image")[0], load_volume(moving, "moving image")[0]
    if counts:
        _check_memory_for(max(counts), report)
        rows = run_throughput(fixed_a, moving_a, config, counts, progress=progress)
        typer.echo("pairs at once   compile      time   pairs/s")
        for row in rows:
            typer.echo(f"{row.pairs:>13}   {row.compile_seconds:5.1f} s  {row.seconds:6.2f} s  {row.pairs_per_second:8.2f}")
    if scaling:
        rows = run_scaling(fixed_a, moving_a, config, progress=progress)
        typer.echo("grid                voxels   pairs    total   s/pair")
        for row in rows:
            voxels = row.shape[0] * row.shape[1] * row.shape[2]
            typer.echo(f"{row.shape!s:<18} {voxels / 1e6:5.2f} M {row.pairs:>7} {row.seconds:7.1f} s {row.seconds_per_pair:7.2f} s")
    if other is not None:
        progress(f"timing {preset} and {against} alternately")
        mine, theirs = (min(times) for times in alternate_presets(fixed_a, moving_a, [config, other],
                                                                   repeats=max(3, repeats)))
        typer.echo(f"alternated    {preset} {mine:.3f} s, {against} {theirs:.3f} s per pair (best of "
                   f"{max(3, repeats)}, runs alternated): {mine / theirs:.2f}x")
    if reference is not None:
        from jaxreg.apps.reference import time_reference

        progress("running the reference ConvexAdam (PyTorch) on the same pair")
        ref = time_reference(reference, fixed, moving, threads=reference_threads, repeats=reference_repeats)
        typer.echo(f"reference     ConvexAdam (torch {ref.torch}, {ref.device}): {min(ref.seconds):.1f} s, "
                   f"peak memory {ref.peak_memory_gb:.2f} GB"
                   + (f", device memory {ref.device_peak_gb:.2f} GB" if ref.device_peak_gb is not None else ""))
        typer.echo(f"speed-up      {min(ref.seconds) / best:.1f}x ({best:.2f} s vs {min(ref.seconds):.1f} s per pair)")


def _check_memory_for(pairs: int, report) -> None:
    """On CPU, B pairs at once need about B times one pair's memory: stop before the OOM killer does."""
    import os

    from jaxreg.errors import InputError

    if not report.device.startswith("cpu") or pairs == 1:
        return
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    needed = pairs * report.peak_memory_gb
    if needed > available:
        raise InputError(f"--throughput {pairs} needs about {needed:.0f} GB on CPU ({pairs} x {report.peak_memory_gb:.1f} GB) "
                         f"but {available:.0f} GB are free: use smaller counts (on CPU one pair at a time is as fast).")


def _counts(text: str) -> tuple[int, ...]:
    from jaxreg.errors import ConfigError

    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--throughput takes comma-separated pair counts such as 1,2,4,8, not '{text}'.") from None
    if not counts or min(counts) < 1:
        raise ConfigError("--throughput counts must be >= 1.")
    return counts
