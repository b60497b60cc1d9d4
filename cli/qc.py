"""`jaxreg qc`: a quality-control picture of an existing field."""

from __future__ import annotations

from pathlib import Path

import typer

from .main import app


@app.command("qc")
def qc_command(
    fixed: Path = typer.Argument(..., help="Fixed image."),
    moving: Path = typer.Argument(..., help="Moving image."),
    disp: Path = typer.Argument(..., help="LUMIR displacement field of the pair."),
    output: Path = typer.Option(Path("qc.png"), "-o", "--output", help="PNG to write."),
):
    """Draw fixed, moving, moved, checkerboard, deformed grid and log-Jacobian with folds in red."""
    from jaxreg.apps.qc import qc_for_files, summary_line

    path, values = qc_for_files(fixed, moving, disp, output, label=disp.name)
    typer.echo(f"{summary_line(values)}\nwrote {path}")
