"""A dataset run: every pair registered once, resumable, atomic outputs, one log line per pair.

The run is planned before anything is compiled: every output path is checked, every image header
and starting field is read, fields already finished are found (a field counts only if it is
complete and readable: header, shape, float32 and a full decompression without NaN), and pairs
that cannot run are marked failed with a one-line reason. Then an executor
(:mod:`jaxreg.apps.executors`: this process's devices, or a Ray cluster) registers the remaining
pairs (:mod:`jaxreg.apps.runner`: one field written atomically per pair, so a killed run leaves
either nothing or a complete file under the final name); temporary files a killed run left behind
are removed when the run is started again, and finished pairs are skipped.

With ``inverse``, each field's inverse is written beside it once the field is saved; a pair whose
field an earlier run finished but whose inverse is missing (a run without ``inverse``, or killed
between the two writes) gets its inverse from the saved field, without registering again.

Output folder:
    ``disp_{FIXED}_{MOVING}.nii.gz``  one LUMIR field per pair;
    ``inverse_{FIXED}_{MOVING}.nii.gz`` with ``inverse``: its inverse, a LUMIR field on the moving
                                       grid (:func:`jaxreg.apps.runner.inverse_name`; no evaluator
                                       or submission takes it for a field);
    ``run_log.jsonl``                  one JSON line per pair and run (status ok/skipped/failed,
                                       seconds, error, metrics when evaluated, guard figures, the
                                       inverse's consistency when one was written);
    ``run_config.json``                the registration config used (a re-run with another config
                                       into the same folder is refused, so fields never mix);
    ``evaluation.json``                the evaluation report, when the run evaluates.

Pair lists: :func:`jaxreg.dataset.load_pairs` (dataset JSON) or :mod:`jaxreg.apps.pairs` (CSV,
shards); how to score them: :func:`jaxreg.evaluation.config.evaluation_for`; the submission zip:
:mod:`jaxreg.apps.submission`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import jax
import nibabel as nib
import numpy as np

from .. import __version__
from ..config import RegistrationConfig, config_to_dict
from ..dataset import Pair
from ..errors import ConfigError, InputError, JaxregError, one_line
from ..evaluation.config import EvaluationConfig
from ..evaluation.report import EvaluationReport, PairResult, build_report, write_json
from ..io import atomic_output, check_output_dir, check_output_file, load_field
from ..transforms import FIELD_CONVENTIONS, detect_convention
from .executors import Executor, LocalExecutor
from .pairs import check_unique_fields
from .runner import PairJob, PairOutcome, PairTask, inverse_name, remove_stale_temporaries, score_pair

log = logging.getLogger(__name__)

__all__ = ["EVALUATION_JSON", "RUN_CONFIG", "RUN_LOG", "BatchReport", "Progress", "field_is_complete", "run_batch"]

RUN_LOG = "run_log.jsonl"
RUN_CONFIG = "run_config.json"
EVALUATION_JSON = "evaluation.json"
MAX_EXIT_CODE = 125


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """Sent to the progress callback once when the plan is made (``outcome`` None, ``done`` 0),
    then after each pair with its outcome. ``to_register`` pairs are registered in this run,
    ``finished_earlier`` were finished by an earlier one (``to_invert`` of them still without their
    inverse field, written in this run) and :attr:`failed_checks` failed the plan's checks (more
    may fail while they run); ``eta_seconds`` is the estimated time left (None until one pair has
    been registered)."""

    outcome: PairOutcome | None
    done: int
    total: int
    to_register: int
    finished_earlier: int
    eta_seconds: float | None
    to_invert: int = 0

    @property
    def failed_checks(self) -> int:
        """Pairs the plan found unable to run (unreadable header, shape mismatch, no starting field)."""
        return self.total - self.to_register - self.finished_earlier


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

    def contrast_lines(self) -> list[str]:
        """One line per path the registered pairs took (``same-contrast`` / ``cross-contrast``) and
        why, with the pairs: ``cross-contrast: 9 pairs, modalities differ (0000 <- 0001), by rule: 4024<-4033, ...``.
        The reasons carry no per-pair figures here; the run log has each pair's."""
        groups: dict[tuple[str, str], list[str]] = {}
        for outcome in self.outcomes:
            if "contrast_path" in outcome.contrast:
                # the guard's reason has per-pair figures: group by its verdict
                reason = outcome.contrast.get("contrast_verdict", outcome.contrast["contrast_reason"])
                groups.setdefault((outcome.contrast["contrast_path"], reason), []).append(outcome.pair.label)
        return [f"{path}: {len(labels)} pair{'s' if len(labels) != 1 else ''}, {reason}: {', '.join(labels)}"
                for (path, reason), labels in groups.items()]

    def inverse_line(self) -> str | None:
        """``inverses: 4 written; |phi(psi(y)) - y| on the moving brain: mean 0.0012, worst 99th
        percentile 0.015 voxels (0002<-0001)``, or None when this run wrote none."""
        written = [o for o in self.outcomes if "inverse_field" in o.inverse]
        if not written:
            return None
        worst = max(written, key=lambda o: o.inverse["inverse_moving_p99"])
        mean = float(np.mean([o.inverse["inverse_moving_mean"] for o in written]))
        return (f"inverses: {len(written)} written; |phi(psi(y)) - y| on the moving brain: mean {mean:.2g}, worst "
                f"99th percentile {worst.inverse['inverse_moving_p99']:.2g} voxels ({worst.pair.label})")


