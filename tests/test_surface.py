"""jaxreg.evaluation.surface against closed forms and DeepMind's ``surface-distance`` (skipped when absent)."""

import math

import numpy as np
import pytest
from scipy import ndimage

from jaxreg.evaluation import surface

from deepmind_surface import needs_surface_distance, sd_tables, surface_distance


def test_surfel_area_table_closed_forms():
    table = surface.surfel_area_table()
    assert table[0] == 0.0 and table[255] == 0.0
    assert table[1] == pytest.approx(math.sqrt(3) / 8)            # one corner: a triangle
    assert table[0b00000011] == pytest.approx(math.sqrt(2) / 2)   # two adjacent corners: a quad
    assert table[0b00001111] == pytest.approx(1.0)                # a flat face
    np.testing.assert_array_equal(table, table[::-1])             # complement symmetric
    with pytest.raises(ValueError):
        table[0] = 1.0  # shared, read-only


@needs_surface_distance
def test_surfel_area_table_equals_deepmind_table_bit_for_bit():
    np.testing.assert_array_equal(surface.surfel_area_table(),
                                  sd_tables.create_table_neighbour_code_to_surface_area((1, 1, 1)))
    for spacing in [(1.0, 2.0, 3.0), (0.7, 1.0, 1.3)]:
        np.testing.assert_allclose(surface.surfel_area_table(spacing),
                                   sd_tables.create_table_neighbour_code_to_surface_area(spacing), rtol=1e-15)


@needs_surface_distance
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 0.8, 1.5)])
def test_robust_hausdorff_equals_deepmind_on_random_blobs(spacing):
    rng = np.random.default_rng(5)
    compared = 0
    for _ in range(25):
        a = ndimage.gaussian_filter(rng.random((18, 22, 16)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((18, 22, 16)), 2) > 0.5
        if not a.any() or not b.any():  # the PyPI package uses np.Inf there, gone in NumPy 2
            continue
        for percent in (95.0, 100.0):
            expected = surface_distance.compute_robust_hausdorff(
                surface_distance.compute_surface_distances(a, b, spacing), percent)
            assert surface.robust_hausdorff(a, b, percent, spacing) == expected
        compared += 1
    assert compared >= 20


def outer_layer_masks(rng, shape=(14, 16, 12)):
    """Two random masks that both fill the volume's outer voxel layer, like background 0 of a scan."""
    masks = []
    for _ in range(2):
        mask = ndimage.gaussian_filter(rng.random(shape), 1.5) < 0.52
        mask[[0, -1]] = True
        mask[:, [0, -1]] = True
        mask[:, :, [0, -1]] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.3, 0.7, 1.1)])
def test_outer_layer_shortcut_equals_the_general_path(spacing):
    rng = np.random.default_rng(12)
    for trial in range(20):
        a, b = outer_layer_masks(rng)
        if trial == 0:
            a[1:-1, 1:-1, 1:-1] = True  # no inner surface at all in a
        for percent in (50.0, 95.0, 100.0):
            general = surface._robust_hausdorff_cropped(np.pad(a, 1), np.pad(b, 1), percent, spacing)
            assert surface.robust_hausdorff(a, b, percent, spacing) == general


@needs_surface_distance
def test_outer_layer_shortcut_equals_deepmind():
    rng = np.random.default_rng(13)
    for _ in range(10):
        a, b = outer_layer_masks(rng)
        for spacing in [(1.0, 1.0, 1.0), (1.3, 0.7, 1.1)]:
            expected = surface_distance.compute_robust_hausdorff(
                surface_distance.compute_surface_distances(a, b, spacing), 95.0)
            assert surface.robust_hausdorff(a, b, 95.0, spacing) == expected
