"""The cross-contrast stand-in (jaxreg.ops.contrast_remap) and the lumir-multimodal preset on a remapped pair."""

import numpy as np
import pytest
from scipy import ndimage
from synthetic import SHAPE, pull, smooth_field

from jaxreg.config import ConfigError, RegistrationConfig, load_config
from jaxreg.pipeline import stages
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
    assert np.all(out[image == 0] == 0) and out.max() <= 255.001 and out[image > 0].max() > 250
    np.testing.assert_allclose(remap_contrast(3 * image + 0), out, atol=1e-3)  # normalised within the brain
    mask = image > 100
    assert np.all(remap_contrast(image, mask)[~mask] == 0)
    with pytest.raises(ValueError):
        remap_contrast(image, mask[:-1])


def test_multimodal_preset_is_lumir_without_intensity_channel():
    multimodal, lumir = load_config("lumir-multimodal"), load_config("lumir")
    assert multimodal.refine.intensity_weight == 0 and lumir.refine.intensity_weight > 0
    # 80 steps at lr 1 (ConvexAdam's): lumir's 40 steps at lr 1.5 lean on its full-resolution level;
    # one way, as measured (the symmetric level was measured on lumir only)
    as_multimodal = ["refine.intensity_weight=0", "refine.iterations=80", "refine.learning_rate=1.0",
                     "refine.symmetric=false"]
    assert multimodal.refine == load_config("lumir", as_multimodal).refine
    # without intensity terms there is nothing to guard: no threshold, and no guard stage in the program
    assert multimodal.contrast.min_ncc == -1 and lumir.contrast.min_ncc > -1
    assert "contrast" not in [s.name for s in stages(multimodal)] and "contrast" in [s.name for s in stages(lumir)]
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
    # across contrasts MIND-SSC alone must keep most of the same-contrast gain
    assert cross < zero and (zero - cross) >= 0.6 * (zero - same), (zero, same, cross)


def test_ncc_matches_numpy_inside_and_outside_a_mask():
    from jaxreg.ops.intensity import ncc
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 9, 8, 7)).astype(np.float32)
    b = 0.5 * a + b  # correlated, not identical
    mask = rng.random((9, 8, 7)) > 0.4
    np.testing.assert_allclose(float(ncc(a, b)), np.corrcoef(a.ravel(), b.ravel())[0, 1], rtol=1e-5)
    np.testing.assert_allclose(float(ncc(a, b, mask)), np.corrcoef(a[mask], b[mask])[0, 1], rtol=1e-5)
    np.testing.assert_allclose(float(ncc(a, 3 * a + 2)), 1.0, rtol=1e-5)  # a linear intensity map


def test_guard_judges_the_brain_ncc_after_the_field_against_the_threshold():
    """The guard warps the moving image through the field so far and correlates inside fixed > 0."""
    import jax.numpy as jnp
    from jaxreg.stages.contrast import judge_contrast

    def verdict(moving, disp, config):
        return judge_contrast(jnp.asarray(fixed), jnp.asarray(moving), jnp.asarray(disp), config)

    threshold_only = load_config("lumir", ["contrast.match=false", "contrast.max_match_gain=2"])
    fixed = tissues() / 255.0
    moving = np.roll(fixed, 2, axis=0)
    disp = np.zeros((3,) + fixed.shape, np.float32)
    disp[0] = 2.0  # moving(x + 2) = fixed(x) wherever the brain is: the field undoes the shift
    aligned = verdict(moving, disp, threshold_only)
    assert bool(aligned.use_intensity) and float(aligned.ncc) == pytest.approx(1.0, abs=1e-5)
    assert float(verdict(moving, 0 * disp, threshold_only).ncc) < 0.99  # judged after the field, not before
    other = np.where(moving > 0, 1.0 - moving, 0.0)  # an inverted contrast
    inverted = verdict(other, disp, threshold_only)
    assert not bool(inverted.use_intensity) and float(inverted.ncc) < threshold_only.contrast.min_ncc
    assert np.isnan(float(inverted.match_gain))  # the map is not built when nothing needs it
    # without intensity terms, or with neither threshold, nothing is judged
    for config in (load_config("lumir-multimodal"), load_config("lumir", ["contrast.min_ncc=-1", "contrast.max_match_gain=2"])):
        unjudged = verdict(other, disp, config)
        assert bool(unjudged.use_intensity) and np.isnan(float(unjudged.ncc))


def test_the_old_guard_key_names_its_new_place():
    with pytest.raises(ConfigError, match=r"'refine.intensity_min_ncc' is now 'contrast.min_ncc'"):
        load_config("lumir", ["refine.intensity_min_ncc=0.3"])
    with pytest.raises(ConfigError, match="contrast.min_ncc must be in"):
        load_config("lumir", ["contrast.min_ncc=2"])
    assert RegistrationConfig().contrast.min_ncc == -1  # no guard unless a preset asks
