"""The same-contrast guard: whether the intensity terms may be used on this pair (``[contrast]``).

The intensity SSD channel of the feature level and the full-resolution level assume that fixed and
moving share one contrast. MIND-SSC, which the coarse search matches, is blind to contrast; so after
that search the fixed and moved images are correlated inside the fixed brain, and the intensity terms
are used only if they agree by at least ``contrast.min_ncc``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..config import RegistrationConfig
from ..ops.intensity import ncc
from ..ops.warp import warp


def guards(config: RegistrationConfig) -> bool:
    """Whether `config` has intensity terms and a threshold to guard them with."""
    return config.uses_intensity_terms and config.contrast.min_ncc > -1


def contrasts_agree(fixed_n: jnp.ndarray, moving_n: jnp.ndarray, disp: jnp.ndarray, config: RegistrationConfig):
    """(brain NCC of fixed and moved, whether the intensity terms may be used), `fixed_n` and
    `moving_n` normalised to [0, 1], `disp` the field so far. Without a guard (:func:`guards`) the NCC
    is NaN and the terms are used."""
    if not guards(config):
        return jnp.float32(jnp.nan), jnp.bool_(True)
    agreement = ncc(fixed_n, warp(moving_n, disp), fixed_n > 0)
    return agreement, agreement >= config.contrast.min_ncc
