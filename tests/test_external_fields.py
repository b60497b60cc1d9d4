"""Fields made by another tool: an ITK displacement field, written by SimpleITK (the independent
reference) from a known transform, is told from a LUMIR field by its header and converted where
jaxreg takes a field: `jaxreg evaluate`, `register --init-disp` (and the library's `register`),
`batch --init-fields`, `jaxreg qc`. A header
that cannot tell is refused with one line unless `--field-convention` says."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxreg.apps.convert import convert_field
from jaxreg.config import load_config
from jaxreg.errors import ConfigError, InputError
from jaxreg.io import save_field
from jaxreg.registration import register
from jaxreg.transforms import detect_convention, load_as_lumir

from synthetic import SHAPE
from synthetic_datasets import FAST, make_dataset, run_cli, run_log

sitk = pytest.importorskip("SimpleITK")

FIELD = "disp_0002_0001.nii.gz"
REFINE_ONLY = [*FAST, "--set", "coarse.enabled=false"]


def oblique_header(spacing=(1.2, 0.9, 1.1), angles=(12, -8, 20), centre=(3.0, -5.0, 7.0)):
    """vox2world (RAS) of a rotated, anisotropic grid of SHAPE centred at `centre`."""
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    vox2world = np.eye(4)
    vox2world[:3, :3] = matrix
    vox2world[:3, 3] = np.asarray(centre) - matrix @ ((np.array(SHAPE) - 1) / 2)
    return vox2world


@pytest.fixture()
def data(tmp_path):
    """One pair (0002 <- 0001) with labels, both images on one oblique, anisotropic grid."""
    dataset = make_dataset(tmp_path / "data", subjects=2)
    vox2world = oblique_header()
    for path in sorted((dataset.parent).glob("*Val/*.nii.gz")):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), vox2world), path)
    return dataset


def _images(dataset):
    images = dataset.parent / "imagesVal"
    return images / "SYNTH_0002_0000.nii.gz", images / "SYNTH_0001_0000.nii.gz"


def _sitk_field(fixed, path):
    """Write the field of a known smooth transform (rotation about the grid centre, translation,
    B-spline bumps) as SimpleITK writes it: [X,Y,Z,1,3], intent vector, LPS mm. Returns it."""
    reference = sitk.ReadImage(str(fixed))
    centre = reference.TransformContinuousIndexToPhysicalPoint(((np.array(SHAPE) - 1) / 2).tolist())
    rigid = sitk.Euler3DTransform(centre, 0.04, -0.03, 0.05, (1.2, -0.8, 0.6))
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3], 3)
    rng = np.random.default_rng(0)
    bspline.SetParameters((rng.standard_normal(len(bspline.GetParameters())) * 1.0).tolist())
    field = sitk.TransformToDisplacementField(sitk.CompositeTransform([rigid, bspline]), sitk.sitkVectorFloat64,
                                              reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(path))
    return path


def _reference_lumir(itk_path, moving):
    """The LUMIR field of an ITK field from SimpleITK's geometry alone: fixed voxel i sits at
    p = origin + D diag(spacing) i (the field's grid is the fixed grid), is pulled from q = p + d(p),
    which is moving voxel index D_m^-1 (q - origin_m) / spacing_m."""
    field, moving_img = sitk.ReadImage(str(itk_path)), sitk.ReadImage(str(moving))
    d = np.transpose(sitk.GetArrayFromImage(field), (3, 2, 1, 0)).astype(np.float64)  # (3, X, Y, Z)

    def index_to_point(img):
        return np.reshape(img.GetDirection(), (3, 3)) @ np.diag(img.GetSpacing()), np.array(img.GetOrigin())

    fixed_matrix, fixed_origin = index_to_point(field)
    moving_matrix, moving_origin = index_to_point(moving_img)
    i = np.indices(SHAPE, dtype=np.float64)
    p = np.einsum("ij,j...->i...", fixed_matrix, i) + fixed_origin.reshape(3, 1, 1, 1)
    q = p + d
    j = np.einsum("ij,j...->i...", np.linalg.inv(moving_matrix), q - moving_origin.reshape(3, 1, 1, 1))
    return (j - i).astype(np.float32)


def _scores(report_path):
    """Each pair's entry of a report, without its time and the note of the field's convention."""
    pairs = json.loads(report_path.read_text())["pairs"]
    return {key: {k: ({d: x for d, x in v.items() if d != "field_convention"} if k == "details" else v)
                  for k, v in pair.items() if k != "seconds"} for key, pair in pairs.items()}


def test_evaluate_scores_an_itk_field_as_the_equivalent_lumir_field(data, tmp_path, capsys):
    fixed, moving = _images(data)
    itk = _sitk_field(fixed, tmp_path / "itk" / FIELD)
    assert detect_convention(itk) == "itk"
    reference = _reference_lumir(itk, moving)
    assert 1.0 < np.abs(reference).max() < 6.0  # a real deformation, in voxels
    converted = load_as_lumir(itk, fixed=fixed, moving=moving)
    np.testing.assert_allclose(converted, reference, atol=2e-3)
    save_field(reference, tmp_path / "lumir" / FIELD, nib.load(fixed).affine)
    convert_field(itk, tmp_path / "converted" / FIELD, fixed=fixed, moving=moving, to="lumir")

    for folder in ("itk", "lumir", "converted"):
        code, _, stderr = run_cli(["evaluate", data.parent, tmp_path / folder, "-o", tmp_path / f"{folder}.json"],
                                  capsys)
        assert code == 0, stderr
    by_itk, by_reference, by_converted = (_scores(tmp_path / f"{f}.json") for f in ("itk", "lumir", "converted"))
    assert by_itk == by_converted  # the same field once converted: the same scores, exactly
    assert json.loads((tmp_path / "itk.json").read_text())["pairs"]["0002_0001"]["details"]["field_convention"] == "itk"
    for name in ("dice", "hd95", "ndv", "sdlogj"):  # and those of SimpleITK's own map, to rounding
        assert by_itk["0002_0001"][name] == pytest.approx(by_reference["0002_0001"][name], abs=2e-3), name
    assert by_itk["0002_0001"]["dice"] < 0.999  # the field moved the labels


def _itk_and_its_conversion(dataset, folder):
    """(fixed, moving, an ITK field of the pair written by SimpleITK, its LUMIR conversion)."""
    fixed, moving = _images(dataset)
    itk = _sitk_field(fixed, folder / "itk" / FIELD)
    return fixed, moving, itk, convert_field(itk, folder / "lumir" / FIELD, fixed=fixed, moving=moving, to="lumir")


def test_init_disp_with_an_itk_field_equals_init_disp_with_its_lumir_conversion(data, tmp_path, capsys):
    fixed, moving, itk, lumir = _itk_and_its_conversion(data, tmp_path)
    outputs = {}
    for name, start in (("itk", itk), ("lumir", lumir)):
        outputs[name] = tmp_path / f"from_{name}.nii.gz"
        code, _, stderr = run_cli(["register", fixed, moving, "-o", outputs[name], *REFINE_ONLY, "--init-disp", start],
                                  capsys)
        assert code == 0, stderr
    from_itk, from_lumir = (np.asarray(nib.load(outputs[k]).dataobj) for k in ("itk", "lumir"))
    np.testing.assert_array_equal(from_itk, from_lumir)
    assert np.abs(from_itk - np.asarray(nib.load(lumir).dataobj)).max() > 0.01  # the refinement moved it

    # batch --init-fields takes the folder of ITK fields the same way
    out = tmp_path / "batch"
    code, _, stderr = run_cli(["batch", data, "-o", out, *REFINE_ONLY, "--init-fields", itk.parent, "--no-guard"],
                              capsys)
    assert code == 0, stderr
    np.testing.assert_allclose(np.asarray(nib.load(out / FIELD).dataobj), from_lumir, atol=1e-4)

    # the library's register reads the header too, where the images' headers can place the field
    config = load_config(REFINE_ONLY[REFINE_ONLY.index("--preset") + 1],
                         [value for flag, value in zip(REFINE_ONLY, REFINE_ONLY[1:]) if flag == "--set"])
    by_library = register(fixed, moving, config=config, init_disp=itk).disp
    np.testing.assert_allclose(by_library, np.moveaxis(from_lumir, -1, 0), atol=1e-5)
    arrays = [np.asarray(nib.load(path).dataobj, np.float32) for path in (fixed, moving)]
    with pytest.raises(InputError, match="is an ITK displacement field: pass the images as paths"):
        register(*arrays, config=config, init_disp=itk)


def test_qc_reads_an_itk_field_as_its_lumir_conversion(data, tmp_path, capsys):
    fixed, moving, itk, lumir = _itk_and_its_conversion(data, tmp_path)
    lines = {}
    for name, disp in (("itk", itk), ("lumir", lumir)):
        code, stdout, stderr = run_cli(["qc", fixed, moving, disp, "-o", tmp_path / f"{name}.png"], capsys)
        assert code == 0, stderr
        lines[name] = stdout.splitlines()[0]
    assert lines["itk"] == lines["lumir"] and "max |u|" in lines["itk"]
    five_d = tmp_path / "five_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (1, 3), np.float32), np.eye(4)), five_d)
    code, _, stderr = run_cli(["qc", fixed, moving, five_d, "-o", tmp_path / "five_d.png"], capsys)
    assert code == 2 and "--field-convention itk or lumir" in stderr and not (tmp_path / "five_d.png").exists()
    code, stdout, stderr = run_cli(["qc", fixed, moving, five_d, "-o", tmp_path / "five_d.png",
                                    "--field-convention", "lumir"], capsys)
    assert code == 0, stderr


def test_the_header_tells_the_convention_and_an_ambiguous_one_must_be_named(tmp_path):
    data = np.zeros(SHAPE + (3,), np.float32)
    save_field(np.zeros((3,) + SHAPE, np.float32), tmp_path / "lumir.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(data, -1, 0), np.eye(4)), tmp_path / "channels_first.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, :, None, :], np.eye(4)), tmp_path / "five_d.nii.gz")
    ras = nib.Nifti1Image(data, np.eye(4))
    ras.header.set_intent(1006)  # NIfTI displacement vector (VoxelMorph, surfa): RAS mm
    nib.save(ras, tmp_path / "ras.nii.gz")
    sitk.WriteImage(sitk.Image(list(SHAPE), sitk.sitkVectorFloat32, 3), str(tmp_path / "sitk.nii.gz"))

    assert detect_convention(tmp_path / "lumir.nii.gz") == "lumir"
    assert detect_convention(tmp_path / "channels_first.nii.gz") == "lumir"
    assert detect_convention(tmp_path / "sitk.nii.gz") == "itk"
    assert detect_convention(tmp_path / "ras.nii.gz") == "itk"
    with pytest.raises(InputError, match=r"five_d.nii.gz' is stored \[X,Y,Z,1,3\] without a vector intent.*"
                                         "--field-convention itk or lumir"):
        detect_convention(tmp_path / "five_d.nii.gz")
    assert detect_convention(tmp_path / "five_d.nii.gz", "lumir") == "lumir"
    assert detect_convention(tmp_path / "lumir.nii.gz", "itk") == "itk"
    with pytest.raises(ConfigError, match="must be one of auto, lumir, itk, got 'ants'"):
        detect_convention(tmp_path / "lumir.nii.gz", "ants")
    with pytest.raises(InputError, match="nope.nii.gz' does not exist"):
        detect_convention(tmp_path / "nope.nii.gz")


def test_an_ambiguous_field_is_one_line_in_each_command_until_its_convention_is_given(data, tmp_path, capsys):
    fixed, moving = _images(data)
    disp = np.random.default_rng(1).uniform(-1, 1, SHAPE + (3,)).astype(np.float32)
    (tmp_path / "plain").mkdir()
    nib.save(nib.Nifti1Image(disp, np.eye(4)), tmp_path / "plain" / FIELD)
    five_d = tmp_path / "five_d" / FIELD
    five_d.parent.mkdir()
    nib.save(nib.Nifti1Image(disp[:, :, :, None, :], np.eye(4)), five_d)

    code, stdout, stderr = run_cli(["evaluate", data.parent, five_d.parent], capsys)
    assert code == 2 and stderr.splitlines()[-1].startswith("error: 1 of 1 pair not scored (1 invalid)")
    assert "INVALID" in stdout and "--field-convention itk or lumir" in stdout  # the pair's row says why
    code, _, stderr = run_cli(["evaluate", data.parent, five_d.parent, "--field-convention", "lumir",
                               "-o", tmp_path / "five_d.json"], capsys)
    assert code == 0, stderr
    assert run_cli(["evaluate", data.parent, tmp_path / "plain", "-o", tmp_path / "plain.json"], capsys)[0] == 0
    assert _scores(tmp_path / "five_d.json") == _scores(tmp_path / "plain.json")

    code, _, stderr = run_cli(["register", fixed, moving, "-o", tmp_path / "out.nii.gz", *REFINE_ONLY,
                               "--init-disp", five_d], capsys)
    assert code == 2 and stderr.startswith("error: --init-disp field") and stderr.count("\n") == 1
    assert "--field-convention itk or lumir" in stderr and not (tmp_path / "out.nii.gz").exists()

    out = tmp_path / "batch"
    code, _, stderr = run_cli(["batch", data, "-o", out, *REFINE_ONLY, "--init-fields", five_d.parent], capsys)
    assert code == 1
    (line,) = run_log(out)
    assert line["status"] == "failed" and "without a vector intent" in line["error"]
    code, _, stderr = run_cli(["evaluate", data.parent, five_d.parent, "--field-convention", "ants"], capsys)
    assert code == 2 and "--field-convention" in stderr
