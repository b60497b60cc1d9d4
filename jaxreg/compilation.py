"""Compiling the registration program: ahead of time, once per config, grid and device, per process.

Compiling apart from running lets :mod:`jaxreg.registration` report compilation time separately and
lets batch threads share one executable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from .config import RegistrationConfig
from .pipeline import batched_program, program

log = logging.getLogger(__name__)

_executables: dict = {}
_compile_lock = threading.Lock()
_cache_configured = False


def enable_persistent_cache() -> str | None:
    """Keep compiled programs on disk so a second process does not compile again.

    The folder is ``$JAXREG_CACHE_DIR`` (set it empty to disable), else ``~/.cache/jaxreg/xla``.
    Programs that compile in under 0.5 s are not kept, unless JAX's own
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. Returns the folder in use, or None.
    """
    global _cache_configured
    folder = os.environ.get("JAXREG_CACHE_DIR", str(Path.home() / ".cache" / "jaxreg" / "xla"))
    if not _cache_configured:
        _cache_configured = True
        if folder:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                jax.config.update("jax_compilation_cache_dir", folder)
                if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own wins
                    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            except (OSError, AttributeError) as err:  # read-only home, old jax: compile every time
                log.warning("persistent compilation cache disabled: %s", err)
                return None
    return folder or None


def _compile(key, jitted, *args, config: RegistrationConfig):
    """Compile `jitted` for these abstract arguments once per process (ahead of time, so compilation
    is timed apart). Returns (executable, compile_seconds; 0.0 when cached)."""
    with _compile_lock:  # batch threads asking at once compile once
        if key in _executables:
            return _executables[key], 0.0
        enable_persistent_cache()
        start = time.perf_counter()
        executable = jitted.lower(*args, config=config).compile()
        _executables[key] = executable
        return executable, time.perf_counter() - start


def compiled_program(config: RegistrationConfig, shape: tuple[int, int, int], with_init: bool, device=None):
    """The compiled program for this config and grid (on `device`, default: JAX's default device).
    Returns (executable, compile_seconds)."""
    sharding = None if device is None else SingleDeviceSharding(device)
    image = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=sharding)
    init = jax.ShapeDtypeStruct((3,) + tuple(shape), jnp.float32, sharding=sharding) if with_init else None
    key = (config, tuple(shape), with_init, None if device is None else device.id)
    return _compile(key, program, image, image, init, config=config)



def compiled_batched_program(config: RegistrationConfig, shape: tuple[int, int, int], pairs: int):
    """The compiled program registering `pairs` same-grid pairs at once (vmap). On an accelerator
    this raises pairs per second while one pair leaves the device partly idle; on CPU it only
    multiplies the memory. Returns (executable, compile_seconds)."""
    stack = jax.ShapeDtypeStruct((pairs,) + tuple(shape), jnp.float32)
    return _compile((config, tuple(shape), "batched", pairs), batched_program, stack, stack, config=config)


