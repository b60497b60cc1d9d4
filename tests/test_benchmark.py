"""`jaxreg benchmark` on a small synthetic pair: every figure is produced and sane."""

import nibabel as nib
import numpy as np

from jaxreg.benchmark import refine_step_bytes, run_benchmark
from jaxreg.config import load_config

from synthetic import brain, pull, smooth_field


def test_benchmark_reports_compile_stages_memory_and_bandwidth(tmp_path):
    fixed = brain()
    for name, data in [("f", fixed), ("m", pull(fixed, smooth_field()))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    config = load_config("convexadam-lumir", ["refine.iterations=30"])  # the program test_pipeline compiles
    report = run_benchmark(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", config, repeats=1)
    assert report.shape == fixed.shape and len(report.total_seconds) == 1
    assert report.peak_memory_gb > 0 and report.bandwidth_gbps > 0.1
    assert [name.split(" ")[0] for name in report.stages] == ["features", "coarse", "refinement"]
    # the floor is the bytes of 30 steps over the measured bandwidth
    cells = (fixed.shape[0] // 2) * (fixed.shape[1] // 2) * (fixed.shape[2] // 2)
    expected = 30 * refine_step_bytes(cells, 12) / (report.bandwidth_gbps * 1e9)
    assert abs(report.refine_floor_seconds - expected) < 1e-9


def test_refine_step_bytes_counts_floats_per_cell():
    assert refine_step_bytes(1, 12) == 4 * (24 + 39)
