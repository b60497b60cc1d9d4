"""The contrast guard (``[contrast]``): whether the intensity terms may run on this pair as it is,
on the moving image mapped into the fixed contrast, or not at all.

The intensity SSD channel of the feature level and the full-resolution level assume that fixed and
moving share one contrast. MIND-SSC, which the coarse search matches, is blind to contrast; so after
that search the fixed and moved images are compared inside the fixed brain: their NCC, and how much
a non-linear intensity map (the mean fixed intensity per moved intensity and local mean intensity)
raises it. Two images of
one contrast agree linearly; a T2w- or FLAIR-like moving image needs the map. Where the contrasts
differ, ``contrast.match`` keeps the intensity terms on the mapped moving image; otherwise they go.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp

from ..config import RegistrationConfig
from ..ops.filters import box_filter
from ..ops.intensity import apply_table, intensity_table, ncc
from ..ops.warp import warp


class ContrastVerdict(NamedTuple):
    """What the guard found (arrays, so it can run inside the program)."""

    ncc: jnp.ndarray  # brain NCC of fixed and moved
    match_gain: jnp.ndarray  # how much the intensity map raises it (NaN where the map is not built)
    differ: jnp.ndarray  # whether the contrasts differ
    use_intensity: jnp.ndarray  # whether the intensity terms run
    moving: jnp.ndarray  # the moving image the intensity terms see: as it is, or mapped where they differ


def guards(config: RegistrationConfig) -> bool:
    """Whether `config` has intensity terms and a way of finding that the contrasts differ."""
    return config.uses_intensity_terms and config.contrast.judges


def judge_contrast(fixed_n: jnp.ndarray, moving_n: jnp.ndarray, disp: jnp.ndarray,
                   config: RegistrationConfig) -> ContrastVerdict:
    """The guard's verdict on `moving_n` pulled through `disp` (the field so far) against `fixed_n`,
    both normalised to [0, 1]. Without a guard (:func:`guards`) the figures are NaN and the
    intensity terms run on `moving_n`."""
    nan = jnp.float32(jnp.nan)
    if not guards(config):
        return ContrastVerdict(nan, nan, jnp.bool_(False), jnp.bool_(True), moving_n)
    contrast = config.contrast
    mask = fixed_n > 0
    moved = warp(moving_n, disp)
    agreement = ncc(fixed_n, moved, mask)
    differ = agreement < contrast.min_ncc
    if contrast.assume == "different":
        differ = jnp.bool_(True)
    if not (contrast.match or contrast.max_match_gain < 2):
        return ContrastVerdict(agreement, nan, differ, ~differ, moving_n)
    keys = functools.partial(_table_keys, width=contrast.match_context)
    moved_keys = keys(moved)
    shape = (contrast.match_bins,) + ((CONTEXT_BINS,) if contrast.match_context > 1 else ())
    sample = (slice(None, None, TABLE_STRIDE),) * 3
    table = intensity_table([key[sample] for key in moved_keys], fixed_n[sample], mask[sample], shape)
    gain = ncc(fixed_n, apply_table(moved_keys, table), mask) - agreement
    differ = differ | (gain >= contrast.max_match_gain)
    if not contrast.match:
        return ContrastVerdict(agreement, gain, differ, ~differ, moving_n)
    return ContrastVerdict(agreement, gain, differ, jnp.bool_(True),
                           jnp.where(differ, apply_table(keys(moving_n), table), moving_n))


CONTEXT_BINS = 16  # entries of the table's local-mean axis: a coarser key than the intensity itself
# the table is filled from every TABLE_STRIDE-th voxel along each axis: an eighth of a brain still
# gives its few hundred entries thousands of voxels each, and the scatter-adds cost an eighth
TABLE_STRIDE = 2


def _table_keys(image: jnp.ndarray, width: int) -> tuple[jnp.ndarray, ...]:
    """What the intensity map looks up: the intensity and, with `width` > 1, its local mean over a
    `width`^3 box, which tells a partial volume between two tissues from a third tissue of the same
    intensity (CSF next to GM against WM in FLAIR)."""
    return (image,) if width == 1 else (image, box_filter(image, width, mode="edge"))
