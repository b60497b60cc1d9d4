"""Choose preset settings on a labelled dataset, and report them on pairs not used to choose.

``jaxreg tune`` registers the dataset's evaluated pairs with every combination of a small grid of
settings (one compiled program per combination, fields kept in memory), scores each field with the
built-in evaluator's metrics (Dice or HD95, NDV as a constraint), picks the best combination on the
tuning pairs and reports it next to the base preset on held-out pairs. Label maps are used for
scoring only; the registration never sees them.

Splits are subject-disjoint, because pairs share subjects (a chain ``2<-1, 3<-2, ...`` or LUMIR's
random pairs): with ``holdout`` the subjects are sorted by ID and the last ones are held out, as
few as give at least ``holdout`` of the pairs; held-out pairs have both subjects held out, tuning
pairs neither, and pairs with one subject on each side are not used (reported). With ``folds`` K,
the sorted subjects form K contiguous blocks and each block is held out once (cross-validation);
every pair is registered once per combination, each fold chooses on its own tuning pairs, and the
preset written is the choice on all pairs. Only pairs scored with the metric take part (on OASIS
the landmark-only pairs are ignored).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..evaluation import metrics
from ..config import RegistrationConfig, config_from_dict, parse_override
from ..evaluation.config import EvalPair, EvaluationConfig
from ..errors import ConfigError, InputError
from ..evaluation.evaluate import label_metrics
from ..io import load_labels, load_volume
from ..registration import register

__all__ = ["Candidate", "Split", "TuneResult", "candidates", "fold_splits", "holdout_split", "parse_grid",
           "report_lines", "tune"]

METRICS = {"dice": 1.0, "hd95": -1.0}  # metric -> sign (higher is better after multiplying)


@dataclass(frozen=True)
class Candidate:
    """One combination of grid values: ``settings`` as ((``stage.key``, value), ...) and its config."""

    settings: tuple
    config: RegistrationConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings) or "base"


@dataclass(frozen=True)
class Split:
    """Tuning pairs, held-out pairs and pairs left out because they straddle the two subject sets."""

    tuning: tuple[EvalPair, ...]
    heldout: tuple[EvalPair, ...]
    unused: tuple[EvalPair, ...] = ()
    heldout_subjects: tuple[str, ...] = ()


@dataclass
class TuneResult:
    """What :func:`tune` found. ``table`` maps (pair key, candidate index) -> metric values; index -1
    is the base preset when it is not one of the candidates."""

    base: RegistrationConfig
    candidates: list[Candidate]
    splits: list[Split]
    metric: str
    max_ndv: float | None
    chosen: int
    fold_choices: list[int]
    base_index: int
    table: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def _stats(self, rows: list[dict]) -> dict:
        if not rows:
            return {}
        return {self.metric: float(np.mean([r[self.metric] for r in rows])),
                "ndv_mean": float(np.mean([r["ndv"] for r in rows])),
                "ndv_max": float(np.max([r["ndv"] for r in rows])), "n": len(rows)}

    def aggregate(self, index: int, pairs: Sequence[EvalPair]) -> dict:
        """Mean metric, mean and max NDV of candidate `index` over `pairs` (all must be scored)."""
        return self._stats([self.table[(p.pair.key, index)] for p in pairs])

    def heldout(self) -> dict:
        """Held-out figures of the chosen settings (per fold: that fold's choice) and of the base preset."""
        chosen = [self.table[(p.pair.key, self.fold_choices[f])] for f, s in enumerate(self.splits) for p in s.heldout]
        return {"chosen": self._stats(chosen),
                "base": self.aggregate(self.base_index, [p for s in self.splits for p in s.heldout])}

    @property
    def tuning_pairs(self) -> list[EvalPair]:
        """The pairs the final choice was made on."""
        if len(self.splits) == 1:
            return list(self.splits[0].tuning)
        return _unique(p for s in self.splits for p in s.tuning + s.heldout)


def _unique(items) -> list:
    seen, out = set(), []
    for item in items:
        if item.pair.key not in seen:
            seen.add(item.pair.key)
            out.append(item)
    return out


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------

def _split_values(text: str) -> list[str]:
    """Split ``1,1.6,[1,2]`` at the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current]]


def parse_grid(specs: Sequence[str], base: RegistrationConfig) -> list[tuple[str, tuple]]:
    """``["refine.diffusion_weight=1,1.6,2.5", ...]`` -> [("refine.diffusion_weight", (1.0, 1.6, 2.5)), ...].

    Every value is checked by building a config with it (unknown key, wrong type, out of range:
    :class:`ConfigError`); values take the field's type, so ``1`` and ``1.0`` are one value.
    """
    axes, seen = [], set()
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"grid '{spec}' must look like stage.key=v1,v2,... e.g. refine.diffusion_weight=1,1.6,2.5")
        lhs, rhs = spec.split("=", 1)
        raw = _split_values(rhs)
        if not rhs.strip() or any(not v for v in raw):
            raise ConfigError(f"grid '{spec}': empty value; give a comma-separated list, e.g. {lhs.strip()}=1,2")
        values = []
        for text in raw:
            stage, key, value = parse_override(f"{lhs.strip()}={text}")
            config = config_from_dict({stage: {key: value}}, name=base.name, base=base)
            values.append(getattr(getattr(config, stage), key))
        name = f"{stage}.{key}"
        if name in seen:
            raise ConfigError(f"grid key '{name}' is given twice: list all its values in one --grid")
        seen.add(name)
        axes.append((name, tuple(dict.fromkeys(values))))
    if not axes:
        raise ConfigError("give at least one --grid stage.key=v1,v2,...")
    return axes


def candidates(base: RegistrationConfig, axes: Sequence[tuple[str, tuple]]) -> list[Candidate]:
    """Every combination of the axes' values on top of `base`, in grid order (first axis slowest)."""
    out = []
    for values in itertools.product(*(vals for _, vals in axes)):
        settings = tuple((name, value) for (name, _), value in zip(axes, values))
        nested: dict = {}
        for name, value in settings:
            stage, key = name.split(".", 1)
            nested.setdefault(stage, {})[key] = value
        out.append(Candidate(settings, config_from_dict(nested, name=base.name, base=base)))
    return out


# --------------------------------------------------------------------------------------------
# subject-disjoint splits
# --------------------------------------------------------------------------------------------

def _subjects(pairs: Sequence[EvalPair]) -> list[str]:
    return sorted({s for p in pairs for s in (p.pair.fixed_id, p.pair.moving_id)})


def _divide(pairs: Sequence[EvalPair], held: set) -> Split:
    inside = lambda p: {p.pair.fixed_id, p.pair.moving_id}
    return Split(tuning=tuple(p for p in pairs if not inside(p) & held),
                 heldout=tuple(p for p in pairs if inside(p) <= held),
                 unused=tuple(p for p in pairs if inside(p) & held and not inside(p) <= held),
                 heldout_subjects=tuple(sorted(held)))


def holdout_split(pairs: Sequence[EvalPair], fraction: float) -> Split:
    """Hold out the last subjects by ID, as few as give ``round(fraction * pairs)`` (>= 1) held-out pairs."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--holdout must be between 0 and 1 (a fraction of the pairs), got {fraction}")
    subjects = _subjects(pairs)
    target = max(1, round(fraction * len(pairs)))
    for k in range(1, len(subjects)):
        split = _divide(pairs, set(subjects[-k:]))
        if len(split.heldout) >= target:
            break
    if not split.tuning or not split.heldout:
        raise ConfigError(f"cannot split {len(pairs)} pairs into subject-disjoint tuning and held-out pairs "
                          f"(held-out fraction {fraction}): the dataset needs more pairs or subjects")
    return split


def fold_splits(pairs: Sequence[EvalPair], folds: int) -> list[Split]:
    """K contiguous blocks of the subjects sorted by ID; fold k holds out the pairs inside block k."""
    subjects = _subjects(pairs)
    if not 2 <= folds <= len(subjects):
        raise ConfigError(f"--folds must be between 2 and the number of subjects ({len(subjects)}), got {folds}")
    splits = [_divide(pairs, set(block)) for block in np.array_split(np.array(subjects, dtype=object), folds)]
    splits = [s for s in splits if s.heldout and s.tuning]
    if not splits:
        raise ConfigError(f"no fold of {folds} has both held-out and tuning pairs: use --holdout or fewer folds")
    return splits


# --------------------------------------------------------------------------------------------
# registering and scoring in memory
# --------------------------------------------------------------------------------------------

def score_field(disp: np.ndarray, fixed: np.ndarray, fixed_labels: np.ndarray, moving_labels: np.ndarray,
                evaluation: EvaluationConfig, metric: str) -> dict:
    """The evaluator's Dice (and HD95 if it is the metric) and NDV (fixed-image mask) of one field."""
    values, _ = label_metrics(fixed_labels, moving_labels, disp, evaluation, {"dice", metric})
    values["ndv"] = metrics.ndv(disp, metrics.image_mask(fixed))
    return values


def _score_all(result: TuneResult, pairs: Sequence[EvalPair], indices: Sequence[int], configs: dict,
               evaluation: EvaluationConfig, say: Callable[[str], None]) -> None:
    """Register and score every (pair, candidate) not yet in the table; pairs outer, so each pair's
    images and labels are read once. Compiled programs are cached per config by the pipeline."""
    todo = [(p, i) for p in pairs for i in indices if (p.pair.key, i) not in result.table]
    start, done = time.perf_counter(), 0
    for item in pairs:
        mine = [i for p, i in todo if p is item]
        if not mine:
            continue
        fixed = load_volume(item.pair.fixed, "fixed image")[0]
        moving = load_volume(item.pair.moving, "moving image")[0]
        fixed_labels = load_labels(item.fixed_labels, "fixed label map")
        moving_labels = load_labels(item.moving_labels, "moving label map")
        for index in mine:
            reg = register(fixed, moving, config=configs[index])
            values = score_field(reg.disp, fixed, fixed_labels, moving_labels, evaluation, result.metric)
            values["seconds"] = reg.summary.seconds
            result.table[(item.pair.key, index)] = values
            done += 1
            eta = (time.perf_counter() - start) / done * (len(todo) - done)
            name = "base preset" if index == -1 else result.candidates[index].label
            compiled = reg.summary.compile_seconds
            say(f"[{done:>{len(str(len(todo)))}}/{len(todo)}] {item.pair.label}  {name}: {result.metric} "
                f"{values[result.metric]:.4f}  NDV {values['ndv']:.5f}%  {reg.summary.seconds:.1f} s"
                + (f" (+{compiled:.1f} s compilation)" if compiled else "") + f"  ETA {eta / 60:.1f} min")


def choose(result: TuneResult, pairs: Sequence[EvalPair]) -> int:
    """Index of the best candidate on `pairs`: best mean metric among those whose NDV stays <= max_ndv
    on every pair; ties go to the earlier one. If none qualifies, the one with the lowest max NDV."""
    sign = METRICS[result.metric]
    stats = [result.aggregate(i, pairs) for i in range(len(result.candidates))]
    allowed = [i for i, s in enumerate(stats) if result.max_ndv is None or s["ndv_max"] <= result.max_ndv]
    if not allowed:
        best = min(range(len(stats)), key=lambda i: stats[i]["ndv_max"])
        result.warnings.append(f"no setting keeps NDV <= {result.max_ndv}% on every tuning pair: chose the one "
                               f"with the lowest (max {stats[best]['ndv_max']:.5f}%)")
        return best
    return max(allowed, key=lambda i: (_goodness(sign * stats[i][result.metric]), -i))


def _goodness(value: float) -> float:
    """Higher is better; NaN (no label left) and an infinite HD95 (a label vanished) rank last."""
    return value if math.isfinite(value) else -math.inf


def tune(evaluation: EvaluationConfig, base: RegistrationConfig, axes: Sequence[tuple[str, tuple]], *,
         holdout: float = 0.3, folds: int = 0, metric: str = "dice", max_ndv: float | None = 0.01,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Search the grid `axes` on top of `base` over the labelled pairs of `evaluation`.

    Arguments:
        evaluation: the dataset's evaluation config (pairs, labels); pairs without `metric` are ignored.
        base: the preset the grid modifies, reported on the held-out pairs too.
        axes: from :func:`parse_grid`.
        holdout: fraction of pairs held out (subject-disjoint, see the module doc); ignored with `folds`.
        folds: K >= 2 for K-fold cross-validation over subject blocks.
        metric: ``dice`` (maximised) or ``hd95`` (minimised).
        max_ndv: largest NDV (%) allowed on any tuning pair; None = no constraint.
        progress: called with one line per registration and per decision.

    Raises:
        ConfigError: bad metric, no labelled pairs, a split that leaves one side empty.
    """
    say = progress or (lambda _line: None)
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    pairs = [p for p in evaluation.pairs if metric in p.metrics and p.fixed_labels is not None]
    if not pairs:
        raise InputError(f"no pair of '{evaluation.source}' has label maps scored with {metric}: jaxreg tune needs a "
                         "labelled dataset (labelsVal/ next to imagesVal/, or an evaluation_config.json with dice pairs)")
    splits = fold_splits(pairs, folds) if folds else [holdout_split(pairs, holdout)]
    cands = candidates(base, axes)
    base_index = next((i for i, c in enumerate(cands) if c.config == base), -1)  # configs compare without their name
    result = TuneResult(base=base, candidates=cands, splits=splits, metric=metric, max_ndv=max_ndv,
                        chosen=-1, fold_choices=[], base_index=base_index)
    configs = {i: c.config for i, c in enumerate(cands)} | {-1: base}
    grid = list(range(len(cands)))
    for number, split in enumerate(splits, 1):
        fold = f"fold {number}: " if folds else ""
        say(f"tune: {fold}{len(split.tuning)} tuning pairs, {len(split.heldout)} held-out "
            f"(subjects {' '.join(split.heldout_subjects)}), {len(split.unused)} unused (one subject on each side)")
    say(f"tune: {len(cands)} settings x {len(result.tuning_pairs)} pairs, metric {metric}, "
        f"max NDV {max_ndv if max_ndv is not None else 'none'}%")
    _score_all(result, result.tuning_pairs, grid, configs, evaluation, say)
    result.fold_choices = [choose(result, s.tuning) for s in splits] if folds else []
    result.chosen = choose(result, result.tuning_pairs)
    if not folds:
        result.fold_choices = [result.chosen]
    say(f"tune: chose {cands[result.chosen].label}")
    heldout = _unique(p for s in splits for p in s.heldout)
    _score_all(result, heldout, sorted({*result.fold_choices, base_index}), configs, evaluation, say)
    return result


def report_lines(result: TuneResult) -> list[str]:
    """The search in words: every setting on the tuning pairs, the choice, the held-out comparison."""
    m, tuning = result.metric, result.tuning_pairs
    lines = [f"{m} (mean) and NDV % (max) on the {len(tuning)} tuning pairs ({' '.join(p.pair.label for p in tuning)}):"]
    for i, cand in enumerate(result.candidates):
        s = result.aggregate(i, tuning)
        mark = (" (= base preset)" if i == result.base_index else "") + ("  <- chosen" if i == result.chosen else "")
        lines.append(f"  {cand.label}: {m} {s[m]:.4f}, NDV max {s['ndv_max']:.5f}{mark}")
    held = result.heldout()
    pairs = " ".join(p.pair.label for s in result.splits for p in s.heldout)
    how = f"{len(result.splits)}-fold cross-validation, each fold's own choice" if len(result.splits) > 1 else "chosen"
    lines.append(f"held-out pairs ({pairs}), never used to choose:")
    for name, s in (("tuned (" + how + ")", held["chosen"]), (f"base preset {result.base.name}", held["base"])):
        lines.append(f"  {name}: {m} {s[m]:.4f}, NDV mean {s['ndv_mean']:.5f} max {s['ndv_max']:.5f} (n={s['n']})")
    return lines + [f"warning: {w}" for w in result.warnings]
