"""`jaxreg tune`: grid parsing, subject-disjoint splits, the search on a tiny labelled dataset, the preset file."""

import json
from pathlib import Path

import jaxreg.cli.tune  # noqa: F401  registers `jaxreg tune` on the app
import nibabel as nib
import numpy as np
import pytest
from jaxreg.cli.main import main
from synthetic import brain, pull, smooth_field

from jaxreg.config import load_config
from jaxreg.dataset import Pair
from jaxreg.evaluation.config import EvalPair
from jaxreg.errors import ConfigError
from jaxreg.apps.tune import (
    Split,
    TuneResult,
    candidates,
    choose,
    fold_splits,
    holdout_split,
    parse_grid,
)

BASE = ["--preset", "convexadam-lumir", "--set", "refine.iterations=30"]  # the program the other tests compile


def _save(data, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def make_dataset(root, subjects=6, labels=True):
    """SYNTH_0001..N: smooth deformations of one brain, label maps by intensity; pairs (i+1 <- i)."""
    base = brain()
    for i in range(1, subjects + 1):
        image = pull(base, smooth_field(amplitude=2.0, seed=10 + i))
        _save(image, root / "imagesVal" / f"SYNTH_{i:04d}_0000.nii.gz")
        if labels:
            _save((image > 100).astype(np.uint8) + (image > 180), root / "labelsVal" / f"SYNTH_{i:04d}_0000.nii.gz")
    validation = [{"fixed": f"./imagesVal/SYNTH_{i + 1:04d}_0000.nii.gz", "moving": f"./imagesVal/SYNTH_{i:04d}_0000.nii.gz"}
                  for i in range(1, subjects)]
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "validation": validation}))
    return root / "dataset.json"


def _pairs(edges):
    """EvalPairs for (fixed, moving) subject numbers; files are never opened by the split functions."""
    def path(i):
        return Path(f"/nowhere/X_{i:04d}_0000.nii.gz")
    return [EvalPair(pair=Pair.from_paths(path(f), path(m)), metrics=("dice",)) for f, m in edges]


def _keys(pairs):
    return {p.pair.key for p in pairs}


def test_grid_values_take_the_field_type_and_bad_entries_fail():
    base = load_config("lumir")
    axes = parse_grid(["refine.diffusion_weight=1,1.6,2.5", "refine.iterations=40,80",
                       "coarse.coupling_weights=[0.1,1],[1]"], base)
    assert axes == [("refine.diffusion_weight", (1.0, 1.6, 2.5)), ("refine.iterations", (40, 80)),
                    ("coarse.coupling_weights", ((0.1, 1.0), (1.0,)))]
    combos = candidates(base, axes)
    assert len(combos) == 12 and combos[0].config.refine.diffusion_weight == 1.0
    assert combos[-1].config.coarse.coupling_weights == (1.0,) and combos[-1].config.refine.intensity_weight == 3.0
    for bad, message in [("refine.nope=1,2", "unknown key 'refine.nope'"), ("refine.iterations=10,many", "must be int"),
                         ("refine.diffusion_weight=-1", "must be >= 0"), ("refine.iterations=", "empty value"),
                         ("refine.iterations", "stage.key=v1,v2"), ("nope.x=1", "unknown config section")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad], base)
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["refine.iterations=1", "refine.iterations=2"], base)


def test_holdout_split_is_deterministic_and_subject_disjoint():
    chain = _pairs([(i + 1, i) for i in range(1, 12)])  # OASIS-like chain over 12 subjects, 11 pairs
    split = holdout_split(chain, 0.3)
    assert split == holdout_split(list(chain), 0.3)
    assert _keys(split.heldout) == {"0010_0009", "0011_0010", "0012_0011"} and split.heldout_subjects == ("0009", "0010", "0011", "0012")
    assert len(split.tuning) == 7 and _keys(split.unused) == {"0009_0008"}
    tuning_subjects = {s for p in split.tuning for s in (p.pair.fixed_id, p.pair.moving_id)}
    assert not tuning_subjects & set(split.heldout_subjects)
    assert len(split.tuning) + len(split.heldout) + len(split.unused) == len(chain)
    with pytest.raises(ConfigError):
        holdout_split(chain[:1], 0.3)
    with pytest.raises(ConfigError):
        holdout_split(chain, 1.5)


