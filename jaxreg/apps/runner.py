"""One pair of a batch run: load, check, register, guard, write atomically (and invert); then score.

:func:`run_pair` is the only code that registers a pair of a batch, wherever it runs: in this
process (:class:`jaxreg.apps.executors.LocalExecutor`) or on a cluster worker
(:class:`PairTask`, picklable). A problem of the pair (an unreadable or blank image, a shape
mismatch, memory) becomes a ``failed`` :class:`PairOutcome` with a one-line reason, never an
exception, so the other pairs run.

Refinement of a given field: with ``guard`` on, the refined field is kept only if the moving image
pulled through it correlates with the fixed image at least as well as through the start (global
NCC of the normalised images: the program's ``ncc_after`` against its ``ncc_before``, which is
taken through the starting field); otherwise the start is written unchanged. So refinement never
makes a field worse by that measure. Dice cannot be guarded without labels: the benchmark checks it.
A starting field may be a LUMIR field or another tool's ITK displacement field
(:func:`jaxreg.transforms.load_as_lumir`; the plan resolves which, ``PairJob.init_convention``).

Inverse fields: with ``PairJob.inverse`` set, the field is inverted once it is saved
(:func:`jaxreg.apps.invert.write_inverse`) and the inverse written atomically beside it as
:func:`inverse_name` (``inverse_{FIXED}_{MOVING}.nii.gz``: never ``disp_*``, so no evaluator,
container or submission takes it for a field); a job with ``invert_only`` inverts the field an
earlier run saved, without registering again. The outcome's ``inverse`` record names the file and
its consistency in voxels (:func:`inverse_record`).

Modality by rule (:func:`contrast_plan`): a pair whose file names give its images different
modalities (LUMIR25's ``_0000`` T1w fixed <- ``_0001`` moving) is registered without the preset's
intensity terms, the path the content-based same-contrast guard takes when it sees the contrasts
differ, decided up front. Other pairs keep the preset as it is, guard included. Each outcome says
which path the pair took and why (:func:`contrast_record`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax

from ..config import RegistrationConfig
from ..dataset import Pair
from ..errors import JaxregError, one_line
from ..evaluation.config import EvalPair, EvaluationConfig
from ..evaluation.evaluate import evaluate_fields
from ..evaluation.report import PairResult
from ..io import load_volume, save_field
from ..compilation import device_name
from ..registration import Summary, check_pair, run_program
from ..transforms import load_as_lumir
from .invert import InverseReport, write_inverse

log = logging.getLogger(__name__)

__all__ = ["CROSS_CONTRAST", "SAME_CONTRAST", "PairJob", "PairOutcome", "PairTask", "contrast_plan",
           "contrast_record", "guard_decision", "inverse_name", "inverse_record", "remove_stale_temporaries",
           "run_pair", "score_pair", "without_intensity_terms"]

SAME_CONTRAST = "same-contrast"  # MIND-SSC and the preset's intensity terms
CROSS_CONTRAST = "cross-contrast"  # MIND-SSC alone


def inverse_name(pair: Pair) -> str:
    """File name of the inverse of the pair's field: ``inverse_{FIXED}_{MOVING}.nii.gz`` (the
    inverse of ``disp_{FIXED}_{MOVING}.nii.gz``, on the moving grid)."""
    return f"inverse_{pair.key}.nii.gz"


@dataclass(frozen=True)
class PairJob:
    """Everything needed to register one pair into its output file, and how to score it.

    ``init``: the starting field, read as ``init_convention`` (``lumir`` or ``itk``).
    ``inverse``: where to write the field's inverse (None: no inverse). ``invert_only``: the field
    at ``output`` was finished by an earlier run; only its inverse is written."""

    pair: Pair
    output: Path
    init: Path | None = None
    evaluation: EvalPair | None = None
    init_convention: str = "lumir"
    inverse: Path | None = None
    invert_only: bool = False


@dataclass(frozen=True)
class PairOutcome:
    """What happened to one pair.

    Attributes:
        pair: the pair; status: ``ok``, ``skipped`` (finished by an earlier run) or ``failed``.
        seconds: registration time without compilation; compile_seconds: compilation on this pair
            (0 when the program was reused); wall_seconds: load, register and write.
        error: one line when failed. metrics: evaluation values when scored.
        device: the JAX device that ran it. guard: ``start_ncc``, ``ncc`` (global NCC through the
            start and through the refined field, higher is better) and ``kept_start``, when a
            starting field was refined with the guard on. contrast: the path the pair took
            (:func:`contrast_record`): ``contrast_path`` (``same-contrast``: intensity terms used;
            ``cross-contrast``: MIND-SSC alone), ``contrast_reason``, and ``contrast_ncc`` /
            ``intensity_used`` when the preset's guard decided (``contrast.min_ncc``).
        inverse: when an inverse field was written (:func:`inverse_record`).
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
    inverse: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"pair": self.pair.key, "fixed": str(self.pair.fixed), "moving": str(self.pair.moving),
                "field": self.pair.field_name, "status": self.status, "seconds": round(self.seconds, 3),
                "compile_seconds": round(self.compile_seconds, 3), "wall_seconds": round(self.wall_seconds, 3),
                "error": self.error, "metrics": self.metrics, "device": self.device, **self.guard, **self.contrast,
                **self.inverse}


