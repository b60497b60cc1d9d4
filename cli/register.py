"""`jaxreg register`, `jaxreg demo` and `jaxreg presets`."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from .evaluate import FIELD_CONVENTION_HELP, FieldConvention
from .terminal import duration, say, steps

PRESET_HELP = "Preset name (see `jaxreg presets`) or path to a TOML config."
SET_HELP = "Override a config value, e.g. --set refine.iterations=100 (repeatable)."
NIFTI = (".nii.gz", ".nii")


def _label_outputs(label_paths: List[Path], output: Path) -> list[tuple[Path, Path]]:
    """Each moving label map is written next to the field as warped_<name>."""
    return [(p, output.parent / f"warped_{p.name}") for p in label_paths]


def _print_summary(result, written: dict) -> None:
    s = result.summary
    typer.echo(f"preset        {s.preset}")
    typer.echo(f"compile       {s.compile_seconds:.1f} s" + ("  (cached program)" if s.compile_seconds == 0 else ""))
    typer.echo(f"registration  {s.seconds:.1f} s")
    typer.echo(f"similarity    NCC {s.ncc_before:.4f} before -> {s.ncc_after:.4f} after")
    if s.ndv_percent is not None:
        typer.echo(f"NDV           {s.ndv_percent:.5f} % of the fixed brain mask (non-diffeomorphic volume)")
    typer.echo(f"max |u|       {s.max_displacement_vox:.2f} voxels")
    contrast = s.contrast_verdict(result.config.contrast.assume == "different")
    if contrast is not None:
        typer.echo(f"contrast      {contrast}")
    if result.config.unfold.rounds > 0:
        typer.echo(f"fold repair   {s.unfold_rounds} round(s), {s.folding_voxels} folding voxel(s) left")
    for what, path in written.items():
        typer.echo(f"wrote {what.split(':')[0]:<8s} {path}")  # labels:PATH -> labels


def _check_outputs(output: Path, *, moved: Optional[Path] = None, labels: list[tuple[Path, Path]] = (),
                   summary_json: Optional[Path] = None, qc: Optional[Path] = None, inverse: Optional[Path] = None,
                   inputs=()) -> None:
    """Every output path of a registration, checked before anything is read or compiled."""
    from jaxreg.errors import InputError
    from jaxreg.io import check_output_dir, check_output_file

    check_output_file(output, "output field", suffixes=NIFTI)
    if moved is not None:
        check_output_file(moved, "--moved image", suffixes=NIFTI)
    for _, target in labels:
        check_output_file(target, "warped label map", suffixes=NIFTI)
    if summary_json is not None:
        check_output_file(summary_json, "--summary file")
    if inverse is not None:
        check_output_file(inverse, "--inverse field", suffixes=NIFTI)
    if qc is not None:
        check_output_dir(qc, "--qc folder")
    outputs = [output, moved, summary_json, inverse, *(target for _, target in labels)]
    resolved = [Path(p).resolve() for p in outputs if p is not None]
    for path in resolved:
        if resolved.count(path) > 1:
            raise InputError(f"'{path}' is named for two outputs: give each output its own file.")
        if path in {Path(p).resolve() for p in inputs}:
            raise InputError(f"output '{path}' is one of the inputs: it would be overwritten; give another name.")


def _starting_field(init_disp: Optional[Path], fixed: Path, moving: Path, convention: str):
    """The --init-disp field as a LUMIR array, read in the convention given (``auto``: its header's)."""
    from jaxreg.transforms import load_as_lumir

    if init_disp is None:
        return None
    return load_as_lumir(init_disp, fixed=fixed, moving=moving, convention=convention, what="--init-disp field")


def _register_and_report(fixed: Path, moving: Path, output: Path, *, moved: Optional[Path], labels, preset: str,
                         overrides: tuple, init_disp: Optional[Path], qc: Optional[Path], started: float,
                         inverse: Optional[Path] = None, init_convention: str = "auto") -> tuple:
    """Register (showing each step), draw the QC picture if asked, print the summary."""
    from jaxreg.config import load_config
    from jaxreg.registration import register_files

    config = load_config(preset, overrides)  # a bad preset or key fails before the images are read
    init_disp = _starting_field(init_disp, fixed, moving, init_convention)
    with steps() as step:
        result, written = register_files(fixed, moving, output, moved_output=moved, warp_labels=labels,
                                         config=config, init_disp=init_disp, progress=step)
        if inverse is not None:
            from jaxreg.apps.invert import write_inverse

            step("inverting the field")
            report = write_inverse(result, inverse, fixed=fixed, moving=moving)
            written["inverse"] = report.path
        if qc is not None:
            from jaxreg.apps.qc import qc_for_files

            step("drawing the QC picture")
            name = output.name[:-7] if output.name.endswith(".nii.gz") else output.stem
            written["qc"], _ = qc_for_files(fixed, moving, output, qc / f"{name}.png",
                                            values={"ndv": result.summary.ndv_percent},
                                            label=f"{fixed.name} <- {moving.name}", convention="lumir")
    _print_summary(result, written)
    if inverse is not None:
        typer.echo(f"inverse       |phi(psi(y)) - y| on the moving brain: {report.on_moving.line()}")
        typer.echo(f"              |psi(phi(x)) - x| on the fixed brain: {report.on_fixed.line()}")
    typer.echo(f"total         {duration(time.perf_counter() - started)} wall, start to end")
    return result, written


def register_command(
    fixed: Path = typer.Argument(..., help="Fixed image (NIfTI, LUMIR geometry)."),
    moving: Path = typer.Argument(..., help="Moving image on the same grid."),
    output: Path = typer.Option(Path("disp.nii.gz"), "-o", "--output", help="Displacement field to write (.nii.gz)."),
    preset: str = typer.Option("lumir", "--preset", "-p", help=PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    moved: Optional[Path] = typer.Option(None, "--moved", help="Also write the moved (warped moving) image here."),
    warp_labels: Optional[List[Path]] = typer.Option(
        None, "--warp-labels", help="Moving label map to warp (nearest neighbour); written next to the field as "
        "warped_<name>, in the label map's own data type (repeatable)."),
    init_disp: Optional[Path] = typer.Option(
        None, "--init-disp",
        help="Start from this field (e.g. a learned model's output, or another tool's ITK field)."),
    field_convention: FieldConvention = typer.Option(
        FieldConvention.auto, "--field-convention",
        help="The --init-disp field's convention: " + FIELD_CONVENTION_HELP),
    summary_json: Optional[Path] = typer.Option(None, "--summary", help="Write the run summary as JSON."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write a quality-control picture into this folder."),
    inverse: Optional[Path] = typer.Option(
        None, "--inverse", help="Also write the inverse field here (on the moving grid; see `jaxreg invert`)."),
):
    """Register MOVING to FIXED and write the LUMIR displacement field."""
    from jaxreg.io import atomic_output

    from .cache import enable_compile_cache

    started = time.perf_counter()
    labels = _label_outputs(warp_labels or [], output)
    _check_outputs(output, moved=moved, labels=labels, summary_json=summary_json, qc=qc, inverse=inverse,
                   inputs=[fixed, moving, *(warp_labels or []), *([init_disp] if init_disp else [])])
    enable_compile_cache()
    result, written = _register_and_report(fixed, moving, output, moved=moved, labels=labels, preset=preset,
                                           overrides=tuple(set_ or ()), init_disp=init_disp, qc=qc, started=started,
                                           inverse=inverse, init_convention=field_convention.value)
    if summary_json is not None:
        summary = dict(result.summary.as_dict(), outputs={k: str(v) for k, v in written.items()})
        with atomic_output(summary_json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote summary  {summary_json}")


def demo_command(
    output_dir: Path = typer.Option(Path("jaxreg-demo"), "-o", "--output-dir", help="Folder for the demo outputs."),
    preset: str = typer.Option("lumir", "--preset", "-p", help=PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    qc: bool = typer.Option(True, "--qc/--no-qc", help="Also draw the quality-control picture (needs matplotlib)."),
):
    """Register the embedded demo pair (ICBM152 template <- Colin27) and report what happened."""
    from jaxreg.demo import demo_pair
    from jaxreg.io import check_output_dir

    from .cache import enable_compile_cache

    started = time.perf_counter()
    check_output_dir(output_dir, "demo output folder")
    if qc and importlib.util.find_spec("matplotlib") is None:
        say("no QC picture: it needs matplotlib (pip install 'jaxreg[qc]')")
        qc = False
    enable_compile_cache()
    fixed, moving = demo_pair()
    typer.echo(f"demo pair     fixed {fixed.name} (ICBM152 2009a), moving {moving.name} (Colin27)")
    _register_and_report(fixed, moving, output_dir / "disp_0001_0000.nii.gz",
                         moved=output_dir / "moved_0000.nii.gz", labels=(), preset=preset,
                         overrides=tuple(set_ or ()), init_disp=None, qc=output_dir if qc else None, started=started)


def _preset_notes(name: str) -> list[str]:
    """The comment lines that open a shipped preset file: what the preset is for."""
    from importlib import resources

    notes = []
    for line in resources.files("jaxreg.configs").joinpath(f"{name}.toml").read_text().splitlines():
        if not line.startswith("#"):
            break
        notes.append(line[1:].strip())
    return notes


def presets_command(
    name: Optional[str] = typer.Argument(None, help="A preset (or TOML path) to print in full, as TOML."),
):
    """List the shipped presets, or print one preset's every setting as TOML."""
    import re

    from jaxreg.config import load_config, preset_names, preset_toml

    if name is not None:
        config = load_config(name)
        notes = _preset_notes(name) if name in preset_names() else []
        typer.echo(preset_toml(config, ["\n".join(notes)] if notes else ()), nl=False)
        return
    names = preset_names()
    width = max(len(preset) for preset in names)
    typer.echo(f"{'preset':<{width}}  what it is for")
    for preset in names:
        summary = re.split(r"[:;]\s|\.\s|\.$", " ".join(_preset_notes(preset)), maxsplit=1)[0]
        typer.echo(f"{preset:<{width}}  {summary}")
    typer.echo("Print one in full with `jaxreg presets NAME`; use it with --preset NAME.")
