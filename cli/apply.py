"""`jaxreg apply`: warp an image, a label map or a point set with a displacement field."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class Interpolation(str, Enum):
    linear = "linear"
    cubic = "cubic"
    nearest = "nearest"


def apply_command(
    disp: Path = typer.Argument(..., help="Displacement field: LUMIR (voxels, fixed grid), or ITK with --itk."),
    input_path: Path = typer.Argument(..., metavar="INPUT",
                                      help="Moving image or label map (NIfTI), or a CSV of fixed-space points "
                                           "(columns x,y,z in voxels or x_mm,y_mm,z_mm in world mm)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .nii.gz (fixed grid) or .csv (moving space)."),
    interpolation: Interpolation = typer.Option(
        Interpolation.linear, "--interpolation", "-i",
        help="linear or cubic for images; nearest for label maps (dtype kept, warped as the LUMIR evaluator does)."),
    itk: bool = typer.Option(False, "--itk", help="DISP is an ITK displacement field (physical LPS mm, as ANTs, "
                                                  "Greedy, FireANTs and SimpleITK write, or `jaxreg convert --native`)."),
    fixed: Optional[Path] = typer.Option(None, "--fixed", help="Image whose header the output gets (LUMIR fields; "
                                                               "default: the field's own header)."),
    moving: Optional[Path] = typer.Option(None, "--moving",
                                          help="Moving image: places x_mm,y_mm,z_mm points in moving space (and the "
                                               "moving end of an ITK field for points)."),
):
    """Warp INPUT into fixed space with DISP: moved(x) = input(x + disp(x)), as `register` does; points
    go the other way, fixed -> moving (give the inverse field from `jaxreg invert` for moving -> fixed)."""
    from jaxreg.apps.apply import apply_files
    from jaxreg.io import check_output_file

    suffixes = (".csv",) if str(input_path).lower().endswith(".csv") else (".nii.gz", ".nii")
    check_output_file(output, "output", suffixes=suffixes)
    path = apply_files(disp, input_path, output, interpolation=interpolation.value, itk=itk, fixed=fixed, moving=moving)
    typer.echo(f"wrote {path}")
