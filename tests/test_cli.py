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
                            "--warp-labels", pair["labels"], "--summary", tmp_path / "s.json", *FAST], capsys)
    assert code == 0
    assert "NDV" in stdout and "NCC" in stdout
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


def test_presets_command_lists_all_presets(capsys):
    code, stdout, _ = _run(["presets"], capsys)
    assert code == 0
    assert [line.split(":")[0] for line in stdout.splitlines()] == ["convexadam-lumir", "fast", "lumir", "lumir-multimodal"]
