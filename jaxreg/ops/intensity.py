"""Intensity operations on whole images: rescaling to [0, 1] and the normalised cross-correlation."""

from __future__ import annotations

import jax.numpy as jnp


def normalise(image: jnp.ndarray) -> jnp.ndarray:
    """Rescale intensities to [0, 1] (min -> 0, max -> 1); a constant image becomes all zeros."""
    low, high = image.min(), image.max()
    return (image - low) / jnp.maximum(high - low, 1e-6)


def ncc(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Normalised cross-correlation (1 = identical up to a linear intensity map), over `mask` if given."""
    weight = jnp.ones_like(a) if mask is None else mask.astype(a.dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    a = (a - jnp.sum(a * weight) / count) * weight
    b = (b - jnp.sum(b * weight) / count) * weight
    return jnp.sum(a * b) / jnp.maximum(jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)), 1e-12)
