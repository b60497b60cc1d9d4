"""A stand-in for another MR contrast: a fixed non-monotonic remap of T1 intensities.

LUMIR25 registers T2- and FLAIR-like images to T1. To check that a preset keeps working across
contrasts without such data, the moving T1 is remapped by :func:`contrast_curve`, a bump on the
brain-normalised intensity: grey matter (middle of the T1 range) becomes the brightest tissue,
white matter (top of the range) falls back to about a quarter of it and CSF (bottom) stays dark,
the ordering of FLAIR. Because the curve goes up and then down, no monotonic rescaling of the
remapped image gives the T1 back: an intensity SSD term sees the wrong tissue differences, while
MIND-SSC (local self-similarity) still sees the same boundaries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CURVE_CENTRE", "CURVE_WIDTH", "contrast_curve", "remap_contrast"]

#: Where the bump peaks and how wide it is, in brain-normalised T1 intensity (0 = 1st, 1 = 99th
#: percentile inside the brain). On OASIS in LUMIR geometry cortex has its median at 0.53, white
#: matter peaks near 0.9 and CSF lies below 0.2.
CURVE_CENTRE = 0.5
CURVE_WIDTH = 0.25
_SLOPE = 0.25  # a small rising term keeps white matter above CSF, as in FLAIR


def contrast_curve(t: np.ndarray) -> np.ndarray:
    """The fixed non-monotonic curve on [0, 1] -> [0, 1]: ``exp(-((t - 0.5) / 0.25)^2) + 0.25 t``, scaled
    so its peak is 1 (CSF ~0.09, grey matter 1, white matter ~0.27)."""
    t = np.asarray(t, np.float64)
    grid = np.linspace(0.0, 1.0, 1001)
    peak = np.max(np.exp(-((grid - CURVE_CENTRE) / CURVE_WIDTH) ** 2) + _SLOPE * grid)
    return (np.exp(-((t - CURVE_CENTRE) / CURVE_WIDTH) ** 2) + _SLOPE * t) / peak


def remap_contrast(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Remap a T1 image to a FLAIR-like contrast: float32, brain in [0, 255], background 0.

    Arguments:
        image: 3-D T1 volume (any intensity scale).
        mask: brain mask; default ``image > 0`` (LUMIR images are skull-stripped, background 0).

    Intensities are normalised within the mask by its 1st and 99th percentiles (clipped to
    [0, 1]), passed through :func:`contrast_curve` and scaled to 0..255; voxels outside the mask
    are 0. Labels and geometry are untouched, so a remapped image keeps its subject's label maps.
    """
    image = np.asarray(image, np.float32)
    mask = image > 0 if mask is None else np.asarray(mask, bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask has shape {mask.shape} but the image has {image.shape}")
    out = np.zeros(image.shape, np.float32)
    if not mask.any():
        return out
    low, high = np.percentile(image[mask], [1, 99])
    t = np.clip((image[mask] - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    out[mask] = 255.0 * contrast_curve(t)
    return out
