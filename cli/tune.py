"""`jaxreg tune`: choose preset settings on a labelled dataset, report them on held-out pairs, write a preset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .terminal import duration, status


def tune_command(
    dataset: Annotated[Path, typer.Argument(help="Dataset JSON (LUMIR layout) or its folder; needs label maps.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The preset to write (.toml), loadable with --preset.")],
    grid: Annotated[list[str], typer.Option("--grid", help="stage.key=v1,v2,... (repeatable; every combination is tried).")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="The base preset the grid modifies (name or TOML path).")] = "lumir",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a base preset value, e.g. --set refine.iterations=100.")] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of pairs held out for the report (subject-disjoint).")] = 0.3,
    folds: Annotated[int, typer.Option("--folds", help="K-fold cross-validation over subject blocks instead of --holdout.")] = 0,
    metric: Annotated[str, typer.Option("--metric", help="dice (maximised) or hd95 (minimised).")] = "dice",
    max_ndv: Annotated[float, typer.Option("--max-ndv", help="Largest NDV % allowed on any tuning pair (negative: none).")] = 0.01,
    config_path: Annotated[Path | None, typer.Option("-c", "--config", help="Evaluation config (default: the dataset's).")] = None,
) -> int:
    """Register the dataset's labelled pairs with every combination of --grid, choose the best on the
    tuning pairs and report it next to the base preset on held-out pairs. Label maps are used for
    scoring only. Progress on stderr, the report on stdout."""
    from dataclasses import replace

    from jaxreg.apps.tune import parse_grid, report_lines, tune
    from jaxreg.config import load_config, write_preset
    from jaxreg.dataset import find_dataset_json
    from jaxreg.evaluation.config import resolve_evaluation_config
    from jaxreg.io import check_output_file

    from .cache import enable_compile_cache

    started = time.perf_counter()
    check_output_file(output, "output preset", suffixes=(".toml",))
    base = load_config(preset, tuple(set_ or ()))
    axes = parse_grid(grid, base)  # a bad key or value fails here, before anything is read
    # the pairs and labels `jaxreg evaluate` would score; without a config, the JSON's validation pairs
    evaluation = resolve_evaluation_config(find_dataset_json(dataset), config_path)
    enable_compile_cache()
    with status("tuning") as say:
        result = tune(evaluation, base, axes, holdout=holdout, folds=folds, metric=metric,
                      max_ndv=None if max_ndv < 0 else max_ndv, progress=say)
    lines = report_lines(result)
    for line in lines:
        typer.echo(line)
    chosen = replace(result.candidates[result.chosen].config, name=output.stem)
    split = f"{folds}-fold cross-validation" if folds else f"held-out fraction {holdout}"
    header = [f"Written by `jaxreg tune {dataset}` on top of the preset '{base.name}'; searched "
              + "; ".join(f"{name} in {list(values)}" for name, values in axes)
              + f" ({split}, subject-disjoint; metric {metric}, max NDV {max_ndv}%).", *lines]
    typer.echo(f"preset: {write_preset(chosen, output, header)}  (use it with --preset {output})")
    typer.echo(f"tune: {duration(time.perf_counter() - started)} in all")
    return 0