def inverse_record(report: InverseReport, seconds: float) -> dict:
    """The run log's figures of a written inverse, in voxels: ``inverse_field`` (its file name),
    ``inverse_moving_mean`` / ``_p99`` / ``_max`` of ``|phi(psi(y)) - y|`` over the moving brain
    (what the inverse solves), ``inverse_fixed_mean`` / ``_p99`` of ``|psi(phi(x)) - x|`` over the
    fixed brain (the round trip through both fields' interpolation), ``inverse_seconds``."""
    moving, fixed = report.on_moving, report.on_fixed
    return {"inverse_field": report.path.name, "inverse_moving_mean": moving.mean, "inverse_moving_p99": moving.p99,
            "inverse_moving_max": moving.max, "inverse_fixed_mean": fixed.mean, "inverse_fixed_p99": fixed.p99,
            "inverse_seconds": round(seconds, 3)}


class _InverseFailed(JaxregError):
    """The pair's field was written, its inverse was not."""


def _invert(disp, output: Path, *, fixed, moving, vox2world=None, device=None) -> dict:
    """Write the inverse of `disp` (array or saved field) at `output`; its :func:`inverse_record`.
    `fixed`, `moving`: arrays or paths, whose brains mask the figures."""
    start = time.perf_counter()
    try:
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            report = write_inverse(disp, output, fixed=fixed, moving=moving, vox2world=vox2world)
    except Exception as err:  # reported on the pair; the field itself is complete
        log.debug("writing the inverse %s failed", output, exc_info=True)
        reason = f"{type(err).__name__}: {one_line(err)}"
        raise _InverseFailed(f"the field was written but not its inverse: {reason}") from err
    return inverse_record(report, time.perf_counter() - start)


def guard_decision(summary: Summary) -> dict:
    """``start_ncc``, ``ncc`` and ``kept_start`` of a registration that started from a given field:
    the start is kept when the images match worse through the refined field (a NaN NCC counts as
    worse). Both figures come from the registration program itself."""
    start_ncc, result_ncc = summary.ncc_before, summary.ncc_after
    return {"start_ncc": start_ncc, "ncc": result_ncc, "kept_start": not result_ncc >= start_ncc}


def without_intensity_terms(config: RegistrationConfig) -> RegistrationConfig:
    """`config` registering on MIND-SSC alone: no intensity channel in the feature level, no
    full-resolution intensity level. What the same-contrast guard leaves of a preset when it finds
    that the contrasts differ."""
    return replace(config, refine=replace(config.refine, intensity_weight=0.0), fine=replace(config.fine, enabled=False))


def contrast_plan(pair: Pair, config: RegistrationConfig) -> tuple[RegistrationConfig, str | None]:
    """The config a pair is registered with, and the rule's reason when it changed it.

    A pair whose images differ in modality (:attr:`jaxreg.dataset.Pair.modalities_differ`) is a
    cross-contrast pair by rule: a preset that matches contrasts (``contrast.match``) is told that
    they differ (``contrast.assume``), any other loses its intensity terms
    (:func:`without_intensity_terms`). Any other pair, of one modality or of none known, keeps
    `config`, whose guard (if it has one) judges the images."""
    if not (pair.modalities_differ and config.uses_intensity_terms):
        return config, None
    rule = f"modalities differ ({pair.fixed_modality} <- {pair.moving_modality}), by rule"
    if config.contrast.match:
        return (replace(config, contrast=replace(config.contrast, assume="different")),
                f"{rule}: intensity terms on the moving image mapped into the fixed contrast")
    return without_intensity_terms(config), f"{rule}: MIND-SSC alone"


def contrast_record(pair: Pair, config: RegistrationConfig, summary: Summary) -> dict:
    """Which path a registered pair took and why, for its outcome and the run log: ``contrast_path``,
    ``contrast_reason``, ``contrast_verdict`` where the guard decided (the reason without the figures) and,
    where the guard measured them, ``contrast_ncc``, ``contrast_match_gain``,
    ``intensity_used`` and ``intensity_matched``. `config` is the preset as given (before
    :func:`contrast_plan`)."""
    figures = {}
    if summary.contrast_ncc is not None:
        figures = {"contrast_ncc": round(summary.contrast_ncc, 4), "intensity_used": summary.intensity_terms_used,
                   "intensity_matched": summary.intensity_terms_matched}
        if summary.contrast_match_gain is not None:
            figures["contrast_match_gain"] = round(summary.contrast_match_gain, 4)
    by_rule = contrast_plan(pair, config)[1]
    if by_rule is not None:
        return {"contrast_path": CROSS_CONTRAST, "contrast_reason": by_rule, **figures}
    if not config.uses_intensity_terms:
        return {"contrast_path": CROSS_CONTRAST, "contrast_reason": "the preset has no intensity terms"}
    known = "" if pair.modalities_differ is None else f"modality {pair.fixed_modality} on both; "
    if summary.contrast_ncc is None:
        return {"contrast_path": SAME_CONTRAST, "contrast_reason": f"{known}the preset does not guard its intensity terms"}
    same = summary.intensity_terms_used and not summary.intensity_terms_matched
    return {"contrast_path": SAME_CONTRAST if same else CROSS_CONTRAST,
            "contrast_reason": f"{known}{summary.contrast_verdict()} (guard)",
            "contrast_verdict": f"the guard found the contrasts {'agree' if same else 'differ'}: {summary.contrast_action}",
            **figures}


