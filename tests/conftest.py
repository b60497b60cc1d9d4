"""What every test module shares: the benchmark data's place and the one rule that skips tests needing it.

Tests that read ``../shared/data`` carry the ``benchmark_data`` marker; where the data is absent they
are skipped here, with the path in the reason, instead of each module repeating its own condition.
Tiers: ``-m "not slow"`` is the quick tier of unit tests; ``slow`` marks real-size runs and the few
tests that spend many seconds compiling or starting processes.
"""

from __future__ import annotations

import pytest

from data_paths import OASIS, benchmark_data_missing


def pytest_collection_modifyitems(config, items):
    missing = benchmark_data_missing()
    if not missing:
        return
    skip = pytest.mark.skip(reason=missing)
    for item in items:
        if "benchmark_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def oasis_dir():
    """The OASIS-TRT-20 benchmark folder (tests using it are marked ``benchmark_data``)."""
    return OASIS
