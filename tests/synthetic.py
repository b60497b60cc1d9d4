"""Small synthetic brains and deformations with known answers, shared by the engine tests."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE = (40, 48, 44)


def brain(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A smooth textured blob inside an ellipsoid, intensities in [0, 255] like LUMIR images."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.random(shape), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    mask = (grid ** 2 / np.array([0.8, 0.8, 0.8]).reshape(3, 1, 1, 1) ** 2).sum(0) < 1
    image = 255 * (0.3 + 0.7 * texture) * mask
    return ndimage.gaussian_filter(image, 0.7).astype(np.float32)


def smooth_field(shape=SHAPE, amplitude: float = 2.0, seed: int = 1, sigma: float = 5.0) -> np.ndarray:
    """A smooth random displacement (3, X, Y, Z) with max |component| = amplitude voxels."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
    return (amplitude * field / np.abs(field).max()).astype(np.float32)


def pull(volume: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """scipy reference of the LUMIR convention: volume(x + disp(x))."""
    grid = np.indices(volume.shape, dtype=np.float32)
    return ndimage.map_coordinates(volume, grid + disp, order=order, mode="nearest")


def inverse_of(disp: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Displacement of the inverse map by fixed-point iteration: v(x) = -disp(x + v(x))."""
    inverse = -disp.copy()
    grid = np.indices(disp.shape[1:], dtype=np.float32)
    for _ in range(iterations):
        inverse = -np.stack([ndimage.map_coordinates(disp[k], grid + inverse, order=1, mode="nearest") for k in range(3)])
    return inverse.astype(np.float32)