def run_pair(job: PairJob, config: RegistrationConfig, *, guard: bool, device=None) -> PairOutcome:
    """Register one pair and write its field atomically (then its inverse, when the job asks);
    any failure is a ``failed`` outcome. A job with ``invert_only`` registers nothing: its saved
    field is inverted and the outcome is ``skipped`` with the inverse's record.

    `device`: compile for and run on this JAX device (several devices share a run); None runs on
    JAX's default device with the program every other caller shares. The pair's modalities may
    take the preset's intensity terms away (:func:`contrast_plan`)."""
    start = time.perf_counter()
    pair = job.pair
    device_label = device_name(device)
    inverse_info: dict = {}
    try:
        if job.invert_only:
            inverse_info = _invert(job.output, job.inverse, fixed=pair.fixed, moving=pair.moving, device=device)
            return PairOutcome(pair, "skipped", wall_seconds=time.perf_counter() - start, device=device_label,
                               inverse=inverse_info)
        fixed, vox2world = load_volume(pair.fixed, "fixed image")
        moving, moving_vox2world = load_volume(pair.moving, "moving image")
        check_pair(fixed, moving)  # same grid, large enough, neither image blank
        init = None
        if job.init is not None:
            init = load_as_lumir(job.init, fixed=pair.fixed, moving=pair.moving, convention=job.init_convention,
                                 shape=fixed.shape, what="starting field")
        result = run_program(contrast_plan(pair, config)[0], fixed, moving, init, device)
        disp, guard_info = result.disp, {}
        if init is not None and guard:
            guard_info = guard_decision(result.summary)
            if guard_info["kept_start"]:
                log.info("%s: the refined field matches worse than the start (NCC %.6f < %.6f): keeping the start",
                         pair.label, guard_info["ncc"], guard_info["start_ncc"])
                disp = init
        save_field(disp, job.output, vox2world)
        if job.inverse is not None:
            inverse_info = _invert(disp, job.inverse, fixed=fixed, moving=moving, vox2world=moving_vox2world,
                                   device=device)
    except JaxregError as err:
        return PairOutcome(pair, "failed", error=str(err), wall_seconds=time.perf_counter() - start, device=device_label)
    except Exception as err:  # one bad pair (memory, XLA) must not stop the others
        log.debug("pair %s failed", pair.label, exc_info=True)
        return PairOutcome(pair, "failed", error=f"{type(err).__name__}: {one_line(err)}",
                           wall_seconds=time.perf_counter() - start, device=device_label)
    summary = result.summary
    contrast = contrast_record(pair, config, summary)
    log.info("%s: %s (%s)", pair.label, contrast["contrast_path"], contrast["contrast_reason"])
    return PairOutcome(pair, "ok", seconds=summary.seconds, compile_seconds=summary.compile_seconds,
                       wall_seconds=time.perf_counter() - start, device=device_label, guard=guard_info,
                       contrast=contrast, inverse=inverse_info)


@dataclass(frozen=True)
class PairTask:
    """One pair to register, self-contained and picklable so that another process or machine can
    run it (:class:`jaxreg.apps.executors.RayExecutor`). ``task.run(device)`` is :func:`run_pair`;
    running it again rewrites the same field, so a retried task is harmless."""

    job: PairJob
    config: RegistrationConfig
    guard: bool

    @property
    def pair(self) -> Pair:
        return self.job.pair

    def run(self, device=None) -> PairOutcome:
        return run_pair(self.job, self.config, guard=self.guard, device=device)


def score_pair(job: PairJob, fields_dir: Path, evaluation: EvaluationConfig) -> PairResult:
    """Score one written field with the built-in evaluator (one pair, one thread), exactly as
    ``jaxreg evaluate`` scores it."""
    return evaluate_fields(fields_dir, replace(evaluation, pairs=(job.evaluation,)), workers=1).pairs[0]


def remove_stale_temporaries(output_dir: Path, pairs: Sequence[Pair]) -> None:
    """Delete temporary files a killed run left for these pairs' fields and inverses
    (``io.atomic_output`` names them ``.{name}.XXXX.tmp...``). Only these pairs': parallel shards
    keep theirs."""
    for pair in pairs:
        for name in (pair.field_name, inverse_name(pair)):
            for stale in Path(output_dir).glob(f".{name}.*.tmp*"):
                log.warning("removing %s, left by an interrupted run", stale)
                stale.unlink(missing_ok=True)