def test_folds_hold_out_each_subject_block_once():
    chain = _pairs([(i + 1, i) for i in range(1, 12)])
    splits = fold_splits(chain, 3)
    assert len(splits) == 3
    held = [_keys(s.heldout) for s in splits]
    assert all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1:])
    for s in splits:
        held_subjects = {x for p in s.heldout for x in (p.pair.fixed_id, p.pair.moving_id)}
        assert not {x for p in s.tuning for x in (p.pair.fixed_id, p.pair.moving_id)} & held_subjects
    with pytest.raises(ConfigError):
        fold_splits(chain, 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tune") / "data")


def test_choice_respects_the_ndv_limit():
    pairs = _pairs([(2, 1), (3, 2)])
    base = load_config("lumir")
    result = TuneResult(base=base, candidates=candidates(base, parse_grid(["refine.diffusion_weight=1,2,3"], base)),
                        splits=[Split(tuple(pairs), ())], metric="dice", max_ndv=0.01, chosen=-1, fold_choices=[],
                        base_index=-1)
    scores = [(0.70, 0.5), (0.65, 0.001), (0.60, 0.0005)]  # the best Dice folds too much
    result.table = {(p.pair.key, i): {"dice": d, "ndv": n} for p in pairs for i, (d, n) in enumerate(scores)}
    assert choose(result, pairs) == 1 and not result.warnings
    result.max_ndv = None
    assert choose(result, pairs) == 0
    result.max_ndv = 1e-4
    assert choose(result, pairs) == 2 and "no setting keeps NDV" in result.warnings[0]
    result.metric, result.max_ndv = "hd95", None  # lower is better; a vanished label (inf) ranks last
    for p in pairs:
        for i, value in enumerate([float("inf"), 3.0, 2.5]):
            result.table[(p.pair.key, i)]["hd95"] = value
    assert choose(result, pairs) == 2


def test_tune_avoids_a_bad_setting_and_writes_a_loadable_preset(dataset, tmp_path, capsys):
    out = tmp_path / "presets" / "tuned.toml"
    code = main(["tune", str(dataset), "-o", str(out), *BASE,
                 "--grid", "refine.diffusion_weight=1.6,3000", "--grid", "coarse.enabled=true"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    # 5 pairs over 6 subjects: 2 tuning (3<-2, 2<-1 use subjects 1-3), 2 held out (subjects 4-6), 1 straddling
    assert "2 tuning pairs, 2 held-out (subjects 0004 0005 0006), 1 unused" in stderr
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 2 * 2 + 2  # base = chosen: held out once
    tuned = load_config(out)
    assert tuned == load_config("convexadam-lumir", ["refine.iterations=30"]) and tuned.name == "tuned"
    text = out.read_text()
    assert "refine.diffusion_weight in [1.6, 3000.0]" in text and "<- chosen" in text and "held-out pairs" in text
    assert "refine.diffusion_weight=1.6, coarse.enabled=True: dice" in stdout
    assert not list(out.parent.glob(".*tmp"))


def test_tune_with_folds_chooses_per_fold(dataset, tmp_path, capsys):
    out = tmp_path / "folds.toml"
    code = main(["tune", str(dataset), "-o", str(out), *BASE, "--grid", "refine.diffusion_weight=3000,1.6", "--folds", "2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "fold 1: 2 tuning pairs, 2 held-out (subjects 0001 0002 0003)" in stderr
    assert "fold 2: 2 tuning pairs, 2 held-out (subjects 0004 0005 0006)" in stderr
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 4 * 2  # every pair once per setting, base in the grid
    assert "2-fold cross-validation" in stdout and load_config(out).refine.diffusion_weight == 1.6


def test_tune_errors_are_one_line(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data", subjects=3, labels=False)
    out = tmp_path / "t.toml"
    for args, message in [(["--grid", "refine.nope=1,2"], "unknown key 'refine.nope'"),
                          (["--grid", "refine.iterations=1,x"], "refine.iterations must be int"),
                          (["--grid", "refine.iterations=1,2"], "needs a labelled dataset")]:
        code = main(["tune", str(dataset), "-o", str(out), *BASE, *args])
        stderr = capsys.readouterr().err
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
        assert not out.exists()
