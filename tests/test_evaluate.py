"""jaxreg.dataset, jaxreg.evaluation (config, evaluate, report) and `jaxreg evaluate` on a tiny synthetic
dataset, plus the real OASIS benchmark (zero fields must reproduce the figures of its README)."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxreg import dataset, io
from jaxreg.evaluation import config as evalconfig
from jaxreg.evaluation import evaluate, metrics, report as reports
from jaxreg.errors import ConfigError, InputError
from data_paths import OASIS

SHAPE = (14, 16, 12)
LABELS = [0, 1, 2, 3, 4]


def name(subject):
    return f"TINY_{subject:04d}_0000.nii.gz"


def blob_labels(rng):
    fields = np.stack([ndimage.gaussian_filter(rng.random(SHAPE), 1.5) for _ in range(4)])
    labels = (np.argmax(fields, axis=0) + 1).astype(np.uint16)
    labels[:, :, :2] = 0
    labels[:2] = 0
    return labels


@pytest.fixture
def tiny(tmp_path):
    """Four subjects: images, label maps, landmarks (subjects 3, 4), dataset.json, evaluation_config.json."""
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for sub in ("imagesVal", "labelsVal", "landmarksVal"):
        (root / sub).mkdir(parents=True)
    for subject in range(1, 5):
        image = np.zeros(SHAPE, np.uint8)
        image[2 + subject % 2:-2, 2:-2, 2:-2] = 100 + subject  # foregrounds differ: fixed vs moving masks
        io.save_volume(image, root / "imagesVal" / name(subject), dtype=np.uint8)
        io.save_volume(blob_labels(rng), root / "labelsVal" / name(subject), dtype=np.uint16)
    points = {3: [(4, 5, 6), (9, 10, 5), (7, 7, 8)], 4: [(5, 5, 6), (9, 11, 5), (7, 6, 7)]}
    for subject, pts in points.items():
        volume = np.zeros(SHAPE, np.uint8)
        for k, p in enumerate(pts, start=1):
            volume[p] = k
        io.save_volume(volume, root / "landmarksVal" / name(subject), dtype=np.uint8)
        rows = ["id,name,x,y,z"] + [f"{k},L{k},{p[0]},{p[1]},{p[2]}" for k, p in enumerate(pts, start=1)]
        (root / "landmarksVal" / name(subject).replace(".nii.gz", ".csv")).write_text("\n".join(rows) + "\n")
    pairs = [(2, 1), (3, 2), (4, 3)]
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "training": [{"image": f"./imagesVal/{name(1)}"}],
        "validation": [{"fixed": f"./imagesVal/{name(f)}", "moving": f"./imagesVal/{name(m)}"} for f, m in pairs]}))
    metrics_of = {(2, 1): ["ndv", "dice", "hd95"], (3, 2): ["ndv", "dice", "hd95"], (4, 3): ["ndv", "tre"]}
    (root / "evaluation_config.json").write_text(json.dumps({
        "name": "tiny eval", "expected_shape": [*SHAPE, 3],
        "evaluation_methods": [{"name": "NDV", "metric": "ndv"}, {"name": "DSC", "metric": "dice", "labels": LABELS},
                               {"name": "HD95", "metric": "hd95", "labels": LABELS},
                               {"name": "TRE", "metric": "tre", "dest": "landmarks"}],
        "labels": LABELS,
        "label_dirs": {"dice": "labelsVal", "hd95": "labelsVal", "tre": "landmarksVal"},
        "eval_pairs": [{"fixed": f"./imagesVal/{name(f)}", "moving": f"./imagesVal/{name(m)}", "metrics": metrics_of[(f, m)]}
                       for f, m in pairs]}))
    return root


def write_fields(folder, disp=None, keys=("0002_0001", "0003_0002", "0004_0003")):
    folder.mkdir(parents=True, exist_ok=True)
    disp = np.zeros((3, *SHAPE), np.float32) if disp is None else disp
    for key in keys:
        io.save_field(disp, folder / f"disp_{key}.nii.gz")
    return folder


def run_cli(args, capsys):
    """Run `jaxreg evaluate ARGS`; returns (exit code, stdout, stderr)."""
    from jaxreg.cli.main import main

    code = main(["evaluate"] + [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------

def test_load_pairs_reads_ids_field_names_and_absolute_paths_without_labels(tiny):
    for sub in ("labelsVal", "landmarksVal"):
        for f in (tiny / sub).iterdir():
            f.unlink()
    pairs = dataset.load_pairs(tiny / "dataset.json")
    assert [p.key for p in pairs] == ["0002_0001", "0003_0002", "0004_0003"]
    assert pairs[0].field_name == "disp_0002_0001.nii.gz" and pairs[0].label == "0002<-0001"
    assert pairs[0].fixed == (tiny / "imagesVal" / name(2)).resolve() and pairs[0].fixed.is_absolute()
    assert dataset.load_pairs(tiny) == pairs  # the folder works too


def test_load_pairs_resolves_against_root_when_the_json_lies_elsewhere(tiny, tmp_path):
    apart = tmp_path / "apart" / "LUMIR25_dataset.json"
    apart.parent.mkdir()
    apart.write_text((tiny / "dataset.json").read_text())
    with pytest.raises(InputError, match="does not exist"):
        dataset.load_pairs(apart)
    assert dataset.load_pairs(apart, root=tiny) == dataset.load_pairs(tiny)


def test_load_pairs_errors_are_one_line_and_say_what_to_do(tiny):
    (tiny / "imagesVal" / name(3)).unlink()
    with pytest.raises(InputError) as err:
        dataset.load_pairs(tiny / "dataset.json")
    assert name(3) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no 'test' list"):
        dataset.load_pairs(tiny / "dataset.json", split="test")
    with pytest.raises(ConfigError, match="single images"):
        dataset.load_pairs(tiny / "dataset.json", split="training")
    with pytest.raises(InputError, match="name"):
        dataset.subject_id("./imagesVal/brain.nii.gz")


def test_evaluation_config_per_pair_metrics_and_label_dirs(tiny):
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    assert config.name == "tiny eval" and config.expected_shape == SHAPE
    assert config.dice_labels == tuple(LABELS) and config.hd95_labels == tuple(LABELS)
    first, _, last = config.pairs
    assert first.metrics == ("ndv", "dice", "hd95") and last.metrics == ("ndv", "tre")
    assert first.fixed_labels == (tiny / "labelsVal" / name(2)).resolve() and first.fixed_landmarks is None
    assert last.moving_landmarks == (tiny / "landmarksVal" / name(3)).resolve()
    assert last.fixed_keypoints.name == "TINY_0004_0000.csv" and last.fixed_labels is None


def test_plain_lumir_config_applies_every_method_to_every_pair(tiny):
    plain = {"name": "plain", "evaluation_methods": [{"metric": "ndv"}, {"metric": "dice", "labels": [0, 1, 2]}],
             "eval_pairs": [{"fixed": f"./imagesVal/{name(2)}", "moving": f"./imagesVal/{name(1)}"}]}
    (tiny / "plain.json").write_text(json.dumps(plain))
    config = evalconfig.load_evaluation_config(tiny / "plain.json")
    assert config.pairs[0].metrics == ("ndv", "dice") and config.dice_labels == (0, 1, 2)
    assert config.hd95_labels is None  # no hd95 method: not needed
    assert config.pairs[0].moving_labels == (tiny / "labelsVal" / name(1)).resolve()  # images -> labels


def test_evaluation_config_errors(tiny):
    config = json.loads((tiny / "evaluation_config.json").read_text())
    config["eval_pairs"][0]["metrics"] = ["ndv", "jacobian"]
    (tiny / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unknown metric.*jacobian.*must be among"):
        evalconfig.load_evaluation_config(tiny / "bad.json")
    (tiny / "labelsVal" / name(3)).unlink()
    with pytest.raises(InputError, match=r"pair 0003<-0002: fixed label map"):
        evalconfig.load_evaluation_config(tiny / "evaluation_config.json")


def test_resolve_prefers_explicit_then_folder_config_then_default(tiny):
    assert evalconfig.resolve_evaluation_config(tiny).source.endswith("evaluation_config.json")
    (tiny / "evaluation_config.json").rename(tiny / "other.json")
    assert evalconfig.resolve_evaluation_config(tiny, tiny / "other.json").name == "tiny eval"
    default = evalconfig.resolve_evaluation_config(tiny)
    assert default.source.startswith("default") and default.dice_labels is None
    assert [p.metrics for p in default.pairs] == [("ndv", "dice", "hd95")] * 2 + [("ndv", "dice", "hd95", "tre")]


def test_one_default_rule_for_evaluate_and_for_a_batch_run_keypoint_csvs_included(tiny):
    (tiny / "evaluation_config.json").unlink()
    pairs = dataset.load_pairs(tiny)
    for_evaluate = evalconfig.resolve_evaluation_config(tiny)
    for_batch = evalconfig.evaluation_for(pairs, tiny)
    assert for_evaluate.pairs == for_batch.pairs == tuple(evalconfig.default_eval_pair(p) for p in pairs)
    last = for_batch.pairs[-1]
    assert last.metrics == ("ndv", "dice", "hd95", "tre")
    assert last.fixed_keypoints == tiny / "landmarksVal" / "TINY_0004_0000.csv"
    assert last.moving_keypoints == tiny / "landmarksVal" / "TINY_0003_0000.csv"
    (tiny / "landmarksVal" / "TINY_0003_0000.csv").unlink()  # a CSV on one side only: volumes alone
    assert evalconfig.default_eval_pair(pairs[-1]).fixed_keypoints is None
    assert evalconfig.default_eval_pair(pairs[-1]).metrics == ("ndv", "dice", "hd95", "tre")


def test_a_batch_run_takes_listed_pairs_from_the_config_and_the_rest_from_the_default_rule(tiny):
    config = json.loads((tiny / "evaluation_config.json").read_text())
    config["eval_pairs"] = config["eval_pairs"][:1]  # lists 0002<-0001 only
    (tiny / "evaluation_config.json").write_text(json.dumps(config))
    run = evalconfig.evaluation_for(dataset.load_pairs(tiny), tiny)
    assert run.name == "tiny eval" and run.dice_labels == tuple(LABELS)
    assert [p.metrics for p in run.pairs] == [("ndv", "dice", "hd95"), ("ndv", "dice", "hd95"),
                                              ("ndv", "dice", "hd95", "tre")]
    assert "default rule for the 2 pairs it does not list" in run.source


# --------------------------------------------------------------------------------------------
# evaluate_fields
# --------------------------------------------------------------------------------------------

def test_zero_fields_score_what_the_metrics_give(tiny, tmp_path):
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    report = evaluate.evaluate_fields(write_fields(tmp_path / "fields"), config, workers=2)
    assert report.ok and [p.status for p in report.pairs] == ["ok"] * 3
    fixed, moving = (io.load_labels(tiny / "labelsVal" / name(s)) for s in (2, 1))
    first = report.pairs[0]
    assert first.values["dice"] == metrics.nan_mean(metrics.dice(fixed, moving, moving, LABELS))
    assert first.values["hd95"] == metrics.nan_mean(metrics.hd95(fixed, moving, moving, LABELS))
    assert first.values["ndv"] == 0.0 and abs(first.values["sdlogj"]) < 1e-12
    assert set(first.values) == {"dice", "hd95", "ndv", "sdlogj"}
    landmark = report.pairs[2]
    # landmarks moved by (1,0,0), (0,1,0), (0,-1,-1): distances 1, 1, sqrt(2)
    expected = (2 + math.sqrt(2)) / 3
    assert landmark.values["tre_lm"] == pytest.approx(expected) and landmark.values["tre_kp"] == pytest.approx(expected)
    assert landmark.details["tre_vanished"] == [] and "dice" not in landmark.values
    assert report.summary["dice"]["n"] == 2 and report.summary["ndv"]["n"] == 3
    values = [p.values["dice"] for p in report.pairs[:2]]
    assert report.summary["dice"]["mean"] == np.mean(values) and report.summary["dice"]["q30"] == np.quantile(values, 0.3)


def test_missing_half_resolution_and_nan_fields_are_reported_and_counted(tiny, tmp_path):
    fields = write_fields(tmp_path / "fields", keys=("0002_0001",))
    io.save_field(np.zeros((3, 7, 8, 6), np.float32), fields / "disp_0003_0002.nii.gz")  # half resolution
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    report = evaluate.evaluate_fields(fields, config, allow_missing=True)
    assert [p.status for p in report.pairs] == ["ok", "invalid", "missing"]
    assert not report.ok and len(report.failed) == 2 and [p.key for p in report.missing] == ["0004_0003"]
    assert "grid" in report.pairs[1].error and "disp_0004_0003.nii.gz" in report.pairs[2].error
    assert report.summary["ndv"]["n"] == 1  # scored pairs only
    bad = np.zeros((3, *SHAPE), np.float32)
    bad[0, 3, 3, 3] = np.nan
    io.save_field(bad, fields / "disp_0003_0002.nii.gz")
    report = evaluate.evaluate_fields(fields, config, allow_missing=True)
    assert report.pairs[1].status == "invalid" and "non-finite" in report.pairs[1].error


def test_missing_fields_are_refused_before_anything_is_scored(tiny, tmp_path):
    fields = write_fields(tmp_path / "fields", keys=("0002_0001",))
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    rows = []
    with pytest.raises(InputError, match=r"2 of 3 fields are missing .*disp_0003_0002.nii.gz, disp_0004_0003.nii.gz"):
        evaluate.evaluate_fields(fields, config, progress=rows.append)
    assert rows == []


def test_progress_gets_every_row_in_order_and_the_table_prints_them_as_the_report_does(tiny, tmp_path):
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    rows = []
    report = evaluate.evaluate_fields(write_fields(tmp_path / "fields"), config, workers=3, progress=rows.append)
    assert rows == list(report.pairs)
    table = reports.ReportTable.for_config(config)
    assert table.columns == report.columns == ("dice", "hd95", "tre_lm", "tre_kp", "ndv", "sdlogj")
    lines = reports.report_lines(report)
    assert lines[:4] == [table.header()] + [table.row(r) for r in rows] and lines[4] == ""
    assert lines[5:] == reports.summary_lines(report) and lines[5].startswith("summary over scored pairs")
    cells = lines[1].split()
    assert cells[0] == "0002<-0001" and cells[1] == format(report.pairs[0].values["dice"], ".4f")
    assert cells[3:5] == ["-", "-"]  # no TRE on this pair


def test_folding_field_ndv_with_fixed_or_moving_mask(tiny, tmp_path):
    disp = np.zeros((3, *SHAPE), np.float32)
    disp[0, 6] = -2.0  # the hand-computed fold of test_metrics
    fields = write_fields(tmp_path / "fields", disp)
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    for mask_kind, subject in (("fixed", 2), ("moving", 1)):
        report = evaluate.evaluate_fields(fields, config, ndv_mask=mask_kind)
        image, _ = io.load_volume(tiny / "imagesVal" / name(subject))
        assert report.pairs[0].values["ndv"] == metrics.ndv(disp, image > 0) > 0
    assert metrics.ndv(disp, io.load_volume(tiny / "imagesVal" / name(2))[0] > 0) != \
        metrics.ndv(disp, io.load_volume(tiny / "imagesVal" / name(1))[0] > 0)
    with pytest.raises(ConfigError, match="ndv_mask"):
        evaluate.evaluate_fields(fields, config, ndv_mask="both")


def test_vanished_labels_and_landmarks_are_named_in_the_report(tiny, tmp_path):
    disp = np.full((3, *SHAPE), 40.0, np.float32)  # every sample outside the volume: all background
    config = evalconfig.load_evaluation_config(tiny / "evaluation_config.json")
    report = evaluate.evaluate_fields(write_fields(tmp_path / "fields", disp), config)
    assert report.ok
    assert report.pairs[0].details["hd95_vanished"] == [1, 2, 3, 4] and math.isinf(report.pairs[0].values["hd95"])
    assert report.pairs[2].details["tre_vanished"] == [1, 2, 3] and math.isnan(report.pairs[2].values["tre_lm"])
    assert math.isinf(report.summary["hd95"]["mean"])


def test_json_and_csv_reports_are_written_atomically(tiny, tmp_path):
    fields = write_fields(tmp_path / "fields", keys=("0002_0001", "0003_0002"))
    report = evaluate.evaluate_fields(fields, evalconfig.load_evaluation_config(tiny / "evaluation_config.json"),
                                      allow_missing=True)
    out = tmp_path / "out"
    reports.write_json(report, out / "report.json")
    reports.write_csv(report, out / "report.csv")
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json"]  # no temporary files left
    data = json.loads((out / "report.json").read_text())
    assert data["pairs_total"] == 3 and data["pairs_scored"] == 2 and "0004_0003" in data["pairs_failed"]
    assert data["pairs_missing"] == 1
    assert data["pairs"]["0002_0001"]["dice"] == report.pairs[0].values["dice"]
    assert data["summary"]["dice"]["n"] == 2
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "missing"]
    assert float(rows[0]["dice"]) == report.pairs[0].values["dice"] and rows[2]["dice"] == ""


# --------------------------------------------------------------------------------------------
# jaxreg evaluate
# --------------------------------------------------------------------------------------------

def test_cli_scores_all_pairs_and_exits_zero(tiny, tmp_path, capsys):
    fields = write_fields(tmp_path / "fields")
    code, out, err = run_cli([tiny, fields, "-o", tmp_path / "r.json", "--csv", tmp_path / "r.csv"], capsys)
    assert code == 0, err
    assert "evaluation_config.json" in out and "0002<-0001" in out and "summary" in out
    assert "3 of 3 pairs scored" in out
    assert json.loads((tmp_path / "r.json").read_text())["pairs_scored"] == 3 and (tmp_path / "r.csv").is_file()


def test_cli_refuses_missing_fields_before_scoring_or_scores_the_rest_when_allowed(tiny, tmp_path, capsys):
    fields = write_fields(tmp_path / "fields", keys=("0002_0001", "0004_0003"))
    code, out, err = run_cli([tiny, fields], capsys)
    assert code == 2 and err.strip().startswith("error: 1 of 3 fields are missing") and err.strip().count("\n") == 0
    assert "disp_0003_0002.nii.gz" in err and "--allow-missing" in err and "0002<-0001" not in out  # nothing scored
    code, out, err = run_cli([tiny, fields, "--allow-missing", "-o", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "MISSING" in out and "1 of 3 fields missing, not scored: disp_0003_0002.nii.gz" in out
    assert json.loads((tmp_path / "r.json").read_text())["pairs_missing"] == 1


def test_cli_uses_and_announces_the_default_config(tiny, tmp_path, capsys):
    (tiny / "evaluation_config.json").unlink()
    code, out, err = run_cli([tiny, write_fields(tmp_path / "fields"), "--ndv-mask", "moving"], capsys)
    assert code == 0, err
    assert "default (no evaluation config)" in out and "NDV mask: moving" in out


def test_cli_bad_dataset_is_one_line_exit_2(tmp_path, capsys):
    code, out, err = run_cli([tmp_path / "nowhere", tmp_path], capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_scoring_never_imports_jax():
    code = ("import sys, jaxreg.evaluation.evaluate, jaxreg.evaluation.report, jaxreg.evaluation.config, "
            "jaxreg.dataset, jaxreg.evaluation.metrics; sys.exit('jax' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------------------------
# the real benchmark
# --------------------------------------------------------------------------------------------

@pytest.mark.benchmark_data
@pytest.mark.slow
@pytest.mark.skipif(not (OASIS / "evaluation_config.json").is_file(),
                    reason=f"OASIS-TRT-20 benchmark data not found at {OASIS} (set JAXREG_OASIS_DIR)")
def test_oasis_zero_fields_reproduce_the_readme_figures(tmp_path, capsys):
    fields = tmp_path / "zero"
    fields.mkdir()
    io.save_field(np.zeros((3, 160, 224, 192), np.float32), fields / "zero.nii.gz")  # one file, linked per pair
    for pair in dataset.load_pairs(OASIS / "dataset.json"):
        (fields / pair.field_name).symlink_to("zero.nii.gz")
    code, out, err = run_cli([OASIS, fields, "-o", tmp_path / "report.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    reference = json.loads((OASIS / "zero_displacement.json").read_text())
    for key, expected in reference["pairs"].items():
        scored = report["pairs"][key.replace("<-", "_")]
        if "dice_whole_lumir_style" in expected:
            assert scored["dice"] == pytest.approx(expected["dice_whole_lumir_style"], abs=1e-12)
            assert scored["hd95"] == pytest.approx(expected["hd95_whole_lumir_style"], abs=1e-12)
        if "tre_mm_lumir_rounded" in expected:
            assert scored["tre_lm"] == pytest.approx(expected["tre_mm_lumir_rounded"], abs=1e-9)
            assert scored["tre_kp"] == pytest.approx(expected["tre_mm_float"], abs=1e-9)
        assert scored["ndv"] == 0.0
    aggregate = reference["aggregate"]
    assert report["summary"]["dice"]["mean"] == pytest.approx(aggregate["dice_whole_lumir_style"]["mean"], abs=1e-12)
    assert round(report["summary"]["dice"]["mean"], 4) == 0.4349
    assert round(report["summary"]["hd95"]["mean"], 2) == 6.02
    assert round(report["summary"]["tre_lm"]["mean"], 2) == 4.39 and round(report["summary"]["tre_kp"]["mean"], 2) == 4.34
