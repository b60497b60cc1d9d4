"""Every command refuses a bad input or an unusable output path the same way, before any work:
exit code 2, one ``error:`` line on stderr, within a few seconds, and nothing written anywhere."""

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxreg.cli.main import main

from synthetic import brain, pull, smooth_field
from synthetic_datasets import FAST, make_dataset

# a folder no process can create files in, even as root (a read-only pseudo file system)
UNWRITABLE = Path("/proc/jaxreg-test-output")
SECONDS = 8.0  # generous on a busy 2-core CI machine; a registration takes longer than this to compile


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by every case: a pair, a label map, blank images, a field, a dataset."""
    root = tmp_path_factory.mktemp("inputs")
    fixed = brain()
    moving = pull(fixed, smooth_field(amplitude=2.0))
    paths = {}
    for name, data in [("fixed", fixed), ("moving", moving), ("zeros", np.zeros_like(fixed)),
                       ("constant", np.full_like(fixed, 7.0)), ("speck", _speck(fixed.shape))]:
        paths[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[name])
    paths["labels"] = root / "seg.nii.gz"
    nib.save(nib.Nifti1Image((moving > 100).astype(np.uint8), np.eye(4)), paths["labels"])
    paths["disp"] = root / "disp.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(smooth_field(amplitude=1.0), 0, -1), np.eye(4)), paths["disp"])
    paths["dataset"] = make_dataset(root / "data", subjects=3)
    paths["a_file"] = root / "notes.txt"
    paths["a_file"].write_text("a file, not a folder")
    return paths


def _speck(shape):
    """A blank image but for a few bright voxels: no brain either."""
    image = np.zeros(shape, np.float32)
    image[10:12, 10:12, 10:12] = 200
    return image


def _out(tmp):
    return tmp / "out"


# Each case: (command, problem) -> a function of (inputs, tmp folder) that prepares what it needs in
# the tmp folder and returns the arguments. The tmp folder is then snapshot: nothing may appear.
def _register(f, t, *extra, fixed=None, moving=None):
    return ["register", fixed or f["fixed"], moving or f["moving"], *extra, *FAST]


def _existing_folder(t, name="disp.nii.gz"):
    (t / name).mkdir(parents=True)
    return t / name


def _warped_labels_is_a_folder(f, t):
    _existing_folder(t, "warped_seg.nii.gz")  # where the warped copy of seg.nii.gz would go
    return _register(f, t, "-o", t / "d.nii.gz", "--warp-labels", f["labels"])


def _prepared_labels_is_a_folder(f, t):
    _existing_folder(t, "p_labels.nii.gz")  # where the prepared label map would go
    return ["prepare", f["fixed"], "-o", t / "p.nii.gz", "--labels", f["labels"]]


CASES = {
    # register: every output option, and images without a brain
    ("register", "output is a folder"): lambda f, t: _register(f, t, "-o", _existing_folder(t)),
    ("register", "output under a file"): lambda f, t: _register(f, t, "-o", f["a_file"] / "disp.nii.gz"),
    ("register", "output not writable"): lambda f, t: _register(f, t, "-o", UNWRITABLE / "disp.nii.gz"),
    ("register", "output not NIfTI"): lambda f, t: _register(f, t, "-o", t / "disp.txt"),
    ("register", "output is an input"): lambda f, t: _register(f, t, "-o", f["moving"]),
    ("register", "--moved is a folder"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--moved", _existing_folder(t, "m.nii.gz")),
    ("register", "--moved not writable"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--moved", UNWRITABLE / "m.nii.gz"),
    ("register", "--moved is the output"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--moved", t / "d.nii.gz"),
    ("register", "warped labels is a folder"): _warped_labels_is_a_folder,
    ("register", "--summary under a file"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--summary", f["a_file"] / "s.json"),
    ("register", "--qc is a file"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--qc", f["a_file"]),
    ("register", "--qc not writable"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", "--qc", UNWRITABLE),
    ("register", "blank moving image"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", moving=f["zeros"]),
    ("register", "constant fixed image"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", fixed=f["constant"]),
    ("register", "almost blank moving image"): lambda f, t: _register(f, t, "-o", t / "d.nii.gz", moving=f["speck"]),
    ("register", "missing option value"): lambda f, t: ["register", f["fixed"], f["moving"], "-o"],
    ("register", "unknown option"): lambda f, t: _register(f, t, "--nope"),
    # demo
    ("demo", "output folder is a file"): lambda f, t: ["demo", "-o", f["a_file"]],
    ("demo", "output folder not writable"): lambda f, t: ["demo", "-o", UNWRITABLE],
    # batch
    ("batch", "output folder is a file"): lambda f, t: ["batch", f["dataset"], "-o", f["a_file"], *FAST],
    ("batch", "output folder under a file"): lambda f, t: ["batch", f["dataset"], "-o", f["a_file"] / "out", *FAST],
    ("batch", "output folder not writable"): lambda f, t: ["batch", f["dataset"], "-o", UNWRITABLE, *FAST],
    ("batch", "--qc is a file"): lambda f, t: ["batch", f["dataset"], "-o", _out(t), "--qc", f["a_file"], *FAST],
    ("batch", "--qc not writable"): lambda f, t: ["batch", f["dataset"], "-o", _out(t), "--qc", UNWRITABLE, *FAST],
    ("batch", "--submission not a zip"): lambda f, t: ["batch", f["dataset"], "-o", _out(t), "--submission", t / "s.tar", *FAST],
    ("batch", "--submission is a folder"): lambda f, t: ["batch", f["dataset"], "-o", _out(t), "--submission",
                                                          _existing_folder(t, "s.zip"), *FAST],
    ("batch", "--submission not writable"): lambda f, t: ["batch", f["dataset"], "-o", _out(t), "--submission",
                                                           UNWRITABLE / "s.zip", *FAST],
    ("batch", "no pairs given"): lambda f, t: ["batch", "-o", _out(t), *FAST],
    # evaluate
    ("evaluate", "--output is a folder"): lambda f, t: ["evaluate", f["dataset"].parent, t, "-o", _existing_folder(t, "r.json")],
    ("evaluate", "--output under a file"): lambda f, t: ["evaluate", f["dataset"].parent, t, "-o", f["a_file"] / "r.json"],
    ("evaluate", "--csv not writable"): lambda f, t: ["evaluate", f["dataset"].parent, t, "--csv", UNWRITABLE / "r.csv"],
    # qc
    ("qc", "output is a folder"): lambda f, t: ["qc", f["fixed"], f["moving"], f["disp"], "-o", _existing_folder(t, "q.png")],
    ("qc", "output not a PNG"): lambda f, t: ["qc", f["fixed"], f["moving"], f["disp"], "-o", t / "q.jpg"],
    ("qc", "output under a file"): lambda f, t: ["qc", f["fixed"], f["moving"], f["disp"], "-o", f["a_file"] / "q.png"],
    ("qc", "blank fixed image"): lambda f, t: ["qc", f["zeros"], f["moving"], f["disp"], "-o", t / "q.png"],
    # prepare
    ("prepare", "output is a folder"): lambda f, t: ["prepare", f["fixed"], "-o", _existing_folder(t, "p.nii.gz")],
    ("prepare", "output under a file"): lambda f, t: ["prepare", f["fixed"], "-o", f["a_file"] / "p.nii.gz"],
    ("prepare", "output not writable"): lambda f, t: ["prepare", f["fixed"], "-o", UNWRITABLE / "p.nii.gz"],
    ("prepare", "label output is a folder"): _prepared_labels_is_a_folder,
    ("prepare", "blank image"): lambda f, t: ["prepare", f["zeros"], "-o", t / "p.nii.gz"],
    ("prepare", "folder into a file"): lambda f, t: ["prepare", f["dataset"].parent / "imagesVal", "-o", f["a_file"]],
    # tune
    ("tune", "output not TOML"): lambda f, t: ["tune", f["dataset"], "-o", t / "p.json", "--grid", "refine.iterations=10,20"],
    ("tune", "output under a file"): lambda f, t: ["tune", f["dataset"], "-o", f["a_file"] / "p.toml", "--grid",
                                                    "refine.iterations=10,20"],
    ("tune", "output not writable"): lambda f, t: ["tune", f["dataset"], "-o", UNWRITABLE / "p.toml", "--grid",
                                                    "refine.iterations=10,20"],
    # benchmark
    ("benchmark", "blank moving image"): lambda f, t: ["benchmark", f["fixed"], f["zeros"], "--no-stages", "--repeats", "1"],
    ("benchmark", "bad --throughput"): lambda f, t: ["benchmark", "--throughput", "1,x"],
}


def _snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*")}


@pytest.mark.parametrize("command, problem", sorted(CASES), ids=[f"{c}: {p}" for c, p in sorted(CASES)])
def test_refused_at_once_with_one_line_and_nothing_written(command, problem, files, tmp_path, capsys):
    if "not writable" in problem and not UNWRITABLE.parent.is_dir():
        pytest.skip("needs Linux's /proc as a place no process can write in")
    args = [str(a) for a in CASES[command, problem](files, tmp_path)]
    inputs_before, tmp_before = _snapshot(files["dataset"].parents[1]), _snapshot(tmp_path)
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    stdout, stderr = capsys.readouterr()
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert seconds < SECONDS, f"refused only after {seconds:.1f} s"
    assert _snapshot(tmp_path) == tmp_before and _snapshot(files["dataset"].parents[1]) == inputs_before


def test_an_unwritable_folder_is_refused_for_a_normal_user(files, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; /proc stands in for them above")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["register", str(files["fixed"]), str(files["moving"]), "-o", str(locked / "d.nii.gz"), *FAST])
        assert code == 2 and "cannot be written" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_the_messages_say_what_is_wrong(files, tmp_path, capsys):
    def error(args):
        main([str(a) for a in args])
        return capsys.readouterr().err

    assert "is a folder: give a file name" in error(_register(files, tmp_path, "-o", tmp_path))
    assert f"'{files['a_file']}' is a file, not a folder" in error(_register(files, tmp_path, "-o", files["a_file"] / "d.nii.gz"))
    assert "is blank: every voxel is 0" in error(_register(files, tmp_path, "-o", tmp_path / "d.nii.gz", moving=files["zeros"]))
    assert "moving image" in error(_register(files, tmp_path, "-o", tmp_path / "d.nii.gz", moving=files["zeros"]))
    assert "almost blank: only 8 voxel(s)" in error(_register(files, tmp_path, "-o", tmp_path / "d.nii.gz", moving=files["speck"]))
    assert "is one of the inputs" in error(_register(files, tmp_path, "-o", files["moving"]))
    assert "Missing option '-o'" in error(["batch", files["dataset"]])
