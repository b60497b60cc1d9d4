"""`jaxreg benchmark`: compile time, time per stage, total time and peak memory for one pair."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .main import app


@app.command("benchmark")
def benchmark_command(
    fixed: Optional[Path] = typer.Argument(None, help="Fixed image (default: the embedded full-size demo pair)."),
    moving: Optional[Path] = typer.Argument(None, help="Moving image."),
    preset: str = typer.Option("lumir", "--preset", "-p", help="Preset name or TOML path."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config value (repeatable)."),
    repeats: int = typer.Option(2, help="Timed runs of the whole program after compilation."),
    stages: bool = typer.Option(True, help="Also time each stage on its own."),
):
    """Print compile time, seconds per stage, seconds per pair and peak memory (figures, not a test)."""
    from jaxreg.benchmark import run_benchmark
    from jaxreg.config import load_config
    from jaxreg.demo import demo_pair

    if (fixed is None) != (moving is None):
        raise typer.BadParameter("give both FIXED and MOVING, or neither for the demo pair")
    if fixed is None:
        fixed, moving = demo_pair()
    config = load_config(preset, tuple(set_ or ()))
    report = run_benchmark(fixed, moving, config, repeats=repeats, stages=stages,
                           progress=lambda msg: typer.echo(f"... {msg}", err=True))
    typer.echo(f"pair          {Path(fixed).name} <- {Path(moving).name}, shape {report.shape}, device {report.device}")
    typer.echo(f"preset        {report.preset}")
    typer.echo(f"compile       {report.compile_seconds:.1f} s")
    typer.echo("per pair      " + ", ".join(f"{t:.2f} s" for t in report.total_seconds)
               + f"  (best {min(report.total_seconds):.2f} s)")
    typer.echo(f"peak memory   {report.peak_memory_gb:.2f} GB (process RSS, incl. compilation)")
    for name, seconds in report.stages.items():
        typer.echo(f"  stage  {seconds:7.2f} s  {name}")
    if report.refine_floor_seconds:
        typer.echo(f"refinement vs memory bandwidth: {report.bandwidth_gbps:.1f} GB/s measured, floor "
                   f"{report.refine_floor_seconds:.2f} s, measured {report.refine_seconds:.2f} s = "
                   f"{report.refine_seconds / report.refine_floor_seconds:.0f}x the limit")
