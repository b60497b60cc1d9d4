"""`jaxreg batch --inverse`: each field's inverse written beside it and checked against scipy's
composition, kept out of the submission zip, written on resume from the saved field without
registering again, and carried to Ray workers unchanged."""

import pickle
import zipfile

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.apps import batch, runner
from jaxreg.apps.invert import write_inverse
from jaxreg.apps.runner import PairJob, PairTask, inverse_name
from jaxreg.config import load_config
from jaxreg.dataset import load_pairs
from jaxreg.errors import ConfigError

from synthetic_datasets import FAST, make_dataset, run_cli, run_log

FIELDS = ["disp_0002_0001.nii.gz", "disp_0003_0002.nii.gz"]
INVERSES = ["inverse_0002_0001.nii.gz", "inverse_0003_0002.nii.gz"]


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "data", subjects=3)


def _batch(args, capsys):
    return run_cli(["batch", *args], capsys)


def _field(path):
    return np.moveaxis(np.asarray(nib.load(path).dataobj), -1, 0)


def _composition_error(u, v, mask):
    """|phi(psi(y)) - y| = |v(y) + u(y + v(y))| over `mask`, with scipy's trilinear sampling
    (clamped at the border) as the independent reference."""
    points = np.indices(v.shape[1:], dtype=np.float64) + v
    residual = v + np.stack([ndimage.map_coordinates(c.astype(np.float64), points, order=1, mode="nearest") for c in u])
    return np.linalg.norm(residual, axis=0)[mask]


