"""Quality-control pictures: files are written, and the folds drawn are those NDV counts."""

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="QC pictures need the optional matplotlib (pip install 'jaxreg[qc]')")

from jaxreg import metrics  # noqa: E402
from jaxreg.cli.main import main  # noqa: E402
from jaxreg.apps.qc import log_jacobian, qc_figure, qc_slices, write_index  # noqa: E402

from synthetic import SHAPE, brain, smooth_field  # noqa: E402


def _folded_field():
    """A smooth field plus a local fold through the centre of the brain."""
    disp = smooth_field(amplitude=1.0)
    centre = tuple(n // 2 for n in SHAPE)
    disp[0, centre[0], centre[1] - 2: centre[1] + 2, centre[2] - 2: centre[2] + 2] += 3.0  # x jumps past its neighbour
    return disp


def test_highlighted_folds_are_the_voxels_ndv_counts():
    fixed = brain()
    disp = _folded_field()
    slices = qc_slices(fixed, fixed, disp)
    folds = metrics.non_diffeomorphic_volume_map(disp) > 0
    assert folds.any() and metrics.ndv(disp, fixed > 0) > 0
    for plane in range(3):
        expected = np.take(folds, slices.centre[plane], axis=plane)
        np.testing.assert_array_equal(slices.folds[plane], expected)
    assert slices.folds[0].any()  # the fold crosses the sagittal slice through the centre


def test_log_jacobian_of_identity_and_of_uniform_scaling():
    assert np.allclose(log_jacobian(np.zeros((3, 6, 6, 6), np.float32)), 0.0)
    grid = np.indices((6, 6, 6), dtype=np.float32)
    np.testing.assert_allclose(log_jacobian(0.1 * grid), np.log(1.1 ** 3), rtol=1e-5)


def test_picture_written_atomically(tmp_path):
    fixed = brain()
    path = qc_figure(fixed, fixed, _folded_field(), tmp_path / "qc" / "pair.png", summary="Dice 1")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pair.png"]


def test_index_is_sortable_html_with_every_pair(tmp_path):
    rows = [{"pair": "0002<-0001", "dice": 0.57, "ndv": 1e-4, "image": "a.png"},
            {"pair": "0003<-0002", "dice": None, "ndv": 2e-4, "image": "b.png"}]
    text = write_index(rows, tmp_path / "index.html").read_text()
    assert "sortBy(1)" in text and "0003&lt;-0002" in text and 'src="b.png"' in text


def test_qc_command(tmp_path, capsys):
    fixed = brain()
    for name, data in [("f", fixed), ("m", fixed)]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(_folded_field(), 0, -1), np.eye(4)), tmp_path / "disp.nii.gz")
    code = main(["qc", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), str(tmp_path / "disp.nii.gz"),
                 "-o", str(tmp_path / "qc.png")])
    out = capsys.readouterr().out
    assert code == 0 and "NDV" in out and (tmp_path / "qc.png").exists()
