"""`jaxreg register`, `jaxreg demo` and `jaxreg presets`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from .main import app

PRESET_HELP = "Preset name (lumir, lumir-multimodal, convexadam-lumir, fast) or path to a TOML config."
SET_HELP = "Override a config value, e.g. --set refine.iterations=100 (repeatable)."


def _label_outputs(label_paths: List[Path], output: Path) -> list[tuple[Path, Path]]:
    """Each moving label map is written next to the field as warped_<name>."""
    return [(p, output.parent / f"warped_{p.name}") for p in label_paths]


def _print_summary(result, written: dict, ndv_percent: float | None) -> None:
    s = result.summary
    typer.echo(f"preset        {s.preset}")
    typer.echo(f"compile       {s.compile_seconds:.1f} s" + ("  (cached program)" if s.compile_seconds == 0 else ""))
    typer.echo(f"registration  {s.seconds:.1f} s")
    typer.echo(f"similarity    NCC {s.ncc_before:.4f} before -> {s.ncc_after:.4f} after")
    if ndv_percent is not None:
        typer.echo(f"NDV           {ndv_percent:.5f} % of the fixed brain mask (non-diffeomorphic volume)")
    typer.echo(f"max |u|       {s.max_displacement_vox:.2f} voxels")
    if s.contrast_ncc is not None:
        verdict = "used" if s.intensity_terms_used else "not used"
        line = (f"intensity     {verdict}: brain NCC {s.contrast_ncc:.2f} after the coarse search "
                f"(used from {result.config.refine.intensity_min_ncc:g})")
        if not s.intensity_terms_used:
            line += "; the contrasts differ, so only MIND-SSC drove the refinement"
        typer.echo(line)
    if result.config.unfold.rounds > 0:
        typer.echo(f"fold repair   {s.unfold_rounds} round(s), {s.folding_voxels} folding voxel(s) left")
    for what, path in written.items():
        typer.echo(f"wrote {what:<8s} {path}")


@app.command("register")
def register_command(
    fixed: Path = typer.Argument(..., help="Fixed image (NIfTI, LUMIR geometry)."),
    moving: Path = typer.Argument(..., help="Moving image on the same grid."),
    output: Path = typer.Option(Path("disp.nii.gz"), "-o", "--output", help="Displacement field to write (.nii.gz)."),
    preset: str = typer.Option("lumir", "--preset", "-p", help=PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    moved: Optional[Path] = typer.Option(None, "--moved", help="Also write the moved (warped moving) image here."),
    warp_labels: Optional[List[Path]] = typer.Option(None, "--warp-labels",
                                                     help="Moving label map to warp (nearest neighbour); written next to the field as warped_<name> (repeatable)."),
    init_disp: Optional[Path] = typer.Option(None, "--init-disp", help="Start from this LUMIR field (e.g. a learned model's output)."),
    summary_json: Optional[Path] = typer.Option(None, "--summary", help="Write the run summary as JSON."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write a quality-control picture into this folder."),
):
    """Register MOVING to FIXED and write the LUMIR displacement field."""
    from jaxreg.registration import register_files

    result, written = register_files(fixed, moving, output, moved_output=moved,
                                     warp_labels=_label_outputs(warp_labels or [], output), preset=preset,
                                     overrides=tuple(set_ or ()), init_disp=init_disp)
    ndv_percent = result.summary.ndv_percent
    if qc is not None:
        from jaxreg.apps.qc import qc_for_files

        values = {"ndv": ndv_percent, "ncc_before": result.summary.ncc_before, "ncc_after": result.summary.ncc_after}
        written["qc"], _ = qc_for_files(fixed, moving, output, qc / output.name.replace(".nii.gz", ".png"),
                                        values=values, label=f"{fixed.name} <- {moving.name}")
    _print_summary(result, written, ndv_percent)
    if summary_json is not None:
        summary = dict(result.summary.as_dict(), outputs={k: str(v) for k, v in written.items()})
        summary_json.write_text(json.dumps(summary, indent=2))


@app.command("demo")
def demo_command(
    output_dir: Path = typer.Option(Path("jaxreg-demo"), "-o", "--output-dir", help="Folder for the demo outputs."),
    preset: str = typer.Option("lumir", "--preset", "-p", help=PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Register the embedded demo pair (ICBM152 template <- Colin27) and report what happened."""
    from jaxreg.demo import demo_pair
    from jaxreg.registration import register_files

    fixed, moving = demo_pair()
    typer.echo(f"demo pair     fixed {fixed.name} (ICBM152 2009a), moving {moving.name} (Colin27)")
    start = time.perf_counter()
    result, written = register_files(fixed, moving, output_dir / "disp_0001_0000.nii.gz",
                                     moved_output=output_dir / "moved_0000.nii.gz", preset=preset,
                                     overrides=tuple(set_ or ()))
    _print_summary(result, written, result.summary.ndv_percent)
    typer.echo(f"total         {time.perf_counter() - start:.1f} s wall (load, compile, register, write)")


@app.command("presets")
def presets_command():
    """List the shipped presets and their settings."""
    from jaxreg.config import config_to_dict, load_config, preset_names

    for name in preset_names():
        typer.echo(f"{name}: {json.dumps(config_to_dict(load_config(name)))}")
