"""`jaxreg prepare`: bring a skull-stripped T1 (or a folder of them) into LUMIR geometry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .terminal import counting, duration, steps

NIFTI = (".nii.gz", ".nii")


def prepare_command(
    t1: Path = typer.Argument(..., help="Skull-stripped T1 (any orientation/resolution), or a folder of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .nii.gz (or a folder when T1 is a folder)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label map of the T1, carried along (nearest neighbour)."),
    landmarks: Optional[Path] = typer.Option(None, "--landmarks", help="CSV id,name,x_mm,y_mm,z_mm (world mm of the T1)."),
):
    """Affinely register to the MNI ICBM152 template and resample to 160x224x192, 1 mm, [0, 255]."""
    from jaxreg.apps.prepare import prepare, prepare_folder, sidecar_paths, write_prepared
    from jaxreg.io import check_output_dir, check_output_file

    from .cache import enable_compile_cache

    started = time.perf_counter()
    if t1.is_dir():
        check_output_dir(output, "output folder")
        enable_compile_cache()
        count = sum(1 for p in t1.iterdir() if p.name.endswith(NIFTI))
        with counting("preparing", count) as bar:
            written = prepare_folder(t1, output, progress=lambda done, total, path: bar.advance(f"prepared {path}"))
        typer.echo(f"wrote {written}  ({duration(time.perf_counter() - started)})")
        return
    stem = output.name[:-7] if output.name.endswith(".nii.gz") else output.stem
    labels_output = output.parent / f"{stem}_labels.nii.gz"
    landmarks_output = output.parent / f"{stem}_landmarks.csv"
    check_output_file(output, "output image", suffixes=NIFTI)
    for sidecar in sidecar_paths(output):  # the maps back to the native T1, written beside the image
        check_output_file(sidecar, "output record")
    if labels is not None:
        check_output_file(labels_output, "output label map", suffixes=NIFTI)
    if landmarks is not None:
        check_output_file(landmarks_output, "output landmarks")
    enable_compile_cache()
    with steps() as step:
        prepared = prepare(t1, labels_path=labels, landmarks_path=landmarks, progress=step)
        step("writing")
        written = write_prepared(prepared, output, labels_output=labels_output, landmarks_output=landmarks_output)
    for what, path in written.items():
        typer.echo(f"wrote {what:<9s} {path}")
    typer.echo(f"total     {duration(time.perf_counter() - started)}")
