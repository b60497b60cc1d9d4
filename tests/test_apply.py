"""`jaxreg apply`: images, label maps and points through a LUMIR field, as `register` and the LUMIR
evaluator do; the `apply`, `convert` and `invert` commands."""

import nibabel as nib
import numpy as np
import pytest
import typer
from scipy import ndimage
from typer.testing import CliRunner

from jaxreg.apps.apply import apply, apply_files, map_points
from jaxreg.errors import InputError
from jaxreg.ops.warp import warp

from synthetic import SHAPE, brain, smooth_field

LUMIR_HEADER = np.array([[1.0, 0, 0, -80], [0, 1, 0, -129], [0, 0, 1, -91], [0, 0, 0, 1]])


def _labels(image):
    labels = np.zeros(image.shape, np.uint16)
    labels[image > 60], labels[image > 120], labels[image > 170] = 3, 17, 42
    return labels


def test_labels_are_warped_exactly_as_the_lumir_evaluator_in_their_own_dtype():
    labels = _labels(brain())
    disp = smooth_field(amplitude=3.0, seed=2)
    evaluator = ndimage.map_coordinates(labels, np.indices(SHAPE) + disp.astype(np.float64), order=0)  # its call
    warped = apply(disp, labels, interpolation="nearest")
    assert warped.dtype == np.uint16
    np.testing.assert_array_equal(warped, evaluator)
    as_float = apply(disp, labels.astype(np.float32), interpolation="nearest")  # float-stored label maps
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, evaluator)
    with pytest.raises(InputError, match="non-integer"):
        apply(disp, brain() + 0.5, interpolation="nearest")


def test_images_are_moved_as_register_moves_them():
    image = brain()
    disp = smooth_field(amplitude=3.0, seed=2)
    moved = apply(disp, image)
    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, np.asarray(warp(image, disp, "border")), atol=1e-3)  # register's warp
    reference = ndimage.map_coordinates(image, np.indices(SHAPE) + disp, order=1, mode="nearest")
    np.testing.assert_allclose(moved, reference, atol=1e-3)


def test_cubic_interpolation_is_closer_to_a_smooth_truth_than_linear():
    grid = np.indices(SHAPE, dtype=np.float64)

    def truth(points):
        return 100 * np.sin(points[0] / 4.0) * np.cos(points[1] / 5.0) + 30 * np.sin(points[2] / 3.0)

    disp = smooth_field(amplitude=3.0, seed=2)
    interior = (slice(6, -6),) * 3
    expected = truth(grid + disp)[interior]
    errors = {name: np.abs(apply(disp, truth(grid), interpolation=name)[interior] - expected).max()
              for name in ("linear", "cubic")}
    assert errors["cubic"] < errors["linear"] / 5
    full = ndimage.map_coordinates(truth(grid), grid + disp, order=3, mode="nearest")
    np.testing.assert_allclose(apply(disp, truth(grid), interpolation="cubic"), full, atol=1e-3)


def test_points_go_to_where_they_are_pulled_from():
    """An affine field is trilinear-exact between voxels: p -> p + A p + b, off the grid too."""
    matrix = np.array([[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.05]])
    offset = np.array([1.5, -2.0, 0.75])
    disp = (np.einsum("ij,j...->i...", matrix, np.indices(SHAPE, dtype=np.float64))
            + offset.reshape(3, 1, 1, 1)).astype(np.float32)
    points = np.array([[10.3, 20.7, 15.2], [25.0, 30.5, 12.25], [5.5, 5.5, 30.9]])
    expected = points + points @ matrix.T + offset
    np.testing.assert_allclose(apply(disp, points), expected, atol=1e-4)
    np.testing.assert_allclose(map_points(disp, points, order=3), expected, atol=1e-3)


