"""Speed and memory of one full-size registration: compile time, time per stage, total, peak memory.

Figures, not assertions: this is what `jaxreg benchmark` prints. The whole program runs first (so
the peak memory is that of a real registration); the per-stage breakdown then runs each stage as
its own jitted function on the same inputs, which costs a little more than inside the one program.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..stages.coarse import coarse_search
from ..config import RegistrationConfig
from ..stages.features import mind_ssc_pooled
from ..io import load_volume
from ..compilation import compiled_batched_program, compiled_program
from ..pipeline import normalise, refinement_features
from ..registration import check_pair
from ..stages.refine import refine, refine_fine
from ..stages.unfold import unfold
from ..ops.warp import resize


@dataclass
class BenchmarkReport:
    """Seconds per item; ``stages`` maps stage name -> seconds (median of repeats)."""

    shape: tuple
    preset: str
    compile_seconds: float
    total_seconds: list
    peak_memory_gb: float
    stages: dict = field(default_factory=dict)
    device: str = ""
    bandwidth_gbps: float | None = None
    refine_floor_seconds: float | None = None
    refine_seconds: float | None = None
    fine_floor_seconds: float | None = None
    fine_seconds: float | None = None
    device_peak_gb: float | None = None


# Floats a refinement step must move per cell at the very least, if every pass were fused and each
# moving feature row were read once (neighbouring cells share trilinear corners): the fixed and the
# moving features (2C), the displacement in and its gradient out (6), the smoothing forward and
# backward (2 x 6) and Adam's read of params, m, v, gradient and write of params, m, v (21).
def refine_step_bytes(cells: int, channels: int) -> int:
    """Lower bound of the bytes one refinement step moves through memory (float32)."""
    return 4 * cells * (2 * channels + 6 + 12 + 21)


def fine_step_bytes(voxels: int, local_ncc: bool = False) -> int:
    """Lower bound of the bytes one full-resolution step moves: a refinement step on one channel (the
    intensities), the read of the feature level's field that the residual is added to (3) and, with
    the local NCC, of the fixed image's local mean and variance (2; its box filters can stream)."""
    return refine_step_bytes(voxels, 1) + 4 * voxels * (3 + (2 if local_ncc else 0))


