"""`jaxreg prepare`: a T1 in another orientation, resolution and position comes back onto the template."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxreg.cli.main import main
from jaxreg.errors import InputError
from jaxreg.apps.prepare import _resample, load_record, prepare, template, write_prepared
from data_paths import OASIS



def _native_from_template(tmp_path):
    """The template seen by another scanner: axes permuted and flipped, 1.25 mm voxels, shifted, slightly scaled."""
    templ, templ_vox2world = template()
    # native voxel -> template voxel: permute (z, x, y), flip one axis, 1.25 mm voxels, 1.04 scale, shift
    shape = (160, 144, 190)
    native2templ = np.zeros((4, 4))
    native2templ[0, 1] = 1.25 * 1.04
    native2templ[1, 2] = -1.25 * 1.04
    native2templ[2, 0] = 1.25 * 1.04
    native2templ[:3, 3] = [-12.0, 229.0, -15.0]
    native2templ[3, 3] = 1.0
    native = ndimage.affine_transform(templ, native2templ[:3, :3], native2templ[:3, 3], output_shape=shape, order=1)
    # the header says the voxels are 1.25 mm in this orientation, but not the extra 4 % or the shift
    header = templ_vox2world @ native2templ
    header[:3, :3] /= 1.04
    path = tmp_path / "native.nii.gz"
    nib.save(nib.Nifti1Image(native.astype(np.float32), header), path)
    points = np.array([[80.0, 112.0, 96.0], [60.0, 150.0, 120.0]])
    native_points = (np.linalg.inv(native2templ) @ np.c_[points, np.ones(2)].T).T
    world = (header @ native_points.T).T[:, :3]
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("id,name,x_mm,y_mm,z_mm\n" + "".join(f"{i},p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(world)))
    return path, csv_path, templ, points


@pytest.fixture(scope="module")
def prepared_native(tmp_path_factory):
    """The native-looking template, prepared once for the tests that read the result."""
    folder = tmp_path_factory.mktemp("native")
    path, csv_path, templ, points = _native_from_template(folder)
    return path, templ, points, prepare(path, landmarks_path=csv_path)


@pytest.mark.slow
def test_prepare_recovers_the_template_and_carries_landmarks(prepared_native):
    path, templ, points, prepared = prepared_native
    assert prepared.image.shape == (160, 224, 192) and prepared.image.dtype == np.uint8
    mask_a, mask_b = prepared.image > 0, templ > 0
    assert 2 * (mask_a & mask_b).sum() / (mask_a.sum() + mask_b.sum()) > 0.95
    assert np.corrcoef(prepared.image.ravel(), templ.ravel())[0, 1] > 0.95
    found = np.array([p[2:] for p in prepared.landmarks])
    assert np.linalg.norm(found - points, axis=1).max() < 2.0


def test_prepare_writes_the_maps_back_to_the_native_t1(prepared_native, tmp_path):
    """The JSON record holds the map and the native grid; SimpleITK, reading the ITK affine, resamples
    the native T1 onto the prepared grid as prepare did (trilinear, before the intensity rescaling)."""
    sitk = pytest.importorskip("SimpleITK")
    path, templ, _, prepared = prepared_native
    written = write_prepared(prepared, tmp_path / "prep.nii.gz")
    assert written["record"] == tmp_path / "prep_prepare.json" and written["affine"] == tmp_path / "prep_affine.txt"
    record = load_record(written["image"])
    native = nib.load(path)
    np.testing.assert_allclose(record.template_vox2native_vox, prepared.template_vox2native_vox)
    np.testing.assert_allclose(record.native_vox2world, native.affine)
    assert record.native_shape == native.shape and record.native_image == str(path)
    resampled = sitk.Resample(sitk.ReadImage(str(path)), sitk.ReadImage(str(written["image"])),
                              sitk.ReadTransform(str(written["affine"])), sitk.sitkLinear, 0.0)
    by_sitk = np.transpose(sitk.GetArrayFromImage(resampled), (2, 1, 0))
    ours = _resample(np.asarray(native.dataobj, np.float32), prepared.template_vox2native_vox, templ.shape, order=1)
    assert ours.std() > 10
    assert np.abs(by_sitk - ours).max() < 1e-3 * ours.max()
    with pytest.raises(InputError, match="not an image written by `jaxreg prepare`"):
        load_record(path)


def test_prepare_refuses_what_cannot_work(tmp_path):
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 3), np.float32), np.eye(4)), series)
    with pytest.raises(InputError, match="4-D series"):
        prepare(series)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((200, 200, 1), np.float32), np.eye(4)), flat)
    with pytest.raises(InputError, match="2-D"):
        prepare(flat)
    tiny = tmp_path / "tiny.nii.gz"
    data = np.zeros((64, 64, 64), np.float32)
    data[10:50, 10:50, 10:50] = 1.0
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), tiny)  # 20 mm of "brain"
    with pytest.raises(InputError, match="far from a brain"):
        prepare(tiny)


@pytest.mark.slow
def test_cli_prepare_folder_writes_dataset_json(tmp_path, capsys):
    path, _, _, _ = _native_from_template(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    path.rename(folder / "subject.nii.gz")
    assert main(["prepare", str(folder), "-o", str(tmp_path / "out")]) == 0
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert dataset["training"] == [{"image": "./imagesTr/PREP_0000_0000.nii.gz"}]
    assert nib.load(tmp_path / "out" / "imagesTr" / "PREP_0000_0000.nii.gz").shape == (160, 224, 192)


@pytest.mark.slow
@pytest.mark.benchmark_data
@pytest.mark.skipif(not (OASIS / "native").is_dir(), reason=f"OASIS-TRT-20 native images not found at {OASIS}")
def test_prepare_agrees_with_the_trusted_niftyreg_conversion():
    native = OASIS / "native"
    prepared = prepare(native / "OASISTRT_0004_0000_t1.nii.gz", labels_path=native / "OASISTRT_0004_0000_labels.nii.gz",
                       landmarks_path=native / "OASISTRT_0004_0000_landmarks.csv")
    reference = np.asarray(nib.load(OASIS / "imagesVal" / "OASISTRT_0004_0000.nii.gz").dataobj)
    a, b = prepared.image > 0, reference > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93  # measured 0.957
    ref_labels = np.asarray(nib.load(OASIS / "labelsVal" / "OASISTRT_0004_0000.nii.gz").dataobj)
    dice = [2 * ((prepared.labels == v) & (ref_labels == v)).sum() / ((prepared.labels == v).sum() + (ref_labels == v).sum())
            for v in np.unique(ref_labels)[1:]]
    assert np.mean(dice) > 0.7  # measured 0.749
    ref_points = np.loadtxt(OASIS / "landmarksVal" / "OASISTRT_0004_0000.csv", delimiter=",", skiprows=1, usecols=(2, 3, 4))
    found = np.array([p[2:] for p in prepared.landmarks])
    assert np.linalg.norm(found - ref_points, axis=1).mean() < 3.0


@pytest.mark.slow
def test_prepare_warns_when_the_image_looks_like_it_has_a_skull(tmp_path):
    head = np.zeros((180, 200, 170), np.float32)
    grid = np.indices(head.shape, dtype=np.float32)
    radii = np.array([80.0, 95.0, 80.0]).reshape(3, 1, 1, 1)
    centre = (np.array(head.shape, np.float32) / 2).reshape(3, 1, 1, 1)
    head[(((grid - centre) / radii) ** 2).sum(0) < 1] = 100.0  # a 5-litre head-sized ellipsoid
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(head, np.eye(4)), path)
    prepared = prepare(path)
    assert any("skull" in warning for warning in prepared.warnings)