def test_point_files_keep_their_columns_in_voxels_or_millimetres(tmp_path):
    disp = np.zeros((3,) + SHAPE, np.float32)
    disp[0], disp[2] = 2.0, -1.5
    field = tmp_path / "disp.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(disp, 0, -1), LUMIR_HEADER), field)
    (tmp_path / "vox.csv").write_text("id,name,x,y,z\n1,AC,10,20,30\n2,PC,11.5,21,29\n")
    apply_files(field, tmp_path / "vox.csv", tmp_path / "vox_out.csv")
    assert (tmp_path / "vox_out.csv").read_text().splitlines() == [
        "id,name,x,y,z", "1,AC,12.0000,20.0000,28.5000", "2,PC,13.5000,21.0000,27.5000"]
    (tmp_path / "mm.csv").write_text("x_mm,y_mm,z_mm,note\n-70,-109,-61,a\n")
    apply_files(field, tmp_path / "mm.csv", tmp_path / "mm_out.csv")
    assert (tmp_path / "mm_out.csv").read_text().splitlines()[1] == "-68.0000,-109.0000,-62.5000,a"
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="x,y,z"):
        apply_files(field, tmp_path / "bad.csv", tmp_path / "bad_out.csv")


def test_apply_files_writes_on_the_fixed_grid_with_its_header(tmp_path):
    image = brain()
    labels = _labels(image)
    disp = smooth_field(amplitude=2.0, seed=4)
    field = tmp_path / "disp.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(disp, 0, -1), LUMIR_HEADER), field)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "moving.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels.nii.gz")
    moved = nib.load(apply_files(field, tmp_path / "moving.nii.gz", tmp_path / "moved.nii.gz", interpolation="cubic"))
    assert moved.get_data_dtype() == np.float32
    np.testing.assert_allclose(moved.affine, LUMIR_HEADER)
    warped = nib.load(apply_files(field, tmp_path / "labels.nii.gz", tmp_path / "warped.nii.gz", interpolation="nearest"))
    assert warped.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(warped.dataobj), apply(disp, labels, interpolation="nearest"))
    with pytest.raises(InputError, match="interpolation must be one of"):
        apply_files(field, tmp_path / "labels.nii.gz", tmp_path / "x.nii.gz", interpolation="bspline")


def _cli():
    from jaxreg.cli.apply import apply_command
    from jaxreg.cli.convert import convert_command
    from jaxreg.cli.invert import invert_command

    app = typer.Typer()
    for name, command in (("apply", apply_command), ("convert", convert_command), ("invert", invert_command)):
        app.command(name)(command)
    return app


def test_the_commands_write_what_they_say(tmp_path):
    image = brain()
    disp = smooth_field(amplitude=2.0, seed=4)
    field = tmp_path / "disp.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(disp, 0, -1), LUMIR_HEADER), field)
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(image, LUMIR_HEADER), tmp_path / f"{name}.nii.gz")
    runner, app = CliRunner(), _cli()

    result = runner.invoke(app, ["apply", str(field), str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "moved.nii.gz")])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'moved.nii.gz'}" in result.output
    result = runner.invoke(app, ["convert", str(field), "-o", str(tmp_path / "itk.nii.gz"), "--to", "itk",
                                 "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")])
    assert result.exit_code == 0 and nib.load(tmp_path / "itk.nii.gz").shape == SHAPE + (1, 3)
    result = runner.invoke(app, ["convert", str(tmp_path / "itk.nii.gz"), "-o", str(tmp_path / "back.nii.gz"),
                                 "--to", "lumir", "--fixed", str(tmp_path / "fixed.nii.gz"),
                                 "--moving", str(tmp_path / "moving.nii.gz")])
    assert result.exit_code == 0
    back = np.moveaxis(np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj), -1, 0)
    np.testing.assert_allclose(back, disp, atol=1e-4)
    result = runner.invoke(app, ["convert", str(field), "-o", str(tmp_path / "n.nii.gz"), "--to", "lumir", "--native",
                                 "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")])
    assert isinstance(result.exception, InputError) and "--to itk" in str(result.exception)
    result = runner.invoke(app, ["invert", str(field), "-o", str(tmp_path / "inverse.nii.gz"),
                                 "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")])
    assert result.exit_code == 0
    assert "phi(psi(y)) - y  moving brain: mean" in result.output and "psi(phi(x)) - x  fixed brain:" in result.output
    assert nib.load(tmp_path / "inverse.nii.gz").shape == SHAPE + (3,)


def test_the_new_functions_are_public():
    import jaxreg

    for name in ("apply", "apply_files", "invert", "write_inverse", "convert_field", "export_native",
                 "lumir_to_itk", "itk_to_lumir"):
        assert name in jaxreg.__all__ and callable(getattr(jaxreg, name))
