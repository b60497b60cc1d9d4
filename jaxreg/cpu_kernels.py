"""Hand-written CPU kernels inside the jitted programs (XLA FFI), with the pure JAX path beside them.

XLA's CPU gather copies element by element, and the corner index it reads is a full-size pass of its
own: the trilinear sampling with slopes that drives both refinement levels ran about twice as fast
as a C++ loop (``cpu_kernels.cc``). The kernel is compiled with the system C++ compiler on first
use and cached per source, jaxlib and compiler (``~/.cache/jaxreg/native``, or
``$JAXREG_NATIVE_DIR``). It serves only CPU programs: GPU and TPU programs, machines without a
compiler, and ``JAXREG_NATIVE=0`` use the JAX path, which computes the same values (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGET = "jaxreg_trilinear"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")  # no -march=native: a cache shared by
# cluster nodes with different CPUs must not hold instructions some of them lack

_lock = threading.Lock()
_state: dict = {}  # "ready": bool once decided; "library": the loaded ctypes library


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cache_folder() -> Path:
    folder = os.environ.get("JAXREG_NATIVE_DIR")
    return Path(folder) if folder else Path.home() / ".cache" / "jaxreg" / "native"


def _build(compiler: str) -> Path:
    """The shared library for this source, jaxlib and compiler, compiled unless already cached."""
    import jaxlib

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jaxlib.__version__.encode(),
                                     compiler.encode(), " ".join(FLAGS).encode()])).hexdigest()[:16]
    folder = _cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: build for this process only
        folder = Path(tempfile.mkdtemp(prefix="jaxreg-native-"))
    library = folder / f"jaxreg_cpu_{key}.so"
    if library.exists():
        return library
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed: {first}")
        os.replace(partial, library)  # atomic: processes building at once each finish a whole file
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def available() -> bool:
    """Whether the CPU kernels are built, loaded and registered with XLA (decided once per process).

    A missing compiler or a failed build logs one warning and leaves jaxreg on the JAX path.
    """
    with _lock:
        if "ready" not in _state:
            _state["ready"] = False
            if os.environ.get("JAXREG_NATIVE", "1").strip() in ("0", "false", "no", "off"):
                return False
            compiler = _compiler()
            if compiler is None:
                log.warning("no C++ compiler found (set CXX): jaxreg uses its pure JAX CPU path, "
                            "about 20 %% slower per pair")
                return False
            try:
                library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxregTrilinear), platform="cpu")
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
                log.warning("could not build jaxreg's CPU kernels (%s): using the pure JAX path, "
                            "about 20 %% slower per pair", err)
                return False
            _state["library"] = library  # keep it loaded for as long as XLA may call it
            _state["ready"] = True
        return _state["ready"]


def _native_trilinear(disp: jnp.ndarray, volume: jnp.ndarray):
    shape = disp.shape[1:] + volume.shape[3:]
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32),
                                     jax.ShapeDtypeStruct((3,) + shape, jnp.float32)),
                            vmap_method="sequential")
    value, slopes = call(disp.astype(jnp.float32), volume.astype(jnp.float32))
    return value, [slopes[0], slopes[1], slopes[2]]


def trilinear_with_slopes(disp: jnp.ndarray, volume: jnp.ndarray, jax_path):
    """(value, [d/dx, d/dy, d/dz]) of `volume` (X,Y,Z) or (X,Y,Z,C) sampled trilinearly at
    ``x + disp(x)``, corners outside counting as 0: the kernel in CPU programs when it is available,
    ``jax_path(disp, volume)`` (same result) everywhere else."""
    if not available():
        return jax_path(disp, volume)
    return jax.lax.platform_dependent(disp, volume, cpu=_native_trilinear, default=jax_path)
