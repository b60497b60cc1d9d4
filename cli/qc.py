"""`jaxreg qc`: a quality-control picture of an existing field."""

from __future__ import annotations

from pathlib import Path

import typer

from .evaluate import FIELD_CONVENTION_HELP, FieldConvention
from .terminal import steps


def qc_command(
    fixed: Path = typer.Argument(..., help="Fixed image."),
    moving: Path = typer.Argument(..., help="Moving image."),
    disp: Path = typer.Argument(..., help="Displacement field of the pair (LUMIR or ITK, see --field-convention)."),
    output: Path = typer.Option(Path("qc.png"), "-o", "--output", help="PNG to write."),
    field_convention: FieldConvention = typer.Option(
        FieldConvention.auto, "--field-convention", help="The field's convention: " + FIELD_CONVENTION_HELP),
):
    """Draw fixed, moving, moved, checkerboard, deformed grid, and the log-Jacobian with the folds
    (the voxels NDV counts) marked, under a one-line summary of the field's metrics."""
    from jaxreg.apps.qc import qc_for_files, summary_line
    from jaxreg.io import check_output_file

    check_output_file(output, "output picture", suffixes=(".png",))
    with steps() as step:
        path, values = qc_for_files(fixed, moving, disp, output, label=f"{fixed.name} <- {moving.name}",
                                    progress=step, convention=field_convention.value)
    typer.echo(summary_line(values))
    typer.echo(f"wrote {path}")