def test_inverse_fields_compose_to_identity_are_logged_and_stay_out_of_the_zip(dataset, tmp_path, capsys):
    out, zip_path = tmp_path / "out", tmp_path / "run.zip"
    code, stdout, stderr = _batch([dataset, "-o", out, *FAST, "--inverse", "--evaluate", "--submission", zip_path],
                                  capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == FIELDS + INVERSES
    lines = {line["pair"]: line for line in run_log(out)}
    for pair in load_pairs(dataset):
        u, v = _field(out / pair.field_name), _field(out / inverse_name(pair))
        moving = nib.load(pair.moving)
        assert np.abs(v).max() > 0.5  # the registration moved: the inverse is not trivially zero
        np.testing.assert_array_equal(nib.load(out / inverse_name(pair)).affine, moving.affine)
        errors = _composition_error(u, v, np.asarray(moving.dataobj) > 0)
        assert errors.mean() < 1e-3 and np.percentile(errors, 99) < 1e-2
        line = lines[pair.key]
        assert line["inverse_field"] == inverse_name(pair)
        assert line["inverse_moving_mean"] == pytest.approx(errors.mean(), abs=1e-4)
        assert line["inverse_moving_p99"] == pytest.approx(np.percentile(errors, 99), abs=1e-3)
        assert 0 < line["inverse_fixed_p99"] < 0.5  # the round trip through both interpolations
        # the inverse written from memory is the one a resumed run writes from the saved field
        again = write_inverse(out / pair.field_name, tmp_path / "again.nii.gz", fixed=pair.fixed, moving=pair.moving)
        assert again.path.read_bytes() == (out / inverse_name(pair)).read_bytes()
    assert all(0 < line["metrics"]["dice"] <= 1 for line in lines.values())  # scoring reads the fields only
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(archive.namelist()) == [f"run/{name}" for name in FIELDS]
    assert sum("inverse p99" in line for line in stderr.splitlines()) == 2
    assert "inverses: 2 written; |phi(psi(y)) - y| on the moving brain" in stdout


def test_a_resumed_run_inverts_finished_fields_without_registering_them(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert _batch([dataset, "-o", out, *FAST], capsys)[0] == 0
    assert not list(out.glob("inverse_*"))
    fields = {name: (out / name).read_bytes() for name in FIELDS}
    stamps = {name: (out / name).stat().st_mtime_ns for name in FIELDS}

    code, stdout, stderr = _batch([dataset, "-o", out, *FAST, "--inverse"], capsys)
    assert code == 0, stderr
    assert "0 to register, 2 finished earlier (2 still to invert)" in stderr
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in FIELDS}  # not registered again
    last = run_log(out)[-2:]
    assert [line["status"] for line in last] == ["skipped", "skipped"]
    assert all(line["seconds"] == 0 and line["inverse_field"].startswith("inverse_") for line in last)
    assert "0 ok, 2 skipped" in stdout and "inverses: 2 written" in stdout
    written = {name: (out / name).read_bytes() for name in INVERSES}

    # a missing inverse, a damaged one and a temporary file left by a kill: both rewritten, the temporary removed
    (out / INVERSES[0]).unlink()
    (out / INVERSES[1]).write_bytes(written[INVERSES[1]][:2000])
    (out / f".{INVERSES[0]}.abcd.tmp.nii.gz").write_bytes(b"partial")
    code, _, stderr = _batch([dataset, "-o", out, *FAST, "--inverse"], capsys)
    assert code == 0, stderr
    assert {name: (out / name).read_bytes() for name in INVERSES} == written
    assert {name: (out / name).read_bytes() for name in FIELDS} == fields
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    code, _, stderr = _batch([dataset, "-o", out, *FAST, "--inverse"], capsys)  # everything there: nothing to do
    assert code == 0 and "(finished earlier)" in stderr and "inverted now" not in stderr
    assert all("inverse_field" not in line for line in run_log(out)[-2:])


def test_a_failed_inversion_fails_its_pair_and_the_next_run_inverts_it(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = runner.write_inverse

    def failing(disp, output, **kwargs):
        if "0002_0001" in str(output):
            raise MemoryError("out of memory")
        return real(disp, output, **kwargs)

    monkeypatch.setattr(runner, "write_inverse", failing)
    code, _, stderr = _batch([dataset, "-o", out, *FAST, "--inverse"], capsys)
    assert code == 1
    failed = [line for line in run_log(out) if line["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["pair"] == "0002_0001"
    assert failed[0]["error"] == "the field was written but not its inverse: MemoryError: out of memory"
    assert batch.field_is_complete(out / FIELDS[0], nib.load(out / FIELDS[0]).shape[:3])
    assert sorted(p.name for p in out.glob("inverse_*")) == INVERSES[1:]

    monkeypatch.setattr(runner, "write_inverse", real)
    code, _, stderr = _batch([dataset, "-o", out, *FAST, "--inverse"], capsys)
    assert code == 0, stderr
    assert "0 to register, 2 finished earlier (1 still to invert)" in stderr
    assert sorted(p.name for p in out.glob("inverse_*")) == INVERSES


def test_the_inverse_option_travels_with_the_task_and_bad_conventions_stop_the_run(dataset, tmp_path):
    pair = load_pairs(dataset)[0]
    job = PairJob(pair, tmp_path / pair.field_name, inverse=tmp_path / inverse_name(pair), invert_only=True)
    task = PairTask(job, load_config("convexadam-lumir"), guard=True)
    assert pickle.loads(pickle.dumps(task)) == task  # what a Ray worker receives
    assert not inverse_name(pair).startswith("disp_")  # never taken for a field by an evaluator or container
    with pytest.raises(ConfigError, match="init_convention must be one of"):
        batch.run_batch(load_pairs(dataset), tmp_path / "out", config=load_config("convexadam-lumir"),
                        init_convention="ants")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_workers_write_the_same_inverses(dataset, tmp_path, capsys):
    pytest.importorskip("ray")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert _batch([dataset, "-o", local, *FAST, "--inverse"], capsys)[0] == 0
    code, _, stderr = _batch([dataset, "-o", on_ray, *FAST, "--inverse", "--ray"], capsys)
    assert code == 0, stderr
    for name in INVERSES:
        np.testing.assert_allclose(_field(on_ray / name), _field(local / name), atol=1e-4)
    assert all(line["inverse_field"] for line in run_log(on_ray))
