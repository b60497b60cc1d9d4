"""`jaxreg convert`: a LUMIR field <-> an ITK displacement field, or a registration of two prepared
images -> an ITK field between their native T1s."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class FieldFormat(str, Enum):
    itk = "itk"
    lumir = "lumir"


def convert_command(
    disp: Path = typer.Argument(..., help="Field to convert: LUMIR for --to itk, ITK for --to lumir."),
    output: Path = typer.Option(..., "-o", "--output", help="Converted field (.nii.gz), on the fixed grid."),
    fixed: Path = typer.Option(..., "--fixed", help="Fixed image (its header places the field's grid)."),
    moving: Path = typer.Option(..., "--moving", help="Moving image (its header places where the vectors end)."),
    to: FieldFormat = typer.Option(..., "--to", help="itk: physical LPS mm (ANTs, Greedy, FireANTs, SimpleITK); "
                                                     "lumir: voxels, as jaxreg evaluate and --init-disp read."),
    native: bool = typer.Option(False, "--native",
                                help="FIXED and MOVING are `jaxreg prepare` outputs: write the ITK field between "
                                     "their native T1s, on the native fixed grid (needs --to itk)."),
):
    """Convert a displacement field for other tools, using the fixed and moving images' headers."""
    from jaxreg.apps.convert import convert_field, export_native
    from jaxreg.errors import InputError
    from jaxreg.io import check_output_file

    check_output_file(output, "output field", suffixes=(".nii.gz", ".nii"))
    if native:
        if to is not FieldFormat.itk:
            raise InputError("--native writes an ITK field between the native T1s: use --to itk "
                             "(`jaxreg apply --itk` applies it).")
        path = export_native(disp, output, fixed=fixed, moving=moving)
    else:
        path = convert_field(disp, output, fixed=fixed, moving=moving, to=to.value)
    typer.echo(f"wrote {path}")
