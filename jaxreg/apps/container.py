"""LUMIR25's test phase: the entrypoint of jaxreg's container (``python -m jaxreg.apps.container``).

The organisers run a participant's container on their own machine (``LUMIR25_Docker_Example/test.sh``
in ``JHU-MedImage-Reg/LUMIR25_L2R25``)::

    docker run --rm --gpus "device=0" --memory 256g --network=none --user $(id -u):$(id -g) \\
        --mount type=bind,source=.../LUMIR25_dataset.json,target=/app/LUMIR25_dataset.json \\
        --mount type=bind,source=.../images,target=/app/input \\
        --mount type=bind,source=.../fields,target=/app/output  IMAGE

This module keeps that contract:

- it reads the dataset JSON at ``/app/LUMIR25_dataset.json`` and registers every pair of its
  ``validation`` list, the list's relative paths resolved against ``/app/input``;
- it writes ``disp_{FIXED}_{MOVING}.nii.gz`` (short IDs, also for a ``_0001`` moving image) into
  ``/app/output``, with the batch run's ``run_log.jsonl`` and ``run_config.json`` beside them;
  a pair that fails gets a zero field (the leaderboard refuses a submission with a field missing)
  and makes the exit status non-zero;
- it registers on the GPU when JAX sees one, else on the CPU, and says which;
- it needs no network, and runs as any user: a home that is missing or not writable only means that
  the CPU kernels are built in a temporary folder (removed at exit) and compiled programs are not
  kept between runs, each said in one log line.

Every option has the contract's default, so the container runs without arguments; the paths and the
preset can be changed for a run outside the container (``--dataset``, ``--input``, ``--output``,
``--preset``, ``--set``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DATASET_JSON", "INPUT_DIR", "OUTPUT_DIR", "main", "prepare_folders", "run", "write_zero_fields"]

DATASET_JSON = Path("/app/LUMIR25_dataset.json")
INPUT_DIR = Path("/app/input")
OUTPUT_DIR = Path("/app/output")
PRESET = "lumir"


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except (OSError, RuntimeError):
        return False


def _home_cache(name: str) -> Path | None:
    """``~/.cache/jaxreg/NAME``, or None when there is no home at all (no HOME, a user id unknown
    to the system, as ``docker run --user`` gives)."""
    try:
        return Path.home() / ".cache" / "jaxreg" / name
    except (RuntimeError, KeyError):
        return None


def prepare_folders(scratch: Path, environ=os.environ) -> dict:
    """Choose where the CPU kernels are built and compiled programs are kept, for a process whose
    home may be missing or read-only. Sets ``JAXREG_NATIVE_DIR`` in `environ` when it must.

    - CPU kernels: ``$JAXREG_NATIVE_DIR`` or ``~/.cache/jaxreg/native`` when writable, else
      ``scratch/native`` (one log line).
    - Compiled programs: ``$JAXREG_CACHE_DIR`` (empty: none) or ``~/.cache/jaxreg/xla`` when
      writable, else none (one log line): a single run compiles each program once anyway.

    Returns ``{"native": folder, "cache": folder or None}``.
    """
    chosen = {}
    configured = environ.get("JAXREG_NATIVE_DIR")
    native = Path(configured) if configured else _home_cache("native")
    if native is None or not _writable(native):
        fallback = scratch / "native"
        fallback.mkdir(parents=True, exist_ok=True)
        log.info("CPU kernels: %s is not writable, building them in %s for this run",
                 native or "no home folder: ~/.cache/jaxreg/native", fallback)
        environ["JAXREG_NATIVE_DIR"] = str(fallback)
        native = fallback
    chosen["native"] = Path(native)

    configured = environ.get("JAXREG_CACHE_DIR")
    cache = None
    if configured != "":  # empty: the user asked for no cache
        cache = Path(configured) if configured else _home_cache("xla")
        if cache is None or not _writable(cache):
            log.info("compiled programs are not kept after this run: %s is not writable "
                     "(set JAXREG_CACHE_DIR to a writable folder to keep them)",
                     cache or "no home folder: ~/.cache/jaxreg/xla")
            cache = None
    chosen["cache"] = cache
    return chosen


def _device_line() -> str:
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"device: CPU ({os.cpu_count()} cores; JAX sees no GPU)"
    return f"device: {device.platform.upper()} {device.device_kind} ({len(jax.devices())} visible)"


def write_zero_fields(failed, output_dir: Path) -> list[Path]:
    """A zero field for each failed pair whose fixed image header can be read, so that the output
    folder holds every field the leaderboard asks for. Returns the files written."""
    import nibabel as nib
    import numpy as np

    from ..io import save_field

    written = []
    for outcome in failed:
        pair = outcome.pair
        try:
            shape = tuple(int(n) for n in nib.load(str(pair.fixed)).shape[:3])
        except Exception as err:  # nibabel raises many types for a damaged header
            log.error("%s: no zero field either, the fixed image cannot be read (%s)", pair.label, err)
            continue
        written.append(save_field(np.zeros((3,) + shape, np.float32), output_dir / pair.field_name))
        log.error("%s failed (%s): wrote a zero field in its place", pair.label, outcome.error)
    return written


def run(dataset_json: Path = DATASET_JSON, input_dir: Path = INPUT_DIR, output_dir: Path = OUTPUT_DIR, *,
        preset: str = PRESET, overrides: Sequence[str] = (), zero_fill: bool = True) -> int:
    """Register the dataset JSON's validation pairs into `output_dir`; the exit status.

    Arguments:
        dataset_json: ``LUMIR25_dataset.json``; its ``validation`` paths are relative to `input_dir`.
        input_dir: the folder holding ``imagesVal/`` (or whatever the JSON's paths name).
        output_dir: where the fields go (created if missing).
        preset, overrides: the registration config (``jaxreg batch`` takes the same). Pairs whose
            images differ in modality take the cross-contrast path by rule, whatever the preset.
        zero_fill: write a zero field for a pair that fails (see the module docstring).

    Returns:
        0 when every pair was registered, else the number of failed pairs (at most 125).
    """
    with tempfile.TemporaryDirectory(prefix="jaxreg-lumir25-") as scratch:
        folders = prepare_folders(Path(scratch))
        from .. import compilation
        from ..config import load_config
        from ..dataset import load_pairs
        from .batch import run_batch

        compilation.configure(cache_dir=folders["cache"])
        config = load_config(preset, tuple(overrides))
        pairs = load_pairs(dataset_json, "validation", root=input_dir)
        log.info("%s; %d pairs from %s (images under %s) -> %s, preset %s", _device_line(), len(pairs),
                 dataset_json, input_dir, output_dir, config.name)
        report = run_batch(pairs, output_dir, config=config, progress=_log_progress)
        if zero_fill:
            write_zero_fields(report.failed, Path(output_dir))
        log.info("done: %d registered, %d finished earlier, %d failed, in %.0f s", report.count("ok"),
                 report.count("skipped"), report.count("failed"), report.seconds)
        return report.exit_code


def _log_progress(event) -> None:
    outcome = event.outcome
    if outcome is None:
        return
    text = f"[{event.done}/{event.total}] {outcome.pair.label} {outcome.status}"
    if outcome.status == "ok":
        text += f" in {outcome.seconds:.1f} s" + (f" (+{outcome.compile_seconds:.1f} s compilation)"
                                                  if outcome.compile_seconds else "")
    elif outcome.status == "failed":
        text += f": {outcome.error}"
    log.info("%s", text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxreg.apps.container",
        description="LUMIR25 test phase: register the validation pairs of the dataset JSON into the output folder.")
    parser.add_argument("--dataset", type=Path, default=DATASET_JSON, help=f"dataset JSON (default {DATASET_JSON})")
    parser.add_argument("--input", type=Path, default=INPUT_DIR,
                        help=f"folder the JSON's relative paths start from (default {INPUT_DIR})")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help=f"folder for the fields (default {OUTPUT_DIR})")
    parser.add_argument("--preset", default=PRESET, help=f"preset name or TOML file (default {PRESET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--no-zero-fill", dest="zero_fill", action="store_false",
                        help="leave a failed pair's field missing instead of writing zeros")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, log to stderr, run; a problem of the whole run is one ``error:`` line, exit 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)  # not its INFO lines about backends it does not find
    from ..errors import JaxregError

    try:
        return run(args.dataset, args.input, args.output, preset=args.preset, overrides=args.overrides,
                   zero_fill=args.zero_fill)
    except JaxregError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
