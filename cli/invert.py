"""`jaxreg invert`: the inverse of a displacement field and its inverse-consistency error."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def invert_command(
    disp: Path = typer.Argument(..., help="LUMIR displacement field to invert."),
    output: Path = typer.Option(..., "-o", "--output", help="Inverse field (.nii.gz), on the moving grid."),
    fixed: Optional[Path] = typer.Option(None, "--fixed", help="Fixed image: its brain (> 0) masks the error report."),
    moving: Optional[Path] = typer.Option(None, "--moving",
                                          help="Moving image: its brain masks the error report; its header and grid "
                                               "are the output's."),
):
    """Invert DISP voxel by voxel: the inverse pulls the fixed image onto the moving grid and maps
    moving-space points to fixed space. Reports |phi(psi(y)) - y| and |psi(phi(x)) - x| in voxels."""
    from jaxreg.apps.invert import write_inverse
    from jaxreg.io import check_output_file

    check_output_file(output, "output field", suffixes=(".nii.gz", ".nii"))
    report = write_inverse(disp, output, fixed=fixed, moving=moving)
    where = "brain" if moving is not None else "grid"
    typer.echo(f"phi(psi(y)) - y  moving {where}: {report.on_moving.line()}")
    where = "brain" if fixed is not None else "grid"
    typer.echo(f"psi(phi(x)) - x  fixed {where}:  {report.on_fixed.line()}")
    typer.echo(f"wrote {report.path}")
