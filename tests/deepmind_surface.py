"""DeepMind's ``surface-distance`` (the code LUMIR vendors for HD95), the independent reference of the
surface-distance tests, when it is installed and works with this NumPy/SciPy."""

import warnings

import numpy as np
import pytest


def _deepmind_package():
    """DeepMind's ``surface-distance`` (the code LUMIR vendors) if installed and working, and why not."""
    try:
        import surface_distance
        from surface_distance import lookup_tables
    except ImportError:
        return None, None, "the PyPI package 'surface-distance' (DeepMind) is not installed: pip install surface-distance"
    try:
        probe = np.zeros((3, 3, 3), bool)
        probe[1, 1, 1] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            surface_distance.compute_surface_distances(probe, probe, (1.0, 1.0, 1.0))
    except Exception as err:  # e.g. a future SciPy without the ndimage.filters namespace it uses
        return None, None, f"'surface-distance' is installed but fails with this NumPy/SciPy ({type(err).__name__}: {err})"
    return surface_distance, lookup_tables, ""


surface_distance, sd_tables, _WHY_NO_DEEPMIND = _deepmind_package()


def needs_surface_distance(test):
    """Skip without DeepMind's package; silence its own use of scipy's deprecated namespaces."""
    test = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")(test)
    return pytest.mark.skipif(surface_distance is None, reason=_WHY_NO_DEEPMIND)(test)
