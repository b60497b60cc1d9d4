"""The whole program and its host wrappers on small synthetic pairs."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import jaxreg  # noqa: F401
from jaxreg import registration as pipeline, xla_options
from jaxreg.config import load_config
from jaxreg.errors import ConfigError, InputError

from synthetic import brain, pull, smooth_field

# One small configuration for every test here: compiled once, reused.
CONFIG = load_config("convexadam-lumir", ["refine.iterations=30"])
FIXED = brain()
MASK = ndimage.binary_erosion(FIXED > 0, iterations=3)


def test_identity_pair_gives_near_zero_field():
    result = pipeline.register(FIXED, FIXED, config=CONFIG)
    assert result.disp.shape == (3,) + FIXED.shape and result.disp.dtype == np.float32
    assert np.abs(result.disp[:, MASK]).mean() < 0.05
    assert np.abs(result.disp).max() < 0.5


def test_registration_reduces_misalignment_and_moved_matches_scipy():
    moving = pull(FIXED, smooth_field(amplitude=3.0))
    result = pipeline.register(FIXED, moving, config=CONFIG)
    error_before = np.mean((moving - FIXED)[MASK] ** 2)
    error_after = np.mean((pull(moving, result.disp) - FIXED)[MASK] ** 2)
    assert error_after < 0.3 * error_before, (error_before, error_after)
    assert result.summary.ncc_after > result.summary.ncc_before
    # the moved image the program returns is the moving image pulled through the field (scipy reference)
    low, high = moving.min(), moving.max()
    np.testing.assert_allclose(result.moved * (high - low) + low, pull(moving, result.disp), atol=1e-2 * high)


def test_same_shape_pairs_reuse_one_compiled_program():
    pipeline.register(FIXED, FIXED, config=CONFIG)
    count = len(xla_options._executables)
    result = pipeline.register(brain(seed=5), FIXED, config=CONFIG)
    assert result.summary.compile_seconds == 0.0
    assert len(xla_options._executables) == count


def test_written_field_applied_with_scipy_reproduces_written_moved_image(tmp_path):
    moving = pull(FIXED, smooth_field(amplitude=2.0, seed=4))
    for name, data in [("fixed", FIXED), ("moving", moving)]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    result, written = pipeline.register_files(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                                              tmp_path / "disp.nii.gz", moved_output=tmp_path / "moved.nii.gz",
                                              config=CONFIG)
    field = nib.load(written["disp"])
    assert field.shape == FIXED.shape + (3,) and field.get_data_dtype() == np.float32
    disp = np.moveaxis(np.asarray(field.dataobj), -1, 0)
    moved = np.asarray(nib.load(written["moved"]).dataobj)
    np.testing.assert_allclose(pull(moving, disp), moved, atol=0.5)  # 0.5 of 255: float32 rounding only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disp.nii.gz", "fixed.nii.gz", "moved.nii.gz", "moving.nii.gz"]


def test_bad_arrays_are_rejected_with_one_line():
    with pytest.raises(InputError, match="same grid"):
        pipeline.register(FIXED, FIXED[:-1], config=CONFIG)
    bad = FIXED.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        pipeline.register(FIXED, bad, config=CONFIG)
    with pytest.raises(InputError, match="3-D"):
        pipeline.register(FIXED[..., None], FIXED[..., None], config=CONFIG)
    with pytest.raises(ConfigError, match="must be one of"):
        pipeline.register(FIXED, FIXED, preset="nope")


def test_public_api_one_call_on_arrays():
    import jaxreg as api

    result = api.register(FIXED, FIXED, config=CONFIG)
    assert isinstance(result, api.RegistrationResult)
    assert result.disp_lumir.shape == FIXED.shape + (3,)
    assert set(api.preset_names()) >= {"lumir", "convexadam-lumir", "fast"}


@pytest.mark.slow
def test_compiled_program_is_kept_on_disk_for_the_next_process(tmp_path):
    import os
    import subprocess
    import sys

    script = ("import numpy as np, jaxreg; from jaxreg.registration import register; "
              "from jaxreg.config import load_config; jaxreg.configure(); "
              "x = np.random.default_rng(0).random((16, 16, 16)).astype('float32'); "
              "register(x, x, config=load_config('fast', ['refine.iterations=2']))")
    # every program is kept (jaxreg keeps those that compile in 0.5 s or more; this one may not)
    env = dict(os.environ, JAXREG_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert any((tmp_path / "cache").iterdir())
