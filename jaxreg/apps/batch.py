"""A dataset run: every pair registered once, resumable, atomic outputs, one log line per pair.

The run is planned before anything is compiled: every image header and starting field is read,
fields already finished are found (a field counts only if it is complete and readable: header,
shape, float32 and a full decompression without NaN), and pairs that cannot run are marked failed
with a one-line reason. Then the remaining pairs are registered with one compiled program per
grid and device, each field written atomically (temporary file, then rename), so a killed run
leaves either nothing or a complete file under the final name; temporary files a killed run left
behind are removed when the run is started again, and finished pairs are skipped.

Output folder:
    ``disp_{FIXED}_{MOVING}.nii.gz``  one LUMIR field per pair;
    ``run_log.jsonl``                  one JSON line per pair and run (status ok/skipped/failed,
                                       seconds, error, metrics when evaluated, guard figures);
    ``run_config.json``                the registration config used (a re-run with another config
                                       into the same folder is refused, so fields never mix);
    ``evaluation.json``                the evaluation report, when the run evaluates.

Pair lists come from a LUMIR dataset JSON (:func:`jaxreg.dataset.load_pairs`) or a CSV
(:func:`pairs_from_csv`). ``--shard K/N`` keeps pairs ``i % N == K - 1`` (:func:`select_shard`).

Refinement of given fields (``init_fields``): each pair starts from ``init_fields/disp_F_M.nii.gz``.
With ``guard`` on (the default), the refined field is kept only if the moving image pulled through
it correlates with the fixed image at least as well as through the start (global NCC of the
normalised images, the similarity ``jaxreg register`` reports; about a second per pair, no labels
involved); otherwise the start is written unchanged. So refinement never makes a field worse by
that measure. Dice cannot be guarded without labels: the benchmark checks it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import jax
import nibabel as nib
import numpy as np

from .. import __version__
from ..config import RegistrationConfig, config_to_dict
from ..dataset import EvalPair, EvaluationConfig, Pair, load_evaluation_config, subject_id
from ..errors import ConfigError, InputError, JaxregError
from ..evaluation.evaluate import EvaluationReport, PairResult, evaluate_fields, summarize, write_json
from ..io import atomic_output, load_field, load_volume, save_field
from ..pipeline import ncc, normalise
from ..registration import check_pair, run_program
from ..ops.warp import warp

log = logging.getLogger(__name__)

__all__ = [
    "EVALUATION_JSON",
    "BatchReport",
    "Executor",
    "PairOutcome",
    "PairTask",
    "Progress",
    "RUN_CONFIG",
    "RUN_LOG",
    "evaluation_for",
    "field_is_complete",
    "pair_id",
    "pairs_from_csv",
    "parse_shard",
    "run_batch",
    "select_shard",
    "write_submission",
]

RUN_LOG = "run_log.jsonl"
RUN_CONFIG = "run_config.json"
EVALUATION_JSON = "evaluation.json"
MAX_EXIT_CODE = 125
_LUMIR_NAME = re.compile(r".*_\d{4}_\d{4}\.nii\.gz$")


# --------------------------------------------------------------------------------------------
# pair lists
# --------------------------------------------------------------------------------------------

def pair_id(path: str | os.PathLike) -> str:
    """The ID of an image in field names: LUMIR's ``name[-16:-12]`` when the name ends in
    ``_NNNN_NNNN.nii.gz``, else the file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    if _LUMIR_NAME.match(name):
        return subject_id(name)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def pairs_from_csv(csv_path: str | os.PathLike) -> list[Pair]:
    """Read a pair list: a CSV with ``fixed`` and ``moving`` columns (header required).

    Paths are absolute or relative to the CSV's folder; every image must exist. IDs follow
    :func:`pair_id`, so two pairs that would write the same field are an error.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"pair list '{csv_path}' does not exist: check the path.")
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"pair list '{csv_path}' cannot be read as CSV ({err}).") from None
    if not rows or not {"fixed", "moving"} <= set(columns):
        raise ConfigError(f"pair list '{csv_path}' must have a header with 'fixed' and 'moving' columns "
                          f"and at least one row (found columns: {columns or 'none'}).")
    base = csv_path.parent
    pairs = []
    for line, row in enumerate(rows, start=2):
        paths = []
        for role in ("fixed", "moving"):
            text = (row.get(role) or "").strip()
            if not text:
                raise ConfigError(f"pair list '{csv_path}', line {line}: empty '{role}' path.")
            path = (base / text).resolve()
            if not path.is_file():
                raise InputError(f"pair list '{csv_path}', line {line}: {role} image '{path}' does not exist: "
                                 "check the path (relative paths start at the CSV's folder).")
            paths.append(path)
        pairs.append(Pair(paths[0], paths[1], pair_id(paths[0]), pair_id(paths[1])))
    _check_unique(pairs, str(csv_path))
    return pairs


def _check_unique(pairs: Sequence[Pair], where: str) -> None:
    seen: dict[str, Pair] = {}
    for pair in pairs:
        if pair.field_name in seen:
            raise ConfigError(f"{where}: pairs '{seen[pair.field_name].moving}' -> '{seen[pair.field_name].fixed}' and "
                              f"'{pair.moving}' -> '{pair.fixed}' would both write {pair.field_name}: "
                              "list each pair once and give images distinct IDs.")
        seen[pair.field_name] = pair


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"shard must be K/N with 1 <= K <= N (e.g. 2/4 for the second of four jobs), got {text!r}.")
    return int(match.group(1)), int(match.group(2))


def select_shard(pairs: Sequence, k: int, n: int) -> list:
    """Pairs ``i`` (0-based, list order) with ``i % n == k - 1``: N jobs K=1..N cover the list exactly once."""
    if not 1 <= k <= n:
        raise ConfigError(f"shard must satisfy 1 <= K <= N, got {k}/{n}.")
    return [p for i, p in enumerate(pairs) if i % n == k - 1]


# --------------------------------------------------------------------------------------------
# evaluation of exactly the run's pairs
# --------------------------------------------------------------------------------------------

def _reference(image: Path, folder_word: str) -> Path:
    """LUMIR's rule on the image's folder: ``imagesVal/X.nii.gz`` -> ``labelsVal/X.nii.gz``."""
    return image.parent.parent / image.parent.name.replace("images", folder_word) / image.name


def _default_eval_pair(pair: Pair) -> EvalPair:
    metrics = ["ndv"]
    files = {}
    fixed_labels, moving_labels = _reference(pair.fixed, "labels"), _reference(pair.moving, "labels")
    if fixed_labels.is_file() and moving_labels.is_file():
        metrics += ["dice", "hd95"]
        files.update(fixed_labels=fixed_labels, moving_labels=moving_labels)
    fixed_lm, moving_lm = _reference(pair.fixed, "landmarks"), _reference(pair.moving, "landmarks")
    if fixed_lm.is_file() and moving_lm.is_file():
        metrics.append("tre")
        files.update(fixed_landmarks=fixed_lm, moving_landmarks=moving_lm)
    return EvalPair(pair=pair, metrics=tuple(metrics), **files)


def evaluation_for(pairs: Sequence[Pair], dataset_dir: str | os.PathLike) -> EvaluationConfig:
    """How to score exactly `pairs`: the entry of ``dataset_dir/evaluation_config.json`` for each
    pair it lists (same fixed and moving files), else LUMIR's default (``ndv``; ``dice``+``hd95``
    over every label found when ``labels*`` maps exist; ``tre`` when ``landmarks*`` volumes exist).
    Every reference file is checked here, before anything is compiled."""
    dataset_dir = Path(dataset_dir)
    config_path = dataset_dir / "evaluation_config.json"
    known: dict = {}
    base = EvaluationConfig(name=dataset_dir.name, pairs=(), source="default rule (no evaluation_config.json)")
    if config_path.is_file():
        base = load_evaluation_config(config_path, dataset_dir)
        known = {(item.pair.fixed.resolve(), item.pair.moving.resolve()): item for item in base.pairs}
    items = []
    for pair in pairs:
        item = known.get((pair.fixed.resolve(), pair.moving.resolve()))
        items.append(replace(item, pair=pair) if item is not None else _default_eval_pair(pair))
    n_labelled = sum("dice" in item.metrics for item in items)
    if n_labelled == 0:
        log.info("no label maps for these pairs: evaluation gives NDV and SDlogJ only")
    return replace(base, pairs=tuple(items),
                   source=f"{base.source}; {len(items)} pairs of this run, {n_labelled} with label maps")


# --------------------------------------------------------------------------------------------
# finished fields, submission
# --------------------------------------------------------------------------------------------

def field_is_complete(path: str | os.PathLike, shape: tuple[int, int, int]) -> bool:
    """True if `path` is a whole, readable LUMIR field on `shape`: float32 header, [X,Y,Z,3] or
    [3,X,Y,Z], and the data decompress fully (gzip's checksum) with finite values."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        header = nib.load(str(path)).header
        if header.get_data_dtype() != np.float32:
            return False
        load_field(path, shape)
    except JaxregError:
        return False
    except Exception:  # nibabel raises many types for a damaged header
        return False
    return True


def _remove_stale_temporaries(output_dir: Path, pairs: Sequence[Pair]) -> None:
    """Delete temporary files a killed run left for these pairs (``io.atomic_save`` names them
    ``.{name}.XXXX.tmp.nii.gz``). Only this run's pairs: parallel shards keep theirs."""
    for pair in pairs:
        for stale in output_dir.glob(f".{pair.field_name}.*.tmp*"):
            log.warning("removing %s, left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


def write_submission(fields_dir: str | os.PathLike, pairs: Sequence[Pair], zip_path: str | os.PathLike,
                     folder: str | None = None) -> Path:
    """Zip the fields of `pairs` as the LUMIR validation submission: ``folder.zip`` holding one
    folder ``folder/`` with every ``disp_{FIXED}_{MOVING}.nii.gz`` (LUMIR_L2R README, "Validation
    Submission guidelines"). `folder` defaults to the zip's name without ``.zip``. Every field must
    be present; the zip is written atomically (fields are stored, they are already compressed)."""
    fields_dir, zip_path = Path(fields_dir), Path(zip_path)
    if zip_path.suffix.lower() != ".zip":
        raise ConfigError(f"submission '{zip_path}' must end in .zip.")
    folder = folder or zip_path.stem
    missing = [p.field_name for p in pairs if not (fields_dir / p.field_name).is_file()]
    if missing:
        raise InputError(f"submission not written: {len(missing)} of {len(pairs)} fields are missing in "
                         f"'{fields_dir}' ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                         "finish the run first (re-running the same command resumes).")

    with atomic_output(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for pair in pairs:
            archive.write(fields_dir / pair.field_name, f"{folder}/{pair.field_name}")
    log.info("wrote submission %s (%d fields in %s/)", zip_path, len(pairs), folder)
    return zip_path


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairOutcome:
    """What happened to one pair.

    Attributes:
        pair: the pair; status: ``ok``, ``skipped`` (finished by an earlier run) or ``failed``.
        seconds: registration time without compilation; compile_seconds: compilation on this pair
            (0 when the program was reused); wall_seconds: everything (load, register, write, score).
        error: one line when failed. metrics: evaluation values when scored.
        device: the JAX device that ran it. guard: ``start_ncc``, ``ncc`` (global NCC through the
            start and through the refined field, higher is better) and ``kept_start``, when a
            starting field was refined with the guard on. contrast: ``contrast_ncc`` and
            ``intensity_used`` when the preset guards its intensity terms (``refine.intensity_min_ncc``).
    """

    pair: Pair
    status: str
    seconds: float = 0.0
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    device: str = ""
    guard: dict = field(default_factory=dict)
    contrast: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"pair": self.pair.key, "fixed": str(self.pair.fixed), "moving": str(self.pair.moving),
                "field": self.pair.field_name, "status": self.status, "seconds": round(self.seconds, 3),
                "compile_seconds": round(self.compile_seconds, 3), "wall_seconds": round(self.wall_seconds, 3),
                "error": self.error, "metrics": self.metrics, "device": self.device, **self.guard, **self.contrast}


@dataclass(frozen=True)
class Progress:
    """Sent to the progress callback once when the plan is made (``outcome`` None, ``done`` 0),
    then after each pair: its outcome, pairs done / total, pairs to register in this run, pairs
    finished by an earlier run (the rest failed their checks) and the estimated seconds left
    (None until one pair has been registered)."""

    outcome: PairOutcome | None
    done: int
    total: int
    to_register: int
    finished_earlier: int
    eta_seconds: float | None


@dataclass(frozen=True)
class BatchReport:
    """The whole run: outcomes in list order, the evaluation (or None) and timings."""

    outcomes: tuple[PairOutcome, ...]
    output_dir: Path
    seconds: float
    evaluation: EvaluationReport | None = None
    devices: tuple[str, ...] = ()

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> tuple[PairOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "failed")

    @property
    def seconds_per_pair(self) -> float | None:
        """Mean registration seconds of the pairs registered after compilation (None if none)."""
        times = [o.seconds for o in self.outcomes if o.status == "ok" and o.compile_seconds == 0]
        return float(np.mean(times)) if times else None

    @property
    def exit_code(self) -> int:
        """The number of failed pairs, capped at 125 (0 = every pair has its field)."""
        return min(len(self.failed), MAX_EXIT_CODE)


# --------------------------------------------------------------------------------------------
# running one pair
# --------------------------------------------------------------------------------------------

@jax.jit
def _similarities(fixed, moving, start, result):
    """Global NCC of the fixed image with the moving image pulled through `start` and through
    `result` (normalised intensities, border padding: the ``ncc_after`` of pipeline summaries)."""
    fixed, moving = normalise(fixed), normalise(moving)
    return ncc(fixed, warp(moving, start, "border")), ncc(fixed, warp(moving, result, "border"))


def _guarded(fixed, moving, init, result_disp, device) -> tuple[np.ndarray, dict]:
    """Keep the refined field only if the images match at least as well through it as through the start."""
    args = [jax.device_put(a, device) for a in (fixed, moving, init, result_disp)]
    start_ncc, result_ncc = (float(v) for v in _similarities(*args))
    kept_start = not result_ncc >= start_ncc
    info = {"start_ncc": start_ncc, "ncc": result_ncc, "kept_start": kept_start}
    if kept_start:
        log.info("refined field matches worse than the start (NCC %.6f < %.6f): keeping the start",
                 result_ncc, start_ncc)
        return init, info
    return result_disp, info


@dataclass(frozen=True)
class _Job:
    pair: Pair
    output: Path
    init: Path | None
    evaluation: EvalPair | None


@dataclass(frozen=True)
class PairTask:
    """One pair to register, self-contained and picklable so that another process or machine can
    run it (:mod:`jaxreg.apps.cluster`). ``task()`` runs the local per-pair code path (load, register,
    guard, atomic write) on this process's first JAX device and returns the :class:`PairOutcome`;
    running it again rewrites the same field, so a retried task is harmless."""

    job: _Job
    config: RegistrationConfig
    guard: bool

    @property
    def pair(self) -> Pair:
        return self.job.pair

    def __call__(self) -> PairOutcome:
        return _run_pair(self.job, self.config, jax.local_devices()[0], False, self.guard)


class Executor(Protocol):
    """Runs the pairs to register somewhere other than this process's devices (e.g.
    :class:`jaxreg.apps.cluster.RayExecutor`); planning, resume, logging and scoring stay in
    :func:`run_batch`. ``run`` calls ``finish(task, outcome)`` exactly once per task, in any order
    and from any thread, turning a task that could not run into a ``failed`` outcome. ``workers``
    (pairs run at once) scales the ETA; ``name`` goes into :attr:`BatchReport.devices`."""

    workers: int
    name: str

    def run(self, tasks: Sequence[PairTask], finish: Callable[[PairTask, PairOutcome], None]) -> None: ...


def _score(job: _Job, output_dir: Path, evaluation: EvaluationConfig) -> PairResult:
    """Score one written field with the built-in evaluator (one pair, one thread)."""
    return evaluate_fields(output_dir, replace(evaluation, pairs=(job.evaluation,)), workers=1).pairs[0]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _run_pair(job: _Job, config: RegistrationConfig, device, several_devices: bool, guard: bool) -> PairOutcome:
    start = time.perf_counter()
    pair = job.pair
    try:
        fixed, vox2world = load_volume(pair.fixed, "fixed image")
        moving, _ = load_volume(pair.moving, "moving image")
        check_pair(fixed, moving)
        init = load_field(job.init, fixed.shape, "starting field") if job.init is not None else None
        # several devices: the program is compiled for this pair's device and the inputs placed there
        result = run_program(config, fixed, moving, init, device if several_devices else None)
        disp, guard_info = result.disp, {}
        if init is not None and guard:
            disp, guard_info = _guarded(fixed, moving, init, result.disp, device)
        save_field(disp, job.output, vox2world)
    except JaxregError as err:
        return PairOutcome(pair, "failed", error=str(err), wall_seconds=time.perf_counter() - start, device=str(device))
    except Exception as err:  # one bad pair (memory, XLA) must not stop the others
        log.debug("pair %s failed", pair.label, exc_info=True)
        return PairOutcome(pair, "failed", error=f"{type(err).__name__}: {_one_line(err)}",
                           wall_seconds=time.perf_counter() - start, device=str(device))
    contrast = ({} if result.summary.contrast_ncc is None else
                {"contrast_ncc": round(result.summary.contrast_ncc, 4),
                 "intensity_used": result.summary.intensity_terms_used})
    return PairOutcome(pair, "ok", seconds=result.summary.seconds, compile_seconds=result.summary.compile_seconds,
                       wall_seconds=time.perf_counter() - start, device=str(device), guard=guard_info, contrast=contrast)


# --------------------------------------------------------------------------------------------
# planning and the run
# --------------------------------------------------------------------------------------------

def _header_shape(path: Path, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises many types for a damaged header
        raise InputError(f"{what} '{path}' cannot be read as NIfTI ({_one_line(err)}): is the file complete?") from None


def _plan_pair(pair: Pair, output_dir: Path, init_fields: Path | None) -> tuple[str, str | None, Path | None]:
    """(``run`` / ``skipped`` / ``failed``, error, init path) from headers only, plus the
    completeness check of an existing field."""
    try:
        fixed_shape = _header_shape(pair.fixed, "fixed image")
        moving_shape = _header_shape(pair.moving, "moving image")
        if len(fixed_shape) != 3 or fixed_shape != moving_shape:
            raise InputError(f"fixed image is {fixed_shape} but moving image is {moving_shape}: both must be "
                             "3-D on the same grid (bring them into LUMIR geometry first).")
        init = None
        if init_fields is not None:
            init = init_fields / pair.field_name
            if not init.is_file():
                raise InputError(f"starting field '{init}' does not exist: --init-fields needs "
                                 f"{pair.field_name} for every pair (LUMIR names).")
            init_shape = _header_shape(init, "starting field")
            if init_shape not in (fixed_shape + (3,), (3,) + fixed_shape):
                raise InputError(f"starting field '{init}' has shape {init_shape}: expected "
                                 f"{fixed_shape + (3,)}, the full-resolution fixed grid.")
    except JaxregError as err:
        return "failed", str(err), None
    output = output_dir / pair.field_name
    if field_is_complete(output, fixed_shape):
        return "skipped", None, init
    if output.exists():
        log.warning("%s is incomplete or unreadable: registering the pair again", output)
    return "run", None, init


def _run_settings(config: RegistrationConfig, init_fields: Path | None, guard: bool) -> dict:
    return {"config": config_to_dict(config), "init_fields": str(init_fields) if init_fields else None,
            "guard": bool(guard and init_fields is not None)}


def _check_run_config(output_dir: Path, settings: dict) -> None:
    """Refuse to add fields to a folder made with other settings. Config keys that only one side
    knows (a newer jaxreg added them) are not compared; the config's name is informative only."""
    path = output_dir / RUN_CONFIG
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: it is rewritten below
    current = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    differences = [key for key in ("init_fields", "guard") if previous.get(key) != current[key]]
    old_config = previous.get("config") if isinstance(previous.get("config"), dict) else {}
    for stage, values in current["config"].items():
        if stage == "name" or not isinstance(values, dict):
            continue
        old_values = old_config.get(stage, {}) if isinstance(old_config.get(stage), dict) else {}
        differences += [f"{stage}.{key}" for key in values.keys() & old_values.keys() if values[key] != old_values[key]]
    if differences:
        raise ConfigError(f"'{output_dir}' holds fields made with another configuration or starting fields "
                          f"({', '.join(sorted(differences))} differ, see {path}): give a new output folder, "
                          f"or delete {RUN_CONFIG} to mix them on purpose.")


def _write_run_config(output_dir: Path, settings: dict) -> None:
    text = json.dumps({**settings, "jaxreg": __version__, "jax": jax.__version__}, indent=2) + "\n"
    with atomic_output(output_dir / RUN_CONFIG) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run_batch(pairs: Sequence[Pair], output_dir: str | os.PathLike, *, config: RegistrationConfig,
              init_fields: str | os.PathLike | None = None, evaluation: EvaluationConfig | None = None,
              guard: bool = True, devices: Sequence | None = None,
              progress: Callable[[Progress], None] | None = None,
              executor: Executor | None = None, threads_per_device: int | None = None) -> BatchReport:
    """Register every pair into `output_dir`, resuming where an earlier run stopped.

    Arguments:
        pairs: the pairs (e.g. :func:`jaxreg.dataset.load_pairs`, :func:`pairs_from_csv`,
            optionally :func:`select_shard`).
        output_dir: where ``disp_{FIXED}_{MOVING}.nii.gz``, ``run_log.jsonl`` and
            ``run_config.json`` go.
        config: the registration config (one compiled program per grid and device).
        init_fields: folder of starting fields ``disp_{FIXED}_{MOVING}.nii.gz`` (e.g. a learned
            model's output); a pair without one fails. Use with ``coarse.enabled=false`` to refine only.
        evaluation: score each field when written (:func:`evaluation_for`); skipped pairs are
            scored too, so the summary covers every pair of the run.
        guard: with `init_fields`, write the start instead of a refined field through which the
            images match worse (global NCC).
        devices: JAX devices to spread the pairs over (default: every local device; one device
            runs a plain loop, several run one thread per device).
        progress: called after each pair with a :class:`Progress`.
        executor: run the pairs to register through it (e.g. on a Ray cluster) instead of on
            `devices`; everything else (plan, resume, log, scoring) is unchanged.
        threads_per_device: pairs in flight per device (default: 4 on a GPU/TPU, whose registration
            takes a fraction of a second while reading the images and writing the field take
            seconds of CPU, so the threads overlap file work with the device's; 1 on CPU, where
            one registration already uses every core).

    Returns:
        The :class:`BatchReport`; ``report.exit_code`` is the number of failed pairs (max 125).

    Raises:
        InputError / ConfigError: before anything is compiled, for problems of the whole run
        (output folder unusable, starting-field folder missing, another config in the folder).
        A problem of one pair never raises: the pair is reported failed and the others run.
    """
    start = time.perf_counter()
    if threads_per_device is not None and threads_per_device < 1:
        raise ConfigError(f"threads_per_device must be >= 1, got {threads_per_device}")
    pairs = list(pairs)
    if not pairs:
        raise ConfigError("no pairs to register: the pair list (or this shard of it) is empty.")
    _check_unique(pairs, "pair list")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output '{output_dir}' is a file: give a folder for the fields.")
    init_dir = None
    if init_fields is not None:
        init_dir = Path(init_fields)
        if not init_dir.is_dir():
            raise InputError(f"starting-field folder '{init_dir}' does not exist: give the folder holding disp_*.nii.gz.")
        if output_dir.exists() and init_dir.resolve() == output_dir.resolve():
            raise ConfigError("the output folder is the starting-field folder: write the refined fields elsewhere.")
    known = {item.pair.key: item for item in evaluation.pairs} if evaluation is not None else {}
    if evaluation is not None:
        missing = [p.label for p in pairs if p.key not in known]
        if missing:
            raise ConfigError(f"the evaluation config has no entry for {', '.join(missing[:5])}: "
                              "build it with evaluation_for(pairs, dataset_dir).")
    settings = _run_settings(config, init_dir, guard)
    _check_run_config(output_dir, settings)

    # plan: headers, starting fields, finished fields; nothing compiled yet
    jobs, planned = [], {}
    for pair in pairs:
        status, error, init = _plan_pair(pair, output_dir, init_dir)
        jobs.append(_Job(pair, output_dir / pair.field_name, init, known.get(pair.key)))
        planned[pair.key] = (status, error)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_run_config(output_dir, settings)
    _remove_stale_temporaries(output_dir, pairs)

    if executor is not None:
        devices = [executor.name]
    else:
        devices = list(devices) if devices is not None else jax.local_devices()
    if threads_per_device is None:
        threads_per_device = 1 if executor is not None or all(d.platform == "cpu" for d in devices) else 4
    threads = [d for d in devices for _ in range(threads_per_device)] if executor is None else devices
    slots = executor.workers if executor is not None else len(threads)
    several = len(devices) > 1
    to_run = sum(status == "run" for status, _ in planned.values())
    finished_earlier = sum(status == "skipped" for status, _ in planned.values())
    log.info("batch: %d pairs, %d to register, %d finished earlier, %d failed checks, on %s",
             len(pairs), to_run, finished_earlier, len(pairs) - to_run - finished_earlier,
             executor.name if executor is not None else f"{len(devices)} device(s)")

    if progress is not None:
        progress(Progress(None, 0, len(jobs), to_run, finished_earlier, None))
    run_id = f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} pid {os.getpid()}"
    outcomes: dict[str, PairOutcome] = {}
    scored: dict[str, PairResult] = {}
    lock = threading.Lock()
    registered_costs: list[float] = []

    def finish(job: _Job, outcome: PairOutcome) -> None:
        """Score (if asked), log the line, tell the caller. Called from the worker threads."""
        if evaluation is not None and outcome.status in ("ok", "skipped"):
            try:
                result = _score(job, output_dir, evaluation)
                scored[job.pair.key] = result
                outcome = replace(outcome, metrics=dict(result.values) if result.ok else {"error": result.error})
            except Exception as err:  # a scoring problem is reported on the pair, never stops the run
                outcome = replace(outcome, metrics={"error": f"{type(err).__name__}: {_one_line(err)}"})
        line = json.dumps({**outcome.to_json(), "run": run_id}, allow_nan=True)
        with lock:
            with open(output_dir / RUN_LOG, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            outcomes[job.pair.key] = outcome
            if outcome.status != "skipped" and planned[job.pair.key][0] == "run":
                registered_costs.append(outcome.wall_seconds - outcome.compile_seconds)
            left = sum(planned[k][0] == "run" for k in planned if k not in outcomes)
            eta = (float(np.mean(registered_costs)) * left / max(slots, 1)) if registered_costs else None
            if outcome.status == "failed":
                log.info("pair %s failed: %s", job.pair.label, outcome.error)
            if progress is not None:
                progress(Progress(outcome, len(outcomes), len(jobs), to_run, finished_earlier,
                                  0.0 if left == 0 else eta))

    def handle(job: _Job, device) -> None:
        status, error = planned[job.pair.key]
        if status == "failed":
            finish(job, PairOutcome(job.pair, "failed", error=error))
        elif status == "skipped":
            finish(job, PairOutcome(job.pair, "skipped"))
        else:
            finish(job, _run_pair(job, config, device, several, guard))

    if executor is not None:
        for job in jobs:
            if planned[job.pair.key][0] != "run":
                handle(job, None)
        executor.run([PairTask(job, config, guard) for job in jobs if planned[job.pair.key][0] == "run"],
                     lambda task, outcome: finish(task.job, outcome))
        for job in jobs:  # an executor that lost a task must not lose its log line
            if job.pair.key not in outcomes:
                finish(job, PairOutcome(job.pair, "failed", error=f"{executor.name} did not run this pair"))
    elif len(threads) == 1:
        for job in jobs:
            handle(job, devices[0])
    else:
        work: queue.Queue = queue.Queue()
        for job in jobs:
            work.put(job)

        def worker(device) -> None:
            while True:
                try:
                    job = work.get_nowait()
                except queue.Empty:
                    return
                handle(job, device)

        with ThreadPoolExecutor(max_workers=len(threads), thread_name_prefix="jaxreg-batch") as pool:
            for future in [pool.submit(worker, d) for d in threads]:
                future.result()

    report_eval = None
    if evaluation is not None:
        results = tuple(scored[p.key] for p in pairs if p.key in scored)
        report_eval = EvaluationReport(name=evaluation.name, config_source=evaluation.source,
                                       fields_dir=str(output_dir.resolve()), ndv_mask="fixed", keypoint_order=1,
                                       pairs=results, summary=summarize(results),
                                       seconds=sum(r.seconds for r in results))
        write_json(report_eval, output_dir / EVALUATION_JSON)
    report = BatchReport(outcomes=tuple(outcomes[p.key] for p in pairs), output_dir=output_dir,
                         seconds=time.perf_counter() - start, evaluation=report_eval,
                         devices=tuple(str(d) for d in devices))
    log.info("batch done: %d ok, %d skipped, %d failed in %.1f s", report.count("ok"), report.count("skipped"),
             report.count("failed"), report.seconds)
    return report
