"""The cross-contrast stand-in (jaxreg.ops.contrast_remap) and the lumir-multimodal preset on a remapped pair."""

import numpy as np
import pytest
from scipy import ndimage
from synthetic import SHAPE, pull, smooth_field

from jaxreg.config import load_config
from jaxreg.ops.contrast_remap import contrast_curve, remap_contrast
from jaxreg.registration import register

MULTIMODAL = ["refine.iterations=30"]  # the lumir-multimodal preset, shortened as the other tests' programs


def tissues(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A skull-stripped phantom with three T1-like tissues (CSF 0.15, GM 0.5, WM 0.9 of 255) in blobs;
    CSF and WM always meet through GM, as in a brain; background exactly 0."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    noise /= noise.std()
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    levels = np.where(noise < -0.6, 0.15, np.where(noise < 0.4, 0.5, 0.9))
    return (ndimage.gaussian_filter(255 * levels, 0.7) * ((grid ** 2).sum(0) < 0.8 ** 2)).astype(np.float32)


def test_curve_is_non_monotonic_like_flair():
    csf, gm, wm = contrast_curve([0.15, 0.5, 0.9])
    assert gm == pytest.approx(1.0, abs=0.01) and gm > wm > csf  # GM brightest, then WM, CSF darkest
    values = contrast_curve(np.linspace(0, 1, 101))
    assert np.all(values >= 0) and values.max() == pytest.approx(1.0, abs=1e-3)
    steps = np.diff(values)
    assert (steps > 0).any() and (steps < 0).any()  # no monotonic rescaling undoes it


def test_remap_keeps_background_and_is_scale_free():
    image = tissues()
    out = remap_contrast(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.all(out[image == 0] == 0) and out.max() <= 255.0001 and out[image > 0].max() > 250
    np.testing.assert_allclose(remap_contrast(3 * image + 0), out, atol=1e-3)  # normalised within the brain
    mask = image > 100
    assert np.all(remap_contrast(image, mask)[~mask] == 0)
    with pytest.raises(ValueError):
        remap_contrast(image, mask[:-1])


def test_multimodal_preset_is_lumir_without_intensity_channel():
    multimodal, lumir = load_config("lumir-multimodal"), load_config("lumir")
    assert multimodal.refine.intensity_weight == 0 and lumir.refine.intensity_weight > 0
    # 80 steps at lr 1 (ConvexAdam's): lumir's 40 steps at lr 1.5 lean on its full-resolution level;
    # without intensity terms there is no contrast check either
    as_multimodal = ["refine.intensity_weight=0", "refine.iterations=80", "refine.learning_rate=1.0",
                     "refine.intensity_min_ncc=-1"]
    assert multimodal.refine == load_config("lumir", as_multimodal).refine
    assert (multimodal.coarse, multimodal.features) == (lumir.coarse, lumir.features)
    assert lumir.fine.enabled and not multimodal.fine.enabled  # intensity SSD at full resolution: same contrast only
    assert multimodal.unfold == lumir.unfold


def test_multimodal_preset_recovers_a_known_deformation_across_contrasts():
    moving = tissues()
    truth = smooth_field(amplitude=4.0, seed=5, sigma=5.0)
    fixed = pull(moving, truth)  # fixed(x) = moving(x + truth(x)): the field to find is `truth`
    mask = fixed > 0

    def error(disp):
        return float(np.linalg.norm(disp - truth, axis=0)[mask].mean())

    zero = error(np.zeros_like(truth))
    same = error(register(fixed, moving, preset="lumir-multimodal", overrides=MULTIMODAL).disp)
    cross = error(register(fixed, remap_contrast(moving), preset="lumir-multimodal", overrides=MULTIMODAL).disp)
    assert same < 0.8 * zero
    assert cross < zero and (zero - cross) >= 0.6 * (zero - same), (zero, same, cross)  # measured: 0.71, 0.47, 0.51