# --------------------------------------------------------------------------------------------
# planning: nothing compiled, nothing written
# --------------------------------------------------------------------------------------------

def field_is_complete(path: str | os.PathLike, shape: tuple[int, int, int]) -> bool:
    """True if `path` is a whole, readable LUMIR field on `shape`: float32 header, [X,Y,Z,3] or
    [3,X,Y,Z], and the data decompress fully (gzip's checksum) with finite values."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if nib.load(str(path)).header.get_data_dtype() != np.float32:
            return False
        load_field(path, shape)
    except Exception:  # noqa: BLE001  nibabel raises many types for a damaged file; any of them means "no"
        return False
    return True


def _header_shape(path: Path, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises many types for a damaged header
        raise InputError(f"{what} '{path}' cannot be read as NIfTI ({one_line(err)}): is the file complete?") from None


@dataclass(frozen=True)
class _Planned:
    job: PairJob
    status: str  # run, invert (field finished earlier, its inverse missing), skipped or failed
    error: str | None = None


def _plan_pair(pair: Pair, output_dir: Path, init_dir: Path | None, *, inverse: bool = False,
               init_convention: str = "auto") -> _Planned:
    """Run, invert (the field finished earlier, its inverse missing), skip (finished earlier) or
    fail (with the reason), from headers only plus the completeness check of existing fields."""
    job = PairJob(pair, output_dir / pair.field_name, inverse=output_dir / inverse_name(pair) if inverse else None)
    try:
        fixed_shape = _header_shape(pair.fixed, "fixed image")
        moving_shape = _header_shape(pair.moving, "moving image")
        if len(fixed_shape) != 3 or fixed_shape != moving_shape:
            raise InputError(f"fixed image is {fixed_shape} but moving image is {moving_shape}: both must be "
                             "3-D on the same grid (bring them into LUMIR geometry first).")
        if init_dir is not None:
            job = replace(job, init=init_dir / pair.field_name)
            if not job.init.is_file():
                raise InputError(f"starting field '{job.init}' does not exist: --init-fields needs "
                                 f"{pair.field_name} for every pair (LUMIR names).")
            job = replace(job, init_convention=detect_convention(job.init, init_convention, "starting field"))
            init_shape = _header_shape(job.init, "starting field")
            if job.init_convention == "lumir" and init_shape not in (fixed_shape + (3,), (3,) + fixed_shape):
                raise InputError(f"starting field '{job.init}' has shape {init_shape}: expected "
                                 f"{fixed_shape + (3,)}, the full-resolution fixed grid.")
    except JaxregError as err:
        return _Planned(job, "failed", str(err))
    if field_is_complete(job.output, fixed_shape):
        if job.inverse is None or field_is_complete(job.inverse, moving_shape):
            return _Planned(job, "skipped")
        if job.inverse.exists():
            log.warning("%s is incomplete or unreadable: inverting the field again", job.inverse)
        return _Planned(replace(job, invert_only=True), "invert")
    if job.output.exists():
        log.warning("%s is incomplete or unreadable: registering the pair again", job.output)
    return _Planned(job, "run")


def _run_settings(config: RegistrationConfig, init_dir: Path | None, guard: bool) -> dict:
    return {"config": config_to_dict(config), "init_fields": str(init_dir) if init_dir else None,
            "guard": bool(guard and init_dir is not None)}


def _check_run_config(output_dir: Path, settings: dict) -> None:
    """Refuse to add fields to a folder made with other settings. Config keys that only one side
    knows (a newer jaxreg added them) are not compared; the config's name is informative only."""
    path = output_dir / RUN_CONFIG
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: it is rewritten when the run starts
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


def _check_outputs(output_dir: Path, *, evaluate: bool) -> None:
    """Every path the run writes besides the fields, checked before anything is read or compiled."""
    check_output_dir(output_dir, "output folder")
    for name in (RUN_LOG, RUN_CONFIG) + ((EVALUATION_JSON,) if evaluate else ()):
        check_output_file(output_dir / name, f"the run's {name}")


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

