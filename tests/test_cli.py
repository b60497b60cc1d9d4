"""The command line: outputs, one-line errors, exit codes, nothing half-written."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from jaxreg.cli.main import main

from synthetic import brain, pull, smooth_field

FAST = ["--preset", "convexadam-lumir", "--set", "refine.iterations=30"]  # same program as test_pipeline


@pytest.fixture()
def pair(tmp_path):
    fixed = brain()
    moving = pull(fixed, smooth_field(amplitude=2.0))
    paths = {}
    for name, data in [("fixed", fixed), ("moving", moving)]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[name])
    labels = (moving > 100).astype(np.uint8) + (moving > 180)
    paths["labels"] = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), paths["labels"])
    return paths


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_register_writes_field_moved_and_labels(pair, tmp_path, capsys):
    out = tmp_path / "out" / "disp.nii.gz"
    code, stdout, _ = _run(["register", pair["fixed"], pair["moving"], "-o", out, "--moved", tmp_path / "moved.nii.gz",
                            "--warp-labels", pair["labels"], "--summary", tmp_path / "s.json", "--qc", tmp_path / "qc",
                            *FAST], capsys)
    assert code == 0
    assert "NDV" in stdout and "NCC" in stdout
    assert (tmp_path / "qc" / "disp.png").exists() and f"wrote qc       {tmp_path / 'qc' / 'disp.png'}" in stdout
    field = nib.load(out)
    assert field.shape == (40, 48, 44, 3) and field.get_data_dtype() == np.float32
    warped = np.asarray(nib.load(out.parent / "warped_seg.nii.gz").dataobj)
    assert set(np.unique(warped)) <= {0, 1, 2}
    assert (tmp_path / "moved.nii.gz").exists() and (tmp_path / "s.json").exists()


def test_register_reports_the_fold_repair_when_the_preset_runs_it(pair, tmp_path, capsys):
    code, stdout, _ = _run(["register", pair["fixed"], pair["moving"], "-o", tmp_path / "disp.nii.gz",
                            *FAST, "--set", "unfold.rounds=5"], capsys)
    assert code == 0
    assert "folding voxel(s) left" in stdout
    assert "fold repair" not in _run(["register", pair["fixed"], pair["moving"], "-o", tmp_path / "d2.nii.gz", *FAST],
                                     capsys)[1]


@pytest.mark.parametrize("problem", ["missing", "not_nifti", "corrupt", "four_d", "mismatch", "nan"])
def test_bad_input_one_line_error_nonzero_exit_no_output(problem, pair, tmp_path, capsys):
    moving = pair["moving"]
    if problem == "missing":
        moving = tmp_path / "nope.nii.gz"
    elif problem == "not_nifti":
        moving = tmp_path / "notes.txt"
        moving.write_text("hello")
    elif problem == "corrupt":
        moving = tmp_path / "corrupt.nii.gz"
        moving.write_bytes(gzip.compress(pair["moving"].read_bytes())[:5000])
    elif problem == "four_d":
        moving = tmp_path / "4d.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((40, 48, 44, 2), np.float32), np.eye(4)), moving)
    elif problem == "mismatch":
        moving = tmp_path / "small.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((40, 48, 40), np.float32), np.eye(4)), moving)
    elif problem == "nan":
        moving = tmp_path / "nan.nii.gz"
        data = brain()
        data[5, 5, 5] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), moving)
    out = tmp_path / "out" / "disp.nii.gz"
    code, stdout, stderr = _run(["register", pair["fixed"], moving, "-o", out, *FAST], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("args,expected", [
    (["--preset", "nope"], "unknown preset 'nope': must be one of convexadam-lumir, fast, lumir"),
    (["--set", "refine.nope=1"], "unknown key 'refine.nope': must be one of"),
    (["--set", "nope.iterations=1"], "unknown config section 'nope'"),
    (["--set", "refine.iterations=many"], "refine.iterations must be int"),
])
def test_config_errors_list_valid_choices(args, expected, pair, tmp_path, capsys):
    code, _, stderr = _run(["register", pair["fixed"], pair["moving"], "-o", tmp_path / "d.nii.gz", *args], capsys)
    assert code == 2 and expected in stderr, stderr


def test_presets_command_lists_all_presets_and_prints_one_as_toml(capsys):
    import tomllib

    from jaxreg.config import config_from_dict, load_config, preset_names

    code, stdout, _ = _run(["presets"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in stdout.splitlines()[1:] if line[:1].isalnum()]
    assert set(preset_names()) <= set(listed)
    assert all(len(line) <= 160 for line in stdout.splitlines())  # a table, not a 900-character JSON line each
    code, stdout, _ = _run(["presets", "fast"], capsys)
    assert code == 0 and stdout.startswith("# ")  # the preset's own description comes first
    assert config_from_dict(tomllib.loads(stdout)) == load_config("fast")  # every setting, readable back


def test_warped_labels_keep_the_input_dtype_and_are_named_once(pair, tmp_path, capsys):
    labels = np.asarray(nib.load(pair["labels"]).dataobj).astype(np.uint16) * 300
    source = tmp_path / "seg16.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), source)
    out = tmp_path / "out" / "disp.nii.gz"
    code, stdout, _ = _run(["register", pair["fixed"], pair["moving"], "-o", out, "--warp-labels", source, *FAST], capsys)
    assert code == 0
    warped = nib.load(out.parent / "warped_seg16.nii.gz")
    assert warped.get_data_dtype() == np.uint16
    assert set(np.unique(np.asarray(warped.dataobj))) <= {0, 300, 600}
    assert stdout.count(str(out.parent / "warped_seg16.nii.gz")) == 1
    assert f"wrote labels   {out.parent / 'warped_seg16.nii.gz'}" in stdout


def test_two_identical_runs_write_identical_bytes(pair, tmp_path, capsys):
    """No time or temporary name in the gzip headers: users can checksum results."""
    import hashlib

    digests = []
    for run in ("first", "second"):
        out = tmp_path / run / "disp.nii.gz"
        code, _, stderr = _run(["register", pair["fixed"], pair["moving"], "-o", out, "--moved", out.parent / "moved.nii.gz",
                                "--warp-labels", pair["labels"], *FAST], capsys)
        assert code == 0, stderr
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.parent.iterdir())})
    assert sorted(digests[0]) == ["disp.nii.gz", "moved.nii.gz", "warped_seg.nii.gz"]
    assert digests[0] == digests[1]
    with gzip.open(tmp_path / "first" / "disp.nii.gz") as stream:  # still an ordinary gzip that nibabel reads
        assert len(stream.read()) > 0


def test_version_and_short_help(capsys):
    from jaxreg import __version__

    code, stdout, _ = _run(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"jaxreg {__version__}"
    code, stdout, _ = _run(["register", "-h"], capsys)
    assert code == 0 and "--verbose" in stdout and "--quiet" in stdout and "--preset" in stdout
    code, stdout, _ = _run(["batch", "-h"], capsys)
    assert "pip install 'jaxreg[ray]'" in " ".join(stdout.split())


def test_quiet_leaves_results_only_and_verbose_shows_library_logs(pair, tmp_path, capsys):
    args = ["register", pair["fixed"], pair["moving"], "-o", tmp_path / "d.nii.gz", *FAST]
    code, stdout, stderr = _run([*args, "-q"], capsys)
    assert code == 0 and stderr == "" and "NCC" in stdout
    code, stdout, stderr = _run([*args, "-v"], capsys)
    assert code == 0 and "registered in" in stderr  # jaxreg.registration's INFO log
    code, _, stderr = _run(args, capsys)
    assert "registered in" not in stderr and "✓ registering" in stderr  # default: the steps, no INFO logs


def test_evaluate_prints_rows_and_allow_missing_scores_what_is_there(tmp_path, capsys):
    from synthetic_datasets import make_dataset

    dataset = make_dataset(tmp_path / "data", subjects=3)  # pairs 0002<-0001 and 0003<-0002
    fields = tmp_path / "fields"
    fields.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 44, 3), np.float32), np.eye(4)), fields / "disp_0002_0001.nii.gz")
    code, stdout, stderr = _run(["evaluate", dataset.parent, fields], capsys)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "disp_0003_0002.nii.gz" in stderr
    code, stdout, stderr = _run(["evaluate", dataset.parent, fields, "--allow-missing", "--csv", tmp_path / "r.csv"], capsys)
    assert code == 0, stderr
    rows = [line for line in stdout.splitlines() if line.startswith(("0002<-0001", "0003<-0002"))]
    assert rows[0].startswith("0002<-0001") and "MISSING" in rows[1]
    assert "1 of 2 fields missing" in stdout and "1 of 2 pairs scored" in stdout
    assert (tmp_path / "r.csv").exists()


def test_register_inverse_writes_a_field_that_undoes_the_registration(pair, tmp_path, capsys):
    out, inverse = tmp_path / "disp.nii.gz", tmp_path / "inverse.nii.gz"
    code, stdout, _ = _run(["register", pair["fixed"], pair["moving"], "-o", out, "--inverse", inverse, *FAST], capsys)
    assert code == 0 and "|phi(psi(y)) - y|" in stdout
    forward = np.moveaxis(np.asarray(nib.load(out).dataobj), -1, 0)
    backward = np.moveaxis(np.asarray(nib.load(inverse).dataobj), -1, 0)
    # psi(y) = y + v(y) lands at x with phi(x) = x + u(x) back at y: v(y) + u(y + v(y)) = 0 inside the grid
    from scipy import ndimage

    grid = np.indices(backward.shape[1:]).astype(np.float64)
    landed = grid + backward
    composed = backward + np.stack([ndimage.map_coordinates(c, landed, order=1, mode="nearest") for c in forward])
    inside = np.all([(landed[a] > 2) & (landed[a] < backward.shape[1 + a] - 3) for a in range(3)], axis=0)
    assert np.abs(composed[:, inside]).mean() < 0.05
