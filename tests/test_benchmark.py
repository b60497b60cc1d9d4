"""`jaxreg benchmark` on a small synthetic pair: every figure is produced and sane."""

import nibabel as nib
import numpy as np
import pytest

from jaxreg.apps.benchmark import fine_step_bytes, refine_step_bytes, run_benchmark
from jaxreg.config import load_config
from jaxreg.pipeline import stages

from synthetic import brain, pull, smooth_field


def test_benchmark_reports_compile_stages_memory_and_bandwidth(tmp_path):
    fixed = brain()
    for name, data in [("f", fixed), ("m", pull(fixed, smooth_field()))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    config = load_config("convexadam-lumir", ["refine.iterations=30"])  # the program test_pipeline compiles
    report = run_benchmark(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", config, repeats=1)
    assert report.shape == fixed.shape and len(report.total_seconds) == 1
    assert report.peak_memory_gb > 0 and report.bandwidth_gbps > 0.1
    assert [name.split(" ")[0] for name in report.stages] == ["start", "features", "coarse", "refine", "finish", "report"]
    assert report.stages_seconds == sum(report.stages.values()) and report.fine_seconds is None
    assert report.median_seconds == report.total_seconds[0]
    # the floor is the bytes of 30 steps over the measured bandwidth
    cells = (fixed.shape[0] // 2) * (fixed.shape[1] // 2) * (fixed.shape[2] // 2)
    expected = 30 * refine_step_bytes(cells, 12) / (report.bandwidth_gbps * 1e9)
    assert abs(report.refine_floor_seconds - expected) < 1e-9


@pytest.mark.slow
def test_benchmark_times_the_full_resolution_level_and_the_fold_repair(tmp_path):
    fixed = brain()
    for name, data in [("f", fixed), ("m", pull(fixed, smooth_field()))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    config = load_config("lumir", ["refine.iterations=5", "fine.half_resolution_iterations=2", "fine.iterations=3",
                                   "unfold.rounds=2"])
    report = run_benchmark(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", config, repeats=1)
    # exactly the program's stages, the same-contrast guard included, between start and finish, then the report
    assert [name.split(" ")[0] for name in report.stages] == ["start", *(s.name for s in stages(config)), "finish", "report"]
    assert [name.split(" ")[0] for name in report.stages] == [
        "start", "features", "coarse", "contrast", "refine", "fine", "unfold", "finish", "report"]
    assert all(seconds > 0 for seconds in report.stages.values())
    # the refinement is timed on the features the program uses: MIND-SSC plus the intensity channel
    cells = (fixed.shape[0] // 2) * (fixed.shape[1] // 2) * (fixed.shape[2] // 2)
    assert abs(report.refine_floor_seconds - 5 * refine_step_bytes(cells, 13) / (report.bandwidth_gbps * 1e9)) < 1e-9
    # the full-resolution level's floor: 3 steps over every voxel and 2 over the voxels pooled by 2, with
    # lumir's local NCC
    voxels = fixed.shape[0] * fixed.shape[1] * fixed.shape[2]
    pooled = (fixed.shape[0] // 2) * (fixed.shape[1] // 2) * (fixed.shape[2] // 2)
    floor = (3 * fine_step_bytes(voxels, local_ncc=True) + 2 * fine_step_bytes(pooled, local_ncc=True)) \
        / (report.bandwidth_gbps * 1e9)
    assert abs(report.fine_floor_seconds - floor) < 1e-9
    assert report.fine_seconds == report.stages[
        "fine (full-resolution level, 2 at half resolution, then 3 Adam steps (4 Adam steps on a moving image "
        "mapped into the fixed contrast))"]


def test_refine_step_bytes_counts_floats_per_cell():
    assert refine_step_bytes(1, 12) == 4 * (24 + 39)
    assert fine_step_bytes(1) == 4 * (2 + 39 + 3)  # one channel, plus the field the residual is added to
    assert fine_step_bytes(1, local_ncc=True) == 4 * (2 + 39 + 3 + 2)  # and the fixed local mean, variance


def test_vmapped_program_registers_each_pair_as_the_single_pair_program_does():
    import jax.numpy as jnp

    from jaxreg.compilation import compiled_batched_program, compiled_program

    fixed = brain()
    movings = [pull(fixed, smooth_field(seed=seed)) for seed in (1, 2)]
    config = load_config("convexadam-lumir", ["refine.iterations=30"])
    single, _ = compiled_program(config, fixed.shape, False)
    batched, _ = compiled_batched_program(config, fixed.shape, 2)
    out = batched(jnp.stack([fixed, fixed]), jnp.stack(movings))
    for i, moving in enumerate(movings):
        expected = np.asarray(single(jnp.asarray(fixed), jnp.asarray(moving), None).disp)
        np.testing.assert_allclose(np.asarray(out.disp[i]), expected, atol=2e-3)
    assert not np.allclose(out.disp[0], out.disp[1], atol=0.05)  # two different answers


def test_throughput_and_scaling_rows_count_pairs_and_halve_the_grid():
    from jaxreg.apps.benchmark import half_size, run_scaling, run_throughput

    fixed = brain()
    moving = pull(fixed, smooth_field())
    config = load_config("convexadam-lumir", ["refine.iterations=30"])
    rows = run_throughput(fixed, moving, config, (2,), repeats=1)  # the program compiled above
    assert [r.pairs for r in rows] == [2] and rows[0].seconds > 0
    assert rows[0].pairs_per_second == 2 / rows[0].seconds
    scaling = run_scaling(fixed, moving, config, counts=(1, 2))
    half = tuple(n // 2 for n in fixed.shape)
    assert [(r.shape, r.pairs) for r in scaling] == [(half, 1), (half, 2), (fixed.shape, 1), (fixed.shape, 2)]
    block = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert half_size(block).shape == (1, 1, 1) and half_size(block)[0, 0, 0] == 3.5


def test_reference_timing_needs_an_environment_with_convexadam(tmp_path):
    import sys


    from jaxreg.errors import InputError
    from jaxreg.apps.reference import time_reference

    with pytest.raises(InputError, match="not found"):
        time_reference(tmp_path / "no-python", "f.nii.gz", "m.nii.gz")
    with pytest.raises(InputError, match="pip install convexadam torch"):  # this environment has no convexadam
        time_reference(sys.executable, "f.nii.gz", "m.nii.gz")


def test_throughput_beyond_the_free_memory_is_refused_in_one_line(tmp_path, capsys):
    import jax

    from jaxreg.cli.main import main

    if jax.default_backend() != "cpu":
        pytest.skip("the memory guard is for CPU runs (the accelerator's allocator reports its own limit)")
    fixed = brain()
    for name, data in [("f", fixed), ("m", pull(fixed, smooth_field()))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    code = main(["benchmark", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--preset", "convexadam-lumir",
                 "--set", "refine.iterations=30", "--repeats", "1", "--no-stages", "--throughput", "1000000"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --throughput 1000000 needs about" in err and err.count("error") == 1


def test_against_times_two_presets_alternately_and_prints_their_ratio(tmp_path, capsys):
    import re

    from jaxreg.cli.main import main

    fixed = brain()
    for name, data in [("f", fixed), ("m", pull(fixed, smooth_field()))]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    args = ["benchmark", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--preset", "convexadam-lumir",
            "--set", "refine.iterations=30", "--repeats", "1", "--no-stages"]
    # an unknown preset is refused before any timing
    assert main(args + ["--against", "no-such-preset"]) == 2
    assert "per pair" not in capsys.readouterr().out
    assert main(args + ["--against", "fast"]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("alternated")][0]
    mine, theirs, ratio = (float(x) for x in re.search(r"([\d.]+) s, fast ([\d.]+) s .*: ([\d.]+)x", line).groups())
    assert "best of 3" in line and mine > 0 and theirs > 0
    # the ratio of the printed times, up to their rounding (0.0005 s each) and the ratio's (0.005)
    assert abs(ratio - mine / theirs) <= mine / theirs * (0.0005 / mine + 0.0005 / theirs) + 0.005