class _RunLog:
    """Appends one JSON line per pair to ``run_log.jsonl``, tagged with this run's id (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self.run_id = f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} pid {os.getpid()}"
        self._lock = threading.Lock()

    def append(self, outcome: PairOutcome) -> None:
        line = json.dumps({**outcome.to_json(), "run": self.run_id}, allow_nan=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


class _Registration:
    """The registration phase's bookkeeping: each pair's outcome is scored (when asked), logged and
    counted, and the caller hears of it with an ETA. :meth:`finish` is called from worker threads."""

    def __init__(self, planned: Sequence[_Planned], output_dir: Path, evaluation: EvaluationConfig | None,
                 run_log: _RunLog, workers: int, progress: Callable[[Progress], None] | None):
        self._planned = {p.job.pair.key: p for p in planned}
        self._output_dir, self._evaluation, self._run_log = output_dir, evaluation, run_log
        self._workers, self._progress = max(workers, 1), progress
        self._to_register = sum(p.status == "run" for p in planned)
        self._finished_earlier = sum(p.status in ("skipped", "invert") for p in planned)
        self._to_invert = sum(p.status == "invert" for p in planned)
        self._costs: list[float] = []
        self._lock = threading.Lock()
        self.outcomes: dict[str, PairOutcome] = {}
        self.scored: dict[str, PairResult] = {}

    def announce(self) -> None:
        self._tell(None, None)

    def finish(self, job: PairJob, outcome: PairOutcome) -> None:
        """Score (if asked), log the line, tell the caller."""
        scoring_start = time.perf_counter()
        if self._evaluation is not None and outcome.status in ("ok", "skipped"):
            try:
                result = score_pair(job, self._output_dir, self._evaluation)
                self.scored[job.pair.key] = result
                outcome = replace(outcome, metrics=dict(result.values) if result.ok else {"error": result.error})
            except Exception as err:  # noqa: BLE001  a scoring problem is reported on the pair, never stops the run
                outcome = replace(outcome, metrics={"error": f"{type(err).__name__}: {one_line(err)}"})
        self._run_log.append(outcome)
        if outcome.status == "failed":
            log.info("pair %s failed: %s", job.pair.label, outcome.error)
        with self._lock:
            self.outcomes[job.pair.key] = outcome
            if self._planned[job.pair.key].status == "run":  # what a pair left will take: registered and scored
                self._costs.append(outcome.wall_seconds - outcome.compile_seconds + time.perf_counter() - scoring_start)
            left = sum(p.status == "run" and key not in self.outcomes for key, p in self._planned.items())
            eta = 0.0 if left == 0 else (float(np.mean(self._costs)) * left / self._workers if self._costs else None)
            self._tell(outcome, eta)

    def _tell(self, outcome: PairOutcome | None, eta: float | None) -> None:
        if self._progress is not None:
            self._progress(Progress(outcome, len(self.outcomes), len(self._planned), self._to_register,
                                    self._finished_earlier, eta, self._to_invert))


def _register_all(planned: Sequence[_Planned], registration: _Registration, executor: Executor,
                  config: RegistrationConfig, guard: bool) -> None:
    """Pairs that need no work are finished here; the executor registers (or inverts) the rest."""
    registration.announce()
    for item in planned:
        if item.status == "skipped":
            registration.finish(item.job, PairOutcome(item.job.pair, "skipped"))
        elif item.status == "failed":
            registration.finish(item.job, PairOutcome(item.job.pair, "failed", error=item.error))
    tasks = [PairTask(item.job, config, guard) for item in planned if item.status in ("run", "invert")]
    executor.run(tasks, lambda task, outcome: registration.finish(task.job, outcome))
    for task in tasks:  # an executor that lost a task must not lose its log line
        if task.pair.key not in registration.outcomes:
            registration.finish(task.job, PairOutcome(task.pair, "failed", error=f"{executor.name} did not run this pair"))


def run_batch(pairs: Sequence[Pair], output_dir: str | os.PathLike, *, config: RegistrationConfig,
              init_fields: str | os.PathLike | None = None, evaluation: EvaluationConfig | None = None,
              guard: bool = True, devices: Sequence | None = None,
              progress: Callable[[Progress], None] | None = None,
              executor: Executor | None = None, threads_per_device: int | None = None,
              inverse: bool = False, init_convention: str = "auto") -> BatchReport:
    """Register every pair into `output_dir`, resuming where an earlier run stopped.

    Arguments:
        pairs: the pairs (e.g. :func:`jaxreg.dataset.load_pairs`, :func:`jaxreg.apps.pairs.pairs_from_csv`,
            optionally :func:`jaxreg.apps.pairs.select_shard`).
        output_dir: where ``disp_{FIXED}_{MOVING}.nii.gz``, ``run_log.jsonl`` and
            ``run_config.json`` go.
        config: the registration config (one compiled program per grid and device).
        init_fields: folder of starting fields ``disp_{FIXED}_{MOVING}.nii.gz`` (e.g. a learned
            model's output); a pair without one fails. Use with ``coarse.enabled=false`` to refine only.
        init_convention: how the starting fields are read: ``auto`` (each file's header says,
            :func:`jaxreg.transforms.detect_convention`), ``lumir`` or ``itk`` (ITK displacement
            fields from another tool, converted with the pair's image headers).
        evaluation: score each field when written
            (:func:`jaxreg.evaluation.config.evaluation_for`); skipped pairs are scored too, so
            ``evaluation.json`` covers every pair of the run.
        guard: with `init_fields`, write the start instead of a refined field through which the
            images match worse (global NCC).
        devices, threads_per_device: run on these JAX devices (default: every local device), with
            this many pairs in flight per device (:class:`jaxreg.apps.executors.LocalExecutor`).
        progress: called with a :class:`Progress` once the plan is made, then after each pair.
        executor: run the pairs to register through it (e.g. a
            :class:`jaxreg.apps.executors.RayExecutor`) instead of on `devices`; everything else
            (plan, resume, log, scoring) is unchanged.
        inverse: also write each field's inverse, ``inverse_{FIXED}_{MOVING}.nii.gz`` (a LUMIR field
            on the moving grid, :func:`jaxreg.apps.invert.write_inverse`), with its consistency in
            the run log; a field finished earlier without one is inverted, not registered again.

    Returns:
        The :class:`BatchReport`; ``report.exit_code`` is the number of failed pairs (max 125).

    Raises:
        InputError / ConfigError: before anything is read or compiled, for problems of the whole
        run (an output path that cannot be written, the starting-field folder missing, another
        config in the folder). A problem of one pair never raises: the pair is reported failed
        and the others run.
    """
    start = time.perf_counter()
    pairs = list(pairs)
    if not pairs:
        raise ConfigError("no pairs to register: the pair list (or this shard of it) is empty.")
    check_unique_fields(pairs, "pair list")
    output_dir = Path(output_dir)
    _check_outputs(output_dir, evaluate=evaluation is not None)
    init_dir = None
    if init_fields is not None:
        init_dir = Path(init_fields)
        if not init_dir.is_dir():
            raise InputError(f"starting-field folder '{init_dir}' does not exist: give the folder holding disp_*.nii.gz.")
        if output_dir.exists() and init_dir.resolve() == output_dir.resolve():
            raise ConfigError("the output folder is the starting-field folder: write the refined fields elsewhere.")
    if init_convention not in FIELD_CONVENTIONS:
        raise ConfigError(f"init_convention must be one of {list(FIELD_CONVENTIONS)}, got {init_convention!r}.")
    if evaluation is not None:
        known = {item.pair.key: item for item in evaluation.pairs}
        missing = [p.label for p in pairs if p.key not in known]
        if missing:
            raise ConfigError(f"the evaluation config has no entry for {', '.join(missing[:5])}: "
                              "build it with evaluation_for(pairs, dataset_dir).")
    executor = executor if executor is not None else LocalExecutor(devices, threads_per_device)
    settings = _run_settings(config, init_dir, guard)
    _check_run_config(output_dir, settings)

    planned = [_plan_pair(pair, output_dir, init_dir, inverse=inverse, init_convention=init_convention)
               for pair in pairs]
    if evaluation is not None:
        planned = [replace(p, job=replace(p.job, evaluation=known[p.job.pair.key])) for p in planned]
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_run_config(output_dir, settings)
    remove_stale_temporaries(output_dir, pairs)
    counts = {status: sum(p.status == status for p in planned) for status in ("run", "invert", "skipped", "failed")}
    log.info("batch: %d pair(s), %d to register, %d finished earlier (%d to invert), %d failed the checks, on %s",
             len(pairs), counts["run"], counts["skipped"] + counts["invert"], counts["invert"], counts["failed"],
             executor.name)

    registration = _Registration(planned, output_dir, evaluation, _RunLog(output_dir / RUN_LOG),
                                 executor.workers, progress)
    _register_all(planned, registration, executor, config, guard)
    outcomes = tuple(registration.outcomes[p.key] for p in pairs)

    report_eval = None
    if evaluation is not None:
        results = [registration.scored[p.key] for p in pairs if p.key in registration.scored]
        scored = replace(evaluation, pairs=tuple(item for item in evaluation.pairs if item.pair.key in registration.scored))
        report_eval = build_report(scored, output_dir, results, seconds=sum(r.seconds for r in results))
        write_json(report_eval, output_dir / EVALUATION_JSON)
    report = BatchReport(outcomes=outcomes, output_dir=output_dir, seconds=time.perf_counter() - start,
                         evaluation=report_eval, devices=executor.devices)
    log.info("batch done: %d ok, %d skipped, %d failed in %.1f s", report.count("ok"), report.count("skipped"),
             report.count("failed"), report.seconds)
    return report
