"""The CPU kernels' shared library: compiled from ``cpu_kernels.cc`` with the system C++ compiler,
loaded, and its handlers registered with XLA, once per process.

Nothing happens at import. The library is built when the first CPU program that calls a kernel is
lowered (:mod:`jaxreg.ops.native.dispatch`), never for a GPU or TPU program, and cached on disk per
source, jaxlib, compiler, flags and CPU: in ``$JAXREG_NATIVE_DIR``, else ``~/.cache/jaxreg/native``,
else (no writable home) a temporary folder for this process.

Environment switches:

- ``JAXREG_NATIVE=0``: no kernels; every program takes the pure JAX path, as on GPU and TPU.
- ``JAXREG_REQUIRE_NATIVE=1``: a missing compiler or a failed build raises :class:`NativeBuildError`
  (CI sets it, so that a kernel source that stops compiling fails the tests instead of skipping them).
  Without it, jaxreg logs one warning and takes the pure JAX path, which computes the same values.

A failed build keeps the compiler's whole output in a log file beside the library; the warning
or the error names it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

from ...errors import JaxregError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = {  # FFI target name: the handler's symbol in the library
    "jaxreg_trilinear": "JaxregTrilinear", "jaxreg_warped_ssd": "JaxregWarpedSsd",
    "jaxreg_fold": "JaxregFold", "jaxreg_fold_mask": "JaxregFoldMask",
    "jaxreg_unfold": "JaxregUnfold",
    "jaxreg_cost_volume": "JaxregCostVolume", "jaxreg_coupled_argmin": "JaxregCoupledArgmin",
    "jaxreg_box": "JaxregBox", "jaxreg_box_adam": "JaxregBoxAdam", "jaxreg_mind": "JaxregMind",
    "jaxreg_sample": "JaxregSample", "jaxreg_lncc": "JaxregLncc",
}
# -march=native vectorises the sampling loop (gathers); the cache key holds the CPU's features, so a
# cache shared by cluster nodes keeps one library per kind of CPU. -fno-trapping-math lets the
# compiler turn the loop's selects into blends; no result depends on floating-point traps; and
# -fno-math-errno lets the Adam loop's square roots vectorise (nothing reads errno). No fused
# multiply-adds: the determinants round as the JAX path's do.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-std=c++17",
         "-shared", "-fPIC", "-w")
OFF = ("0", "false", "no", "off")

_lock = threading.Lock()
_state: dict = {}  # "ready": bool once the build was tried; "library": the loaded ctypes library
_scratch: list[Path] = []  # this process's temporary build folder, made when the cache folder is not writable


class NativeBuildError(JaxregError):
    """The CPU kernels could not be built while ``JAXREG_REQUIRE_NATIVE=1`` asks for them."""


def _switch(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in OFF


def enabled() -> bool:
    """Whether CPU programs may call the kernels: ``JAXREG_NATIVE`` is not 0 and no build has failed
    in this process (under JAXREG_REQUIRE_NATIVE=1 a failed build stays an error at every CPU
    program). Cheap, builds nothing: decided when a program is traced."""
    return _switch("JAXREG_NATIVE", "1") and (_state.get("ready", True) or required())


def required() -> bool:
    """``JAXREG_REQUIRE_NATIVE=1``: a kernel library that cannot be built is an error."""
    return _switch("JAXREG_REQUIRE_NATIVE", "0")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cache_folder() -> Path:
    """``$JAXREG_NATIVE_DIR``, else ``~/.cache/jaxreg/native``; a temporary folder of this process
    (one warning) when that cannot be created."""
    configured = os.environ.get("JAXREG_NATIVE_DIR")
    try:
        folder = Path(configured) if configured else Path.home() / ".cache" / "jaxreg" / "native"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except (OSError, RuntimeError) as err:  # read-only or missing home
        if not _scratch:
            _scratch.append(Path(tempfile.mkdtemp(prefix="jaxreg-native-")))
            log.warning("cannot keep the CPU kernels in %s (%s): building them in %s for this process "
                        "(set JAXREG_NATIVE_DIR to keep them)", configured or "~/.cache/jaxreg/native",
                        err, _scratch[0])
        return _scratch[0]


def _cpu_identity() -> bytes:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and feature flags."""
    identity = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        identity += "".join(sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))}))
    except OSError:
        identity += platform.processor()
    return identity.encode()


def _build(compiler: str) -> Path:
    """The shared library for this source, jaxlib, compiler and CPU, compiled unless already cached.
    Raises RuntimeError naming the log file that holds the compiler's whole output when it fails."""
    import jaxlib

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(),
                                     " ".join(FLAGS).encode(), _cpu_identity()])).hexdigest()[:16]
    folder = _cache_folder()
    library = folder / f"jaxreg_cpu_{key}.so"
    if library.exists():
        return library
    build_log = folder / f"jaxreg_cpu_{key}.log"
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as err:
            build_log.write_text(f"$ {' '.join(command)}\ntimed out after {err.timeout} s\n")
            raise RuntimeError(f"{Path(compiler).name} timed out; see {build_log}") from None
        if result.returncode != 0:
            build_log.write_text(f"$ {' '.join(command)}\nexit status {result.returncode}\n\n"
                                 f"{result.stdout}{result.stderr}")
            first = next((line for line in result.stderr.splitlines() if "error" in line),
                         (result.stderr.strip().splitlines() or ["no output"])[0])
            raise RuntimeError(f"{Path(compiler).name} failed: {first.strip()}; whole output in {build_log}")
        os.replace(partial, library)  # atomic: processes building at once each finish a whole file
        build_log.unlink(missing_ok=True)  # a failure's log, once the source builds again
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def _give_up(reason: str) -> bool:
    """A missing compiler or a failed build: an error under JAXREG_REQUIRE_NATIVE=1 (at every call),
    else one warning."""
    _state["failure"] = reason
    if required():
        raise NativeBuildError(f"{reason}, and JAXREG_REQUIRE_NATIVE=1 requires them")
    log.warning("%s: jaxreg uses its pure JAX CPU path, about 2x slower per pair", reason)
    return False


def ready() -> bool:
    """Build (once per process, or load from the cache), load and register the kernels with XLA;
    whether they are ready. Called when a CPU program that calls them is lowered.

    Raises NativeBuildError when JAXREG_REQUIRE_NATIVE=1 and the kernels cannot be built.
    """
    if not _switch("JAXREG_NATIVE", "1"):
        return False
    with _lock:
        if "ready" in _state:
            if "failure" in _state and required():
                raise NativeBuildError(f"{_state['failure']}, and JAXREG_REQUIRE_NATIVE=1 requires them")
            return _state["ready"]
        _state["ready"] = False
        compiler = _compiler()
        if compiler is None:
            return _give_up("no C++ compiler was found for jaxreg's CPU kernels (set CXX)")
        try:
            library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
            return _give_up(f"jaxreg's CPU kernels could not be built ({err})")
        _state["library"] = library  # keep it loaded for as long as XLA may call it
        _state["ready"] = True
        return True


def available() -> bool:
    """Whether the CPU kernels are built, loaded and registered (building them if not yet tried)."""
    return enabled() and ready()