def memory_bandwidth_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Achieved read+write bandwidth of elementwise passes over a large buffer (GB/s).

    The passes run in a loop inside one program, updating the buffer in place: a fresh output
    buffer per call would time the page faults of the allocation instead of the memory.
    """
    passes = 10
    x = jnp.ones(megabytes * 2**20 // 4, jnp.float32)
    scale = jax.jit(lambda v: jax.lax.fori_loop(0, passes, lambda _, w: w * 1.0001, v))
    seconds = _timed(scale, x, repeats=repeats)
    return passes * 2 * x.size * 4 / seconds / 1e9


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_memory_gb() -> float | None:
    """Peak memory the accelerator's allocator has held (None on CPU, where RSS says it all)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _timed(fn, *args, repeats: int = 1, reduce=np.median) -> float:
    """Median (or `reduce`) of the wall times of `repeats` calls after one warm-up call (which compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(reduce(times))


def run_benchmark(fixed_path, moving_path, config: RegistrationConfig, *, repeats: int = 2,
                  stages: bool = True, progress=lambda message: None) -> BenchmarkReport:
    """Time the whole registration program, then (optionally) each stage on its own."""
    fixed, _ = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    check_pair(fixed, moving)
    progress("compiling the registration program")
    executable, compile_seconds = compiled_program(config, fixed.shape, False)
    f, m = jnp.asarray(fixed), jnp.asarray(moving)
    totals = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(executable(f, m, None))
        totals.append(time.perf_counter() - start)
        progress(f"run {i + 1}/{repeats}: {totals[-1]:.1f} s")
    report = BenchmarkReport(shape=fixed.shape, preset=config.name, compile_seconds=compile_seconds,
                             total_seconds=totals, peak_memory_gb=peak_memory_gb(), device=str(jax.devices()[0]),
                             device_peak_gb=device_peak_memory_gb())
    if not stages:
        return report

    progress("timing stages one by one")
    fn, mn = normalise(f), normalise(m)
    radius, dilation = config.features.radius, config.features.dilation
    spacing = config.coarse.grid_spacing if config.coarse.enabled else config.refine.grid_spacing
    features = jax.jit(lambda x: mind_ssc_pooled(x, radius, dilation, spacing))
    report.stages["features (MIND-SSC, one image, pooled)"] = _timed(features, fn)
    fixed_cells, moving_cells = features(fn), features(mn)
    disp = jnp.zeros((3,) + fixed.shape, jnp.float32)
    refine_bytes = fine_bytes = 0  # the least bytes the two Adam levels must move
    if config.coarse.enabled:
        coarse = jax.jit(lambda a, b: resize(coarse_search(a, b, config.coarse), fixed.shape))
        report.stages["coarse search (+ upsample)"] = _timed(coarse, fixed_cells, moving_cells)
        disp = coarse(fixed_cells, moving_cells)
    if config.refine.enabled and config.refine.iterations > 0:
        stack = jax.jit(lambda x: refinement_features(x, config))  # one compile serves both images
        fixed_f, moving_f = stack(fn), stack(mn)
        refiner = jax.jit(lambda a, b, d: refine(a, b, d, config.refine)[0])
        seconds = _timed(refiner, fixed_f, moving_f, disp)
        report.stages[f"refinement ({config.refine.iterations} Adam steps)"] = seconds
        disp = refiner(fixed_f, moving_f, disp)
        report.refine_seconds = seconds
        cells = int(np.prod(fixed_f.shape[1:]))
        refine_bytes = config.refine.iterations * refine_step_bytes(cells, fixed_f.shape[0])
    if config.fine.enabled and config.fine.iterations > 0:
        fine = jax.jit(lambda a, b, d: refine_fine(a, b, d, config.fine))
        report.fine_seconds = _timed(fine, fn, mn, disp)
        report.stages[f"full-resolution level ({config.fine.iterations} Adam steps)"] = report.fine_seconds
        disp = fine(fn, mn, disp)
        fine_bytes = config.fine.iterations * fine_step_bytes(int(np.prod(fixed.shape)), config.fine.ncc_weight > 0)
    if report.refine_seconds is not None or report.fine_seconds is not None:
        progress("measuring memory bandwidth")
        report.bandwidth_gbps = memory_bandwidth_gbps()
        if report.refine_seconds is not None:
            report.refine_floor_seconds = refine_bytes / (report.bandwidth_gbps * 1e9)
        if report.fine_seconds is not None:
            report.fine_floor_seconds = fine_bytes / (report.bandwidth_gbps * 1e9)
    if config.unfold.rounds > 0:
        repair = jax.jit(lambda d: unfold(d, config.unfold)[0])
        report.stages["fold repair"] = _timed(repair, disp)
    return report


def alternate_presets(fixed: np.ndarray, moving: np.ndarray, configs, *, repeats: int = 3) -> list[list[float]]:
    """Seconds per pair of each of `configs` on one pair, the runs alternated in one process (A, B, A,
    B, ...) after one warm-up run each. A shared machine drifts by 10-20 % between separate runs; here
    every program meets the same drift, so the ratio of the bests is the steadier figure."""
    f, m = jnp.asarray(fixed), jnp.asarray(moving)
    programs = [compiled_program(config, fixed.shape, False)[0] for config in configs]
    for program in programs:
        jax.block_until_ready(program(f, m, None))
    seconds = [[] for _ in programs]
    for _ in range(repeats):
        for program, times in zip(programs, seconds):
            start = time.perf_counter()
            jax.block_until_ready(program(f, m, None))
            times.append(time.perf_counter() - start)
    return seconds


@dataclass
class ThroughputRow:
    """Pairs registered at once by one vmapped program, and what it cost."""

    pairs: int
    compile_seconds: float
    seconds: float  # best of the repeats, for all `pairs` together

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds


def run_throughput(fixed: np.ndarray, moving: np.ndarray, config: RegistrationConfig, group_sizes=(1, 2, 4, 8),
                   *, repeats: int = 3, progress=lambda message: None) -> list[ThroughputRow]:
    """Pairs per second when B copies of the pair go through one vmapped program, for each B.

    Worth it on an accelerator, where one pair leaves the device partly idle; on CPU the cores are
    already busy with one pair and B pairs need B times the memory.
    """
    rows = []
    for pairs in group_sizes:
        progress(f"{pairs} pair(s) at once: compiling")
        executable, compile_seconds = compiled_batched_program(config, fixed.shape, pairs)
        f = jnp.broadcast_to(jnp.asarray(fixed), (pairs,) + fixed.shape)
        m = jnp.broadcast_to(jnp.asarray(moving), (pairs,) + moving.shape)
        f, m = jnp.array(f), jnp.array(m)  # own buffers, as real stacks would be
        rows.append(ThroughputRow(pairs, compile_seconds, _timed(executable, f, m, repeats=repeats, reduce=min)))
        progress(f"{pairs} pair(s) at once: {rows[-1].seconds:.3f} s, {rows[-1].pairs_per_second:.2f} pairs/s")
    return rows


@dataclass
class ScalingRow:
    """`pairs` registrations of one grid size, one after the other in one process."""

    shape: tuple
    pairs: int
    seconds: float

    @property
    def seconds_per_pair(self) -> float:
        return self.seconds / self.pairs


def half_size(image: np.ndarray) -> np.ndarray:
    """The image on a grid with half as many voxels per axis (2x2x2 block means)."""
    x, y, z = (n // 2 * 2 for n in image.shape)
    return image[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def run_scaling(fixed: np.ndarray, moving: np.ndarray, config: RegistrationConfig, counts=(1, 4, 16),
                *, progress=lambda message: None) -> list[ScalingRow]:
    """Wall time of 1, 4, 16 ... pairs registered one after the other (after compilation), at half
    and at full size: cost should grow linearly with the pairs and at most linearly with the voxels."""
    rows = []
    for f, m in ((half_size(fixed), half_size(moving)), (fixed, moving)):
        executable, _ = compiled_program(config, f.shape, False)
        f, m = jnp.asarray(f), jnp.asarray(m)
        jax.block_until_ready(executable(f, m, None))
        for pairs in counts:
            start = time.perf_counter()
            for _ in range(pairs):
                jax.block_until_ready(executable(f, m, None))
            rows.append(ScalingRow(tuple(f.shape), pairs, time.perf_counter() - start))
            progress(f"{f.shape}: {pairs} pair(s) in {rows[-1].seconds:.1f} s")
    return rows
