"""jaxreg's XLA options, given to each of its own programs as it is compiled (never process-wide).

:func:`compile_jitted` is how every jaxreg program is compiled: the registration programs
(:mod:`jaxreg.compilation`), the pieces ``jaxreg benchmark`` times and the field inversion
(:mod:`jaxreg.ops.invert`); :func:`compile_once` keeps what they compile for the rest of the process.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

log = logging.getLogger(__name__)

_executables: dict = {}
_compile_lock = threading.Lock()

# XLA options of jaxreg's CPU programs. jaxlib 0.10's default YNNPACK fusions make a reduction over
# a leading axis (e.g. a sum over channels) 50-70x slower; the empty fusion type turns them off.
# A jaxlib that does not know an option skips it (checked once); XLA_FLAGS that set it win.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_accepts(name: str, value: str) -> bool:
    """Whether the installed jaxlib's CPU compiler takes the option (a trivial program compiled with it)."""
    cpu = SingleDeviceSharding(jax.devices("cpu")[0])
    probe = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu))
    try:
        probe.compile(compiler_options={name: value})
        return True
    except jax.errors.JaxRuntimeError as err:
        log.debug("this jaxlib does not take the XLA option %s (%s): compiling without it", name, err)
        return False


def compiler_options(platform: str) -> dict:
    """jaxreg's XLA options for a program on `platform` ("cpu", "gpu", "cuda", "tpu"...): on CPU those
    of :data:`CPU_OPTIONS` that this jaxlib takes and that ``XLA_FLAGS`` does not set."""
    if platform != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {name: value for name, value in CPU_OPTIONS.items()
            if f"--{name}" not in flags and _cpu_accepts(name, value)}


def _platform(args, kwargs) -> str:
    """The platform of the devices that the arguments (arrays or ShapeDtypeStructs) are placed on,
    else JAX's default backend."""
    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and getattr(sharding, "device_set", None):
            return next(iter(sharding.device_set)).platform
    return jax.default_backend()


def compile_jitted(jitted, *args, **kwargs):
    """``jitted.lower(*args, **kwargs).compile(...)`` with jaxreg's XLA options for the arguments'
    platform (:func:`compiler_options`): how every jaxreg program, or a piece of one that is timed
    apart (``jaxreg benchmark``), should be compiled. Returns the compiled executable."""
    options = compiler_options(_platform(args, kwargs))
    return jitted.lower(*args, **kwargs).compile(compiler_options=options)


def compile_once(key, build):
    """``build()`` once per `key` per process (ahead of time, so compilation is timed apart; batch
    threads asking at once compile once). Returns (executable, compile_seconds; 0.0 when kept)."""
    with _compile_lock:
        if key in _executables:
            return _executables[key], 0.0
        start = time.perf_counter()
        executable = build()
        _executables[key] = executable
        return executable, time.perf_counter() - start
