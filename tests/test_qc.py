"""Quality-control pictures: what is drawn is what the metrics count, folds cannot be mistaken for
growth, every command writes the same metric line, and the index sorts the worst pairs first."""

import html
import re
import shutil
import subprocess
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("matplotlib", reason="QC pictures need the optional matplotlib (pip install 'jaxreg[qc]')")

import matplotlib  # noqa: E402

from jaxreg.apps import qc  # noqa: E402
from jaxreg.cli.main import main  # noqa: E402
from jaxreg.evaluation import metrics  # noqa: E402

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
    slices = qc.qc_slices(fixed, fixed, disp)
    folds = metrics.non_diffeomorphic_volume_map(disp) > 0
    assert folds.any() and metrics.ndv(disp, fixed > 0) > 0
    for plane in range(3):
        expected = np.take(folds, slices.centre[plane], axis=plane)
        np.testing.assert_array_equal(slices.folds[plane], expected)
    assert slices.folds[0].any()  # the fold crosses the sagittal slice through the centre


def test_each_plane_is_the_slice_of_the_whole_volume_computation():
    """Only three planes are computed; they must equal the whole volume's, sliced (scipy reference
    for the moved image)."""
    fixed, disp = brain(), _folded_field()
    moving = brain(seed=3)
    slices = qc.qc_slices(fixed, moving, disp)
    log_j = qc.log_jacobian(disp)
    moved = ndimage.map_coordinates(moving, np.indices(SHAPE, dtype=np.float32) + disp, order=1, mode="nearest")
    for plane in range(3):
        index = slices.centre[plane]
        np.testing.assert_array_equal(slices.log_jacobian[plane], np.take(log_j, index, axis=plane))
        np.testing.assert_allclose(slices.moved[plane], np.take(moved, index, axis=plane), rtol=1e-6, atol=1e-4)
    for index in (0, SHAPE[2] - 1):  # a plane at the border: one-sided differences, as np.gradient
        np.testing.assert_array_equal(qc._plane_log_jacobian(disp, 2, index), log_j[:, :, index])


def test_log_jacobian_of_identity_and_of_uniform_scaling():
    assert np.allclose(qc.log_jacobian(np.zeros((3, 6, 6, 6), np.float32)), 0.0)
    grid = np.indices((6, 6, 6), dtype=np.float32)
    np.testing.assert_allclose(qc.log_jacobian(0.1 * grid), np.log(1.1 ** 3), rtol=1e-5)


def test_the_fold_colour_is_not_in_the_log_jacobian_colour_map():
    colours = matplotlib.colormaps[qc.LOG_JACOBIAN_MAP](np.linspace(0, 1, 256))[:, :3]
    fold = np.array(matplotlib.colors.to_rgb(qc.FOLD_COLOUR))
    assert np.min(np.linalg.norm(colours - fold, axis=1)) > 0.45  # far from every colour of the map
    assert np.min(np.linalg.norm(colours - np.array([1.0, 0.0, 0.0]), axis=1)) > 0.3  # and red is not in it either


def _pixels_of(path, colour, tolerance=0.08):
    from matplotlib import pyplot

    image = pyplot.imread(path)[..., :3]
    return int(np.sum(np.all(np.abs(image - np.array(matplotlib.colors.to_rgb(colour))) < tolerance, axis=-1)))


def test_folds_are_painted_and_a_field_without_folds_has_none(tmp_path):
    fixed = brain()
    folded = qc.qc_slices(fixed, fixed, _folded_field())
    smooth = qc.qc_slices(fixed, fixed, smooth_field(amplitude=1.0))
    assert not any(smooth.folds[p].any() for p in range(3))
    qc.render_thumbnail(folded, tmp_path / "folded.png")
    qc.render_thumbnail(smooth, tmp_path / "smooth.png")
    assert _pixels_of(tmp_path / "smooth.png", qc.FOLD_COLOUR) == 0
    if folded.folds[qc.THUMBNAIL_PLANE].any():
        assert _pixels_of(tmp_path / "folded.png", qc.FOLD_COLOUR) > 0


def test_picture_written_atomically(tmp_path):
    fixed = brain()
    path = qc.qc_figure(fixed, fixed, _folded_field(), tmp_path / "qc" / "pair.png", summary="Dice 1")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pair.png"]


def test_the_metric_line_is_the_same_whichever_command_drew_the_picture(tmp_path):
    """`jaxreg qc` computes the line; `register --qc` passes the NDV it measured; a batch passes
    the evaluation's values: the same metrics come out, in the same order."""
    fixed = brain()
    disp = _folded_field()
    for name, data in [("f", fixed), ("m", fixed)]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(disp, 0, -1), np.eye(4)), tmp_path / "disp.nii.gz")
    files = (tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "disp.nii.gz")
    _, by_qc = qc.qc_for_files(*files, tmp_path / "a.png")
    _, by_register = qc.qc_for_files(*files, tmp_path / "b.png", values={"ndv": metrics.ndv(disp, fixed > 0)})
    _, by_batch = qc.qc_for_files(*files, tmp_path / "c.png", values={"dice": 0.5, "ndv": by_qc["ndv"],
                                                                        "sdlogj": metrics.sdlogj(disp)})
    assert qc.summary_line(by_qc) == qc.summary_line(by_register)
    assert qc.summary_line(by_batch) == "Dice 0.5000 | " + qc.summary_line(by_qc)
    assert re.fullmatch(r"NDV \d\.\d{5} % \| SDlogJ \d\.\d{4} \| max \|u\| \d+\.\d vox", qc.summary_line(by_qc))


