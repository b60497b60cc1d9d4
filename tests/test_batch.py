"""`jaxreg batch`: every field written, resume after a kill, bad pairs counted, submission zip,
CSV pair lists, shards, refinement of given fields, several devices, the same evaluation as
`jaxreg evaluate`."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from jaxreg.apps import batch
from jaxreg.apps.pairs import pair_id, pairs_from_csv, parse_shard, select_shard
from jaxreg.apps.runner import guard_decision
from jaxreg.apps.submission import write_submission
from jaxreg.config import load_config
from jaxreg.dataset import load_pairs
from jaxreg.errors import ConfigError, InputError
from jaxreg.evaluation.config import evaluation_for
from jaxreg.evaluation.evaluate import evaluate_fields
from jaxreg.registration import register

from synthetic import SHAPE, brain, inverse_of, pull, smooth_field
from synthetic_datasets import ENTRY, FAST, labels_of, make_dataset, run_cli, run_log, save as _save

_log = run_log


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def _run(args, capsys):
    return run_cli(["batch", *args], capsys)


def _fields(out_dir):
    return sorted(p.name for p in out_dir.glob("disp_*.nii.gz"))


ALL = ["disp_0002_0001.nii.gz", "disp_0003_0002.nii.gz", "disp_0004_0003.nii.gz", "disp_0005_0004.nii.gz"]


def test_every_field_written_scored_and_logged(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = _run([dataset, "-o", out, *FAST, "--evaluate"], capsys)
    assert code == 0, stderr
    assert _fields(out) == ALL
    for name in ALL:
        img = nib.load(out / name)
        assert img.shape == SHAPE + (3,) and img.get_data_dtype() == np.float32
    lines = _log(out)
    assert [line["status"] for line in lines] == ["ok"] * 4
    assert all(line["compile_seconds"] == 0 for line in lines[1:])  # one program for every pair
    assert all(0.5 < line["metrics"]["dice"] <= 1 for line in lines)
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and all(" ok " in line for line in progress) and "ETA" in progress[0]
    assert "Dice" in stdout and "summary over scored pairs" in stdout
    assert stdout.strip().splitlines()[-1].startswith("batch: 4 ok, 0 skipped, 0 failed of 4 pairs")
    settings = json.loads((out / batch.RUN_CONFIG).read_text())
    assert settings["config"]["refine"]["iterations"] == 30
    report = json.loads((out / "evaluation.json").read_text())
    assert report["pairs_scored"] == 4


def test_the_run_log_and_progress_say_when_the_intensity_terms_were_left_out(dataset, tmp_path, capsys):
    # an impossible threshold: every pair counts as "contrasts differ"
    guarded = [*FAST, "--set", "refine.intensity_weight=1", "--set", "contrast.min_ncc=1"]
    code, _, stderr = _run([dataset, "-o", tmp_path / "out", *guarded], capsys)
    assert code == 0, stderr
    lines = _log(tmp_path / "out")
    assert all(line["intensity_used"] is False and -1 <= line["contrast_ncc"] <= 1 for line in lines)
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and all("cross-contrast: MIND-SSC alone (guard)" in line
                                          for line in progress)


def test_rerun_skips_finished_pairs_and_refuses_another_config(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run([dataset, "-o", out, *FAST], capsys)[0] == 0
    stamps = {name: (out / name).stat().st_mtime_ns for name in ALL}
    code, stdout, stderr = _run([dataset, "-o", out, *FAST], capsys)
    assert code == 0
    assert [line["status"] for line in _log(out)] == ["ok"] * 4 + ["skipped"] * 4
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in ALL}
    assert "4 skipped" in stdout
    code, _, stderr = _run([dataset, "-o", out, "--preset", "convexadam-lumir", "--set", "refine.iterations=31"], capsys)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and "another configuration" in stderr


@pytest.mark.slow
def test_resume_after_killed_run(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data", subjects=9)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", ENTRY, "batch", str(dataset), "-o", str(out), *FAST],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("disp_*.nii.gz")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = _fields(out)
    assert 1 <= len(finished) < 8, finished
    # what a crash can leave: a temporary file of the pair being written, and a damaged field
    (out / ".disp_0009_0008.nii.gz.abcd.tmp.nii.gz").write_bytes(b"partial")
    damaged = out / "disp_0008_0007.nii.gz"
    good = nib.Nifti1Image(np.zeros(SHAPE + (3,), np.float32), np.eye(4))
    nib.save(good, tmp_path / "whole.nii.gz")
    damaged.write_bytes((tmp_path / "whole.nii.gz").read_bytes()[:3000])

    code, stdout, _ = _run([dataset, "-o", out, *FAST], capsys)
    assert code == 0
    assert len(_fields(out)) == 8
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    pairs = load_pairs(dataset)
    assert all(batch.field_is_complete(out / p.field_name, SHAPE) for p in pairs)
    last_run = _log(out)[-8:]
    assert {line["field"] for line in last_run if line["status"] == "skipped"} == set(finished) - {damaged.name}
    assert f"{len(set(finished) - {damaged.name})} skipped" in stdout


def test_bad_pairs_are_reported_and_counted_the_rest_succeed(dataset, tmp_path, capsys):
    images = dataset.parent / "imagesVal"
    corrupt = images / "SYNTH_0001_0000.nii.gz"  # only the moving image of 0002<-0001
    corrupt.write_bytes(gzip.compress(gzip.decompress(corrupt.read_bytes())[:20000]))
    _save(np.zeros((40, 48, 40), np.float32), images / "SYNTH_0005_0000.nii.gz")  # only in 0005<-0004
    out = tmp_path / "out"
    code, stdout, stderr = _run([dataset, "-o", out, *FAST], capsys)
    assert code == 2
    assert _fields(out) == ["disp_0003_0002.nii.gz", "disp_0004_0003.nii.gz"]
    failed = [line for line in stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and sum("SYNTH_0001_0000" in line for line in failed) == 1
    assert sum("(40, 48, 40)" in line for line in failed) == 1
    status = {line["pair"]: line["status"] for line in _log(out)}  # pairs finish in any order on a GPU
    assert sorted(status.values()) == ["failed", "failed", "ok", "ok"] and len(_log(out)) == 4
    assert "2 ok, 0 skipped, 2 failed" in stdout and "exit code 2" in stdout


def test_submission_zip_holds_one_folder_with_every_field(dataset, tmp_path, capsys):
    out, zip_path = tmp_path / "out", tmp_path / "sub" / "my_run.zip"
    code, stdout, _ = _run([dataset, "-o", out, *FAST, "--submission", zip_path], capsys)
    assert code == 0 and str(zip_path) in stdout
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(archive.namelist()) == [f"my_run/{name}" for name in ALL]
        for name in ALL:
            assert archive.read(f"my_run/{name}") == (out / name).read_bytes()
    assert os.listdir(zip_path.parent) == ["my_run.zip"]
    pairs = load_pairs(dataset)
    (out / ALL[0]).unlink()
    with pytest.raises(InputError, match="1 of 4 fields are missing"):
        write_submission(out, pairs, tmp_path / "again.zip")
    assert not (tmp_path / "again.zip").exists()


def test_pairs_csv_relative_absolute_paths_and_ids(dataset, tmp_path, capsys):
    lists = tmp_path / "lists"
    a = _save(brain(seed=3), lists / "imgs" / "subject-a.nii.gz")
    _save(pull(brain(seed=3), smooth_field(amplitude=1.5)), lists / "imgs" / "subject-b.nii")
    lumir = dataset.parent / "imagesVal" / "SYNTH_0003_0000.nii.gz"
    csv_path = lists / "pairs.csv"
    csv_path.write_text(f"fixed,moving\nimgs/subject-b.nii,imgs/subject-a.nii.gz\n{lumir},{dataset.parent / 'imagesVal' / 'SYNTH_0002_0000.nii.gz'}\n")
    out = tmp_path / "out"
    code, _, stderr = _run(["--pairs", csv_path, "-o", out, *FAST], capsys)
    assert code == 0, stderr
    assert _fields(out) == ["disp_0003_0002.nii.gz", "disp_subject-b_subject-a.nii.gz"]
    assert pair_id(a) == "subject-a" and pair_id(lumir) == "0003"
    csv_path.write_text("fixed,moving\nimgs/subject-b.nii,imgs/nope.nii.gz\n")
    with pytest.raises(InputError, match="line 2: moving image .*nope.nii.gz' does not exist"):
        pairs_from_csv(csv_path)
    csv_path.write_text("a,b\nx,y\n")
    with pytest.raises(ConfigError, match="'fixed' and 'moving' columns"):
        pairs_from_csv(csv_path)


def test_shards_cover_the_list_exactly_once(dataset, tmp_path, capsys):
    items = list(range(11))
    for n in range(1, 5):
        shards = [select_shard(items, k, n) for k in range(1, n + 1)]
        assert sorted(i for shard in shards for i in shard) == items
        assert all(shard == sorted(shard) for shard in shards)
    assert select_shard(items, 2, 3) == [1, 4, 7, 10]
    for text in ("0/2", "3/2", "1-2", "", "a/b"):
        with pytest.raises(ConfigError, match="K/N"):
            parse_shard(text)
    out = tmp_path / "out"
    assert _run([dataset, "-o", out, *FAST, "--shard", "2/2"], capsys)[0] == 0
    assert _fields(out) == [ALL[1], ALL[3]]
    assert _run([dataset, "-o", out, *FAST, "--shard", "1/2"], capsys)[0] == 0
    assert _fields(out) == ALL
    code, _, stderr = _run([dataset, "-o", out, *FAST, "--shard", "3/2"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "K/N" in stderr


def test_zero_start_reproduces_refinement_only_and_missing_start_fails_its_pair(dataset, tmp_path, capsys):
    starts = tmp_path / "starts"
    for name in ALL[:3]:  # no starting field for the last pair
        _save(np.zeros(SHAPE + (3,), np.float32), starts / name)
    out = tmp_path / "out"
    refine_only = FAST + ["--set", "coarse.enabled=false"]
    code, _, stderr = _run([dataset, "-o", out, *refine_only, "--init-fields", starts, "--no-guard"], capsys)
    assert code == 1
    assert "FAILED" in stderr and "disp_0005_0004.nii.gz" in stderr and "does not exist" in stderr
    pair = load_pairs(dataset)[0]
    expected = register(pair.fixed, pair.moving, preset="convexadam-lumir",
                        overrides=("refine.iterations=30", "coarse.enabled=false")).disp_lumir
    written = np.asarray(nib.load(out / pair.field_name).dataobj)
    np.testing.assert_allclose(written, expected, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # the refinement did move


def test_refining_a_good_field_does_not_make_it_worse(tmp_path, capsys):
    root = tmp_path / "data"
    fixed = brain(seed=4)
    deformation = smooth_field(amplitude=3.0, seed=7)
    moving = pull(fixed, deformation)
    for sid, image in (("0002", fixed), ("0001", moving)):
        _save(image, root / "imagesVal" / f"SYNTH_{sid}_0000.nii.gz")
        _save(labels_of(image), root / "labelsVal" / f"SYNTH_{sid}_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"validation": [
        {"fixed": "./imagesVal/SYNTH_0002_0000.nii.gz", "moving": "./imagesVal/SYNTH_0001_0000.nii.gz"}]}))
    good = inverse_of(deformation)  # moving(x + good(x)) = fixed(x)
    starts = tmp_path / "starts"
    starts.mkdir()
    nib.save(nib.Nifti1Image(np.moveaxis(good, 0, -1).astype(np.float32), np.eye(4)), starts / "disp_0002_0001.nii.gz")
    start_dice = evaluate_fields(starts, evaluation_for(load_pairs(root), root)).pairs[0].values["dice"]
    out = tmp_path / "out"
    code, _, _ = _run([root, "-o", out, *FAST, "--set", "coarse.enabled=false", "--init-fields", starts, "--evaluate"],
                      capsys)
    assert code == 0
    (line,) = _log(out)
    written = np.asarray(nib.load(out / "disp_0002_0001.nii.gz").dataobj)
    if line["kept_start"]:
        assert line["ncc"] < line["start_ncc"]
        np.testing.assert_array_equal(written, np.moveaxis(good, 0, -1))
    else:
        assert line["ncc"] >= line["start_ncc"]
    assert line["metrics"]["dice"] >= start_dice - 0.005


def _normalised(image):
    return (image - image.min()) / max(image.max() - image.min(), 1e-6)


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_the_guard_compares_the_programs_ncc_through_the_start_and_through_the_result():
    fixed = brain(seed=4)
    deformation = smooth_field(amplitude=3.0, seed=7)
    moving = pull(fixed, deformation)
    good = inverse_of(deformation)
    worse = good + smooth_field(amplitude=3.0, seed=8)
    refine_only = ("refine.iterations=30", "coarse.enabled=false")
    for start in (good, worse):
        summary = register(fixed, moving, preset="convexadam-lumir", overrides=refine_only, init_disp=start).summary
        # scipy reference: normalised images, the moving one pulled through the start with border padding
        # (float32 sums in another order: a few 1e-5 apart; the NCC without the start is far off)
        through_start = _ncc(_normalised(fixed), pull(_normalised(moving), start))
        assert summary.ncc_before == pytest.approx(through_start, abs=2e-4)
        assert abs(through_start - _ncc(_normalised(fixed), _normalised(moving))) > 2e-3
    base = register(fixed, moving, preset="convexadam-lumir", overrides=refine_only, init_disp=good).summary
    worse_result = replace(base, ncc_before=0.9, ncc_after=0.8)
    assert guard_decision(worse_result) == {"start_ncc": 0.9, "ncc": 0.8, "kept_start": True}
    assert guard_decision(replace(base, ncc_before=0.8, ncc_after=0.8))["kept_start"] is False  # a tie refines
    assert guard_decision(replace(base, ncc_before=0.8, ncc_after=float("nan")))["kept_start"] is True


def test_field_is_complete_rejects_damaged_or_wrong_fields(tmp_path):
    good = _save(np.zeros(SHAPE + (3,), np.float32), tmp_path / "good.nii.gz")
    assert batch.field_is_complete(good, SHAPE)
    assert not batch.field_is_complete(good, (40, 48, 40))
    assert not batch.field_is_complete(_save(np.zeros(SHAPE + (3,)), tmp_path / "f64.nii.gz"), SHAPE)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-100])
    assert not batch.field_is_complete(truncated, SHAPE)
    nan = np.zeros(SHAPE + (3,), np.float32)
    nan[1, 2, 3, 0] = np.nan
    assert not batch.field_is_complete(_save(nan, tmp_path / "nan.nii.gz"), SHAPE)
    assert not batch.field_is_complete(tmp_path / "absent.nii.gz", SHAPE)


def test_run_level_errors_come_before_any_work(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    data = json.loads(dataset.read_text())
    data["validation"][2]["moving"] = "./imagesVal/SYNTH_0042_0000.nii.gz"
    broken = dataset.parent / "broken.json"
    broken.write_text(json.dumps(data))
    cases = [
        ([broken, "-o", out, *FAST], "SYNTH_0042_0000.nii.gz' does not exist"),
        ([dataset, "-o", out, *FAST, "--init-fields", tmp_path / "nope"], "starting-field folder"),
        ([dataset, "-o", out, "--preset", "nope"], "unknown preset"),
    ]
    for args, message in cases:
        code, _, stderr = _run(args, capsys)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
        assert not out.exists()
    out.mkdir()
    code, _, stderr = _run([dataset, "-o", out, *FAST, "--init-fields", out], capsys)
    assert code == 2 and "starting-field folder" in stderr


def test_several_devices_share_the_pairs(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # two CPU devices, also on a machine with a GPU
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    done = subprocess.run([sys.executable, "-c", ENTRY, "batch", str(dataset), "-o", str(out), *FAST],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = _log(out)
    assert {line["device"] for line in lines} == {"cpu:0", "cpu:1"}
    assert sum(line["compile_seconds"] > 0 for line in lines) == 2  # once per device
    single = tmp_path / "single"
    assert _run([dataset, "-o", single, *FAST], capsys)[0] == 0
    for name in ALL:
        np.testing.assert_allclose(np.asarray(nib.load(out / name).dataobj),
                                   np.asarray(nib.load(single / name).dataobj), atol=1e-4)


def test_threads_on_one_device_overlap_pairs_and_write_the_same_fields(dataset, tmp_path, capsys):
    out, single = tmp_path / "threads", tmp_path / "single"
    code, _, stderr = _run([dataset, "-o", out, *FAST, "--threads-per-device", "3"], capsys)
    assert code == 0, stderr
    assert sorted(line["pair"] for line in _log(out)) == sorted({line["pair"] for line in _log(out)})  # once each
    assert _run([dataset, "-o", single, *FAST], capsys)[0] == 0
    for name in ALL:
        np.testing.assert_allclose(np.asarray(nib.load(out / name).dataobj),
                                   np.asarray(nib.load(single / name).dataobj), atol=1e-4)
    code, _, stderr = _run([dataset, "-o", tmp_path / "bad", *FAST, "--threads-per-device", "0"], capsys)
    assert code == 2 and "threads_per_device must be >= 1" in stderr and not (tmp_path / "bad").exists()


def test_a_blank_image_fails_its_pairs_with_the_reason_and_the_others_run(dataset, tmp_path, capsys):
    _save(np.zeros(SHAPE, np.float32), dataset.parent / "imagesVal" / "SYNTH_0003_0000.nii.gz")  # in 2 pairs
    out = tmp_path / "out"
    code, stdout, stderr = _run([dataset, "-o", out, *FAST], capsys)
    assert code == 2, stderr
    assert _fields(out) == ["disp_0002_0001.nii.gz", "disp_0005_0004.nii.gz"]
    failed = {line["pair"]: line["error"] for line in _log(out) if line["status"] == "failed"}
    assert failed["0003_0002"].startswith("fixed image is blank") and failed["0004_0003"].startswith("moving image is blank")
    assert len(failed) == 2 and sum("FAILED" in line for line in stderr.splitlines()) == 2


def test_output_paths_are_checked_before_any_work(dataset, tmp_path):
    pairs = load_pairs(dataset)
    config = load_config("convexadam-lumir")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="'.*a-file' is a file"):
        batch.run_batch(pairs, blocker / "out", config=config)
    out = tmp_path / "out"
    (out / batch.RUN_LOG).mkdir(parents=True)  # the run log cannot be written
    with pytest.raises(InputError, match="run_log.jsonl.* is a folder"):
        batch.run_batch(pairs, out, config=config)
    (out / batch.RUN_LOG).rmdir()
    (out / batch.EVALUATION_JSON).mkdir()  # only matters when the run evaluates
    with pytest.raises(InputError, match="evaluation.json.* is a folder"):
        batch.run_batch(pairs, out, config=config, evaluation=evaluation_for(pairs, dataset.parent))
    assert sorted(p.name for p in out.iterdir()) == [batch.EVALUATION_JSON]  # nothing written


def test_batch_evaluate_and_evaluate_give_the_same_report_with_keypoints_and_no_config(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data", subjects=3, landmarks=True)
    assert not (dataset.parent / "evaluation_config.json").exists()
    out = tmp_path / "out"
    code, batch_stdout, stderr = _run([dataset, "-o", out, *FAST, "--evaluate"], capsys)
    assert code == 0, stderr
    code, evaluate_stdout, stderr = run_cli(["evaluate", dataset.parent, out, "-o", tmp_path / "report.json"], capsys)
    assert code == 0, stderr
    from_batch = json.loads((out / batch.EVALUATION_JSON).read_text())
    from_evaluate = json.loads((tmp_path / "report.json").read_text())
    assert from_batch["summary"] == from_evaluate["summary"]
    assert set(from_batch["summary"]) == {"dice", "hd95", "tre_lm", "tre_kp", "ndv", "sdlogj"}
    assert from_batch["pairs"].keys() == from_evaluate["pairs"].keys() == {"0002_0001", "0003_0002"}
    for key, scored in from_batch["pairs"].items():
        other = from_evaluate["pairs"][key]
        assert {k: v for k, v in scored.items() if k != "seconds"} == {k: v for k, v in other.items() if k != "seconds"}
    for stdout in (batch_stdout, evaluate_stdout):
        assert "TRE_kp" in stdout


def test_the_plan_counts_pairs_that_failed_its_checks(dataset, tmp_path):
    _save(np.zeros((40, 48, 40), np.float32), dataset.parent / "imagesVal" / "SYNTH_0005_0000.nii.gz")
    events = []
    config = load_config("convexadam-lumir", ("refine.iterations=30",))
    report = batch.run_batch(load_pairs(dataset), tmp_path / "out", config=config, progress=events.append)
    plan = events[0]
    assert plan.outcome is None and (plan.total, plan.to_register, plan.finished_earlier, plan.failed_checks) == (4, 3, 0, 1)
    assert [e.done for e in events[1:]] == [1, 2, 3, 4] and events[-1].eta_seconds == 0.0
    assert report.exit_code == 1 and report.failed[0].pair.key == "0005_0004"


def test_the_submission_zip_is_the_same_bytes_for_the_same_fields(dataset, tmp_path):
    pairs = load_pairs(dataset)
    fields = tmp_path / "fields"
    for pair in pairs:
        _save(np.full(SHAPE + (3,), 0.5, np.float32), fields / pair.field_name)
    first = write_submission(fields, pairs, tmp_path / "a" / "run.zip").read_bytes()
    for pair in pairs:
        os.utime(fields / pair.field_name, (1e9, 1e9))  # other file times must not show in the zip
    assert write_submission(fields, pairs, tmp_path / "b" / "run.zip").read_bytes() == first
    with zipfile.ZipFile(tmp_path / "a" / "run.zip") as archive:
        assert [info.date_time for info in archive.infolist()] == [(1980, 1, 1, 0, 0, 0)] * len(pairs)
        assert archive.read(f"run/{pairs[0].field_name}") == (fields / pairs[0].field_name).read_bytes()
