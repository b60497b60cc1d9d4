"""Compiling jaxreg's programs: ahead of time, with jaxreg's XLA options, once per config, grid and
device per process.

Compiling apart from running lets :mod:`jaxreg.registration` report compilation time separately and
lets batch threads share one executable. jaxreg makes no process-wide setting by itself: its XLA
options go to each of its own programs when they are compiled (:func:`.xla_options.compile_jitted`), and the
persistent compilation cache is turned on by an explicit :func:`configure` (the CLI calls it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from .config import RegistrationConfig
from .pipeline import Outputs, batched_program, batched_report_program, program, report_program
from .xla_options import compile_jitted, compile_once

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/jaxreg/xla")


class CompiledProgram(NamedTuple):
    """A registration's two executables: the registration program (:data:`pipeline.program`) and its
    report program (:data:`pipeline.report_program`). Called as one function of the inputs, it returns
    :class:`pipeline.Outputs` (arrays on the device, not waited for)."""

    field: Any
    report: Any

    def __call__(self, fixed, moving, *init):
        field = self.field(fixed, moving, *init)
        return Outputs(*field, *self.report(fixed, moving, field.disp, *init))


def device_name(device=None) -> str:
    """`platform:id` of a JAX device (default: JAX's default device), as logs and reports name it:
    the same in every JAX release (``str(device)`` is ``TFRT_CPU_0`` in jax 0.6, ``cpu:0`` in later ones)."""
    device = jax.devices()[0] if device is None else device
    return f"{device.platform}:{device.id}"


def compiled_program(config: RegistrationConfig, shape: tuple[int, int, int], with_init: bool, device=None):
    """The compiled program for this config and grid (on `device`, default: JAX's default device).
    Returns (:class:`CompiledProgram`, compile_seconds)."""
    sharding = None if device is None else SingleDeviceSharding(device)
    image = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=sharding)
    field = jax.ShapeDtypeStruct((3,) + tuple(shape), jnp.float32, sharding=sharding)
    init = field if with_init else None
    key = (config, tuple(shape), with_init, None if device is None else device.id)
    return compile_once(key, lambda: CompiledProgram(compile_jitted(program, image, image, init, config=config),
                                                 compile_jitted(report_program, image, image, field, init)))


def compiled_batched_program(config: RegistrationConfig, shape: tuple[int, int, int], pairs: int):
    """The compiled program registering `pairs` same-grid pairs at once (vmap). On an accelerator
    this raises pairs per second while one pair leaves the device partly idle; on CPU it only
    multiplies the memory. Returns (:class:`CompiledProgram` without a starting field, compile_seconds)."""
    stack = jax.ShapeDtypeStruct((pairs,) + tuple(shape), jnp.float32)
    fields = jax.ShapeDtypeStruct((pairs, 3) + tuple(shape), jnp.float32)
    return compile_once((config, tuple(shape), "batched", pairs),
                    lambda: CompiledProgram(compile_jitted(batched_program, stack, stack, config=config),
                                            compile_jitted(batched_report_program, stack, stack, fields)))


def configure(*, cache_dir: str | os.PathLike | None = DEFAULT_CACHE, min_compile_seconds: float = 0.5) -> dict:
    """Keep compiled programs on disk, so that the next process loads them instead of compiling again.

    This turns on JAX's persistent compilation cache, a setting of the whole process: jaxreg never
    makes it by itself. The ``jaxreg`` commands call it; a program using jaxreg may too, before its
    first compilation.

    Arguments:
        cache_dir: the folder (created if needed). The default is ``$JAXREG_CACHE_DIR`` when set
            (empty: no cache), else ``~/.cache/jaxreg/xla``. None turns nothing on.
        min_compile_seconds: programs that compile faster are not kept. JAX's own
            ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, when set, wins.

    Returns:
        What was set: ``{"cache_dir": the folder in use or None, "min_compile_seconds": seconds or None}``.
        A folder that cannot be created (e.g. a read-only home) logs one warning and sets nothing.
    """
    if cache_dir is DEFAULT_CACHE:
        cache_dir = os.environ.get("JAXREG_CACHE_DIR", str(DEFAULT_CACHE))
    settings = {"cache_dir": None, "min_compile_seconds": None}
    if not cache_dir:
        return settings
    try:
        folder = Path(cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except (OSError, RuntimeError) as err:  # read-only or missing home
        log.warning("compiled programs are not kept between processes: cannot use %s (%s); "
                    "set JAXREG_CACHE_DIR to a writable folder", cache_dir, err)
        return settings
    jax.config.update("jax_compilation_cache_dir", str(folder))
    settings["cache_dir"] = str(folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
        settings["min_compile_seconds"] = float(min_compile_seconds)
    return settings