def test_qc_command(tmp_path, capsys):
    fixed = brain()
    for name, data in [("f", fixed), ("m", fixed)]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(_folded_field(), 0, -1), np.eye(4)), tmp_path / "disp.nii.gz")
    code = main(["qc", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), str(tmp_path / "disp.nii.gz"),
                 "-o", str(tmp_path / "qc.png")])
    out = capsys.readouterr().out
    assert code == 0 and "NDV" in out and "SDlogJ" in out and (tmp_path / "qc.png").exists()


# --------------------------------------------------------------------------------------------
# the index page
# --------------------------------------------------------------------------------------------

ROWS = [{"pair": "0002<-0001", "dice": 0.57, "ndv": 1e-4, "image": "a.png", "thumbnail": "a_thumb.png"},
        {"pair": "0003<-0002", "dice": None, "ndv": 2e-4, "image": "b.png", "thumbnail": "b_thumb.png"},
        {"pair": "0004<-0003", "dice": 0.51, "ndv": 0.0, "image": "c.png", "thumbnail": "c_thumb.png"},
        {"pair": "0005<-0004", "dice": 0.60, "ndv": float("nan"), "image": "d.png", "thumbnail": "d_thumb.png"}]


def test_index_has_a_summary_row_sort_directions_and_thumbnails(tmp_path):
    text = qc.write_index(ROWS, tmp_path / "index.html").read_text()
    assert "0003&lt;-0002" in text and 'src="b_thumb.png"' in text and 'data-full="b.png"' in text
    summary = re.search(r'<tr class="summary"><th>mean of 4 pairs</th>(.*?)</tr>', text).group(1)
    assert "<td>0.5600</td>" in summary  # Dice mean over the 3 pairs that have one
    worst = re.search(r'<tr class="summary"><th>worst pair</th>(.*?)</tr>', text).group(1)
    assert "0.5100<br><small>0004&lt;-0003</small>" in worst  # lowest Dice
    assert "0.00020<br><small>0003&lt;-0002</small>" in worst  # largest NDV
    assert re.search(r'data-name="Dice" data-worst="asc"', text) and re.search(r'data-name="NDV %" data-worst="desc"', text)
    assert text.count('data-v="null"') == 2  # the missing Dice and the NaN NDV sort as missing
    assert ">nan</td>" in text and ">–</td>" in text  # but a NaN is shown as such


def _rendered_order(page):
    """The pair column after the page's own script ran, in a real headless browser."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [html.unescape(label) for label in re.findall(r"<tr><td[^>]*>([^<]+)</td>", body)], dom


@pytest.mark.parametrize("hash_, expected", [
    ("#worst", ["0004<-0003", "0002<-0001", "0005<-0004", "0003<-0002"]),  # Dice ascending, missing last
    ("#sort=ndv", ["0003<-0002", "0002<-0001", "0004<-0003", "0005<-0004"]),  # NDV largest first, NaN last
    ("#sort=ndv-asc", ["0004<-0003", "0002<-0001", "0003<-0002", "0005<-0004"]),  # missing still last
])
def test_index_sorts_worst_first_in_a_browser_with_missing_values_last(tmp_path, hash_, expected):
    path = qc.write_index(ROWS, tmp_path / "index.html")
    order, dom = _rendered_order(path.as_uri() + hash_)
    assert order == expected
    assert "\u25B2" in dom or "\u25BC" in dom  # the sorted column shows its direction


def test_qc_dataset_writes_pictures_thumbnails_and_index(tmp_path):
    fixed = brain()
    for name, data in [("f", fixed), ("m", fixed)]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(_folded_field(), 0, -1), np.eye(4)), tmp_path / "disp_f_m.nii.gz")
    pair = SimpleNamespace(fixed=tmp_path / "f.nii.gz", moving=tmp_path / "m.nii.gz", field_name="disp_f_m.nii.gz",
                           label="f<-m")
    seen = []
    index = qc.qc_dataset([(pair, {"dice": 0.7, "error": "ignored text"})], tmp_path, tmp_path / "qc",
                          progress=seen.append)
    assert seen == ["f<-m"]
    assert sorted(p.name for p in index.parent.iterdir()) == ["disp_f_m.png", "disp_f_m_thumb.png", "index.html"]
    text = index.read_text()
    assert "SDlogJ" in text and "0.7" in text
