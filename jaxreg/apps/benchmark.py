"""Speed and memory of one full-size registration: compile time, time per stage, total, peak memory.

Figures, not assertions: this is what `jaxreg benchmark` prints. The whole program runs as
:func:`jaxreg.registration.run_program` runs it for `register`, so its time is the time `register`
reports and the peak memory that of a real registration. The per-stage breakdown times the very
pieces that program is made of (:func:`jaxreg.pipeline.start`, each stage of
:func:`jaxreg.pipeline.stages`, :func:`jaxreg.pipeline.finish`, then the report program
:func:`jaxreg.pipeline.report`), each compiled alone and applied in
sequence, so the rows add up to about the whole; what the one program saves by fusing across stage
boundaries shows as the difference.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .. import pipeline
from ..compilation import compiled_batched_program, compiled_program, device_name
from ..xla_options import compile_jitted
from ..config import RegistrationConfig
from ..io import load_volume
from ..registration import check_pair, run_program
from ..stages.features import mind_pairs


@dataclass
class BenchmarkReport:
    """Seconds per item. ``total_seconds``: one per timed run of the whole program, as `register`
    reports it; ``stages`` maps a row (stage name, then what it does) -> seconds, median of repeats,
    in program order from ``start`` to ``finish``."""

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

    @property
    def median_seconds(self) -> float:
        """The median of the whole program's runs, to set beside :attr:`stages_seconds` (medians too)."""
        return float(np.median(self.total_seconds))

    @property
    def stages_seconds(self) -> float:
        """The sum of the stage rows: the program's time, less what fusing across stages saves."""
        return float(sum(self.stages.values()))


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


def _compiled_pieces(shape: tuple, config: RegistrationConfig) -> list:
    """(row label, executable) of each piece of the program in order: :func:`pipeline.start`, every
    stage of :func:`pipeline.stages`, :func:`pipeline.finish`; each compiled alone, with the
    program's compiler options, for the state the piece before hands on; then the report program."""
    image = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    field = jax.ShapeDtypeStruct((3,) + tuple(shape), jnp.float32)

    def start(fixed, moving):
        return pipeline.start(fixed, moving, None)

    pieces = [("start (inputs to the device, normalised)", compile_jitted(jax.jit(start), image, image))]
    state = jax.eval_shape(start, image, image)
    # each stage takes over the state it is handed (donated), as inside the one program: the arrays
    # it passes on unchanged are not copied
    for stage in pipeline.stages(config):
        pieces.append((f"{stage.name} ({stage.description})", compile_jitted(jax.jit(stage.apply, donate_argnums=0), state)))
        state = jax.eval_shape(stage.apply, state)
    pieces.append(("finish (outputs)", compile_jitted(jax.jit(pipeline.finish), state)))
    pieces.append(("report (moved image, NCC, outputs to the host)",
                   compile_jitted(pipeline.report_program, image, image, field, None)))
    return pieces


def _run_pieces(pieces: list, fixed: np.ndarray, moving: np.ndarray) -> list[float]:
    """One registration through the pieces, each applied to the state the one before produced and
    waited for before the next starts: seconds per piece. As :func:`run_program` counts, the first
    piece includes moving the images to the device and the last moving the outputs back."""
    seconds = []
    (_, start), *stages, (_, finish), (_, report) = pieces
    begin = time.perf_counter()
    fixed, moving = jax.device_put(fixed), jax.device_put(moving)
    state = jax.block_until_ready(start(fixed, moving))
    seconds.append(time.perf_counter() - begin)
    for _, apply in stages:
        begin = time.perf_counter()
        state = jax.block_until_ready(apply(state))
        seconds.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    field = jax.block_until_ready(finish(state))
    seconds.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    jax.device_get((field, report(fixed, moving, field.disp, None)))
    seconds.append(time.perf_counter() - begin)
    return seconds


def run_benchmark(fixed_path, moving_path, config: RegistrationConfig, *, repeats: int = 2,
                  stages: bool = True, progress=lambda message: None) -> BenchmarkReport:
    """Time the whole registration program as `register` runs it and (optionally) each of its pieces
    on its own (see the module docstring), after one warm-up run of each. The timed runs alternate
    (whole program, then the pieces, and again), so a drift of a shared machine touches both alike."""
    fixed, _ = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    check_pair(fixed, moving)
    progress("compiling the registration program")
    _, compile_seconds = compiled_program(config, fixed.shape, False)
    matched = run_program(config, fixed, moving, None).summary.intensity_terms_matched
    peak_gb, device_peak_gb = peak_memory_gb(), device_peak_memory_gb()  # before any piece ran alone
    pieces = []
    if stages:
        progress("compiling its stages one by one")
        pieces = _compiled_pieces(fixed.shape, config)
        _run_pieces(pieces, fixed, moving)
    totals, rows = [], []
    for i in range(repeats):
        totals.append(run_program(config, fixed, moving, None).summary.seconds)
        if pieces:
            rows.append(_run_pieces(pieces, fixed, moving))
        progress(f"run {i + 1}/{repeats}: {totals[-1]:.1f} s" + (f", stages {sum(rows[-1]):.1f} s" if rows else ""))
    report = BenchmarkReport(shape=fixed.shape, preset=config.name, compile_seconds=compile_seconds,
                             total_seconds=totals, peak_memory_gb=peak_gb, device=device_name(),
                             device_peak_gb=device_peak_gb)
    if not pieces:
        return report

    report.stages = {label: float(np.median(column)) for (label, _), column in zip(pieces, zip(*rows))}
    by_name = {label.split(" ")[0]: seconds for label, seconds in report.stages.items()}
    report.refine_seconds, report.fine_seconds = by_name.get("refine"), by_name.get("fine")
    if report.refine_seconds is not None or report.fine_seconds is not None:
        progress("measuring memory bandwidth")
        report.bandwidth_gbps = memory_bandwidth_gbps()
        voxels = int(np.prod(fixed.shape))
        if report.refine_seconds is not None:
            cells = int(np.prod([n // config.refine.grid_spacing for n in fixed.shape]))
            channels = len(mind_pairs(config.features.dilation)) + (config.refine.intensity_weight > 0)
            refine_bytes = config.refine.iterations * refine_step_bytes(cells, channels)
            report.refine_floor_seconds = refine_bytes / (report.bandwidth_gbps * 1e9)
        if report.fine_seconds is not None:
            fine = config.fine_when_mapped if matched else config.fine  # the steps this pair got
            pooled = int(np.prod([n // 2 for n in fixed.shape]))  # the half-resolution steps' grid
            fine_bytes = (fine.iterations * fine_step_bytes(voxels, fine.ncc_weight > 0)
                          + fine.half_resolution_iterations * fine_step_bytes(pooled, fine.ncc_weight > 0))
            report.fine_floor_seconds = fine_bytes / (report.bandwidth_gbps * 1e9)
    return report


def alternate_presets(fixed: np.ndarray, moving: np.ndarray, configs, *, repeats: int = 3) -> list[list[float]]:
    """Seconds per pair of each of `configs` on one pair, the runs alternated in one process (A, B, A,
    B, ...) after one warm-up run each. A shared machine drifts between separate runs; here
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
