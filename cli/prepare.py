"""`jaxreg prepare`: bring a skull-stripped T1 (or a folder of them) into LUMIR geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .main import app


@app.command("prepare")
def prepare_command(
    t1: Path = typer.Argument(..., help="Skull-stripped T1 (any orientation/resolution), or a folder of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .nii.gz (or a folder when T1 is a folder)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label map of the T1, carried along (nearest neighbour)."),
    landmarks: Optional[Path] = typer.Option(None, "--landmarks", help="CSV id,name,x_mm,y_mm,z_mm (world mm of the T1)."),
):
    """Affinely register to the MNI ICBM152 template and resample to 160x224x192, 1 mm, [0, 255]."""
    from jaxreg.apps.prepare import prepare, prepare_folder, write_prepared

    if t1.is_dir():
        typer.echo(f"wrote {prepare_folder(t1, output)}")
        return
    stem = output.name[:-7] if output.name.endswith(".nii.gz") else output.stem
    prepared = prepare(t1, labels_path=labels, landmarks_path=landmarks)
    for warning in prepared.warnings:
        typer.echo(f"warning: {warning}", err=True)
    written = write_prepared(prepared, output, labels_output=output.parent / f"{stem}_labels.nii.gz",
                             landmarks_output=output.parent / f"{stem}_landmarks.csv")
    for what, path in written.items():
        typer.echo(f"wrote {what:<9s} {path}")
