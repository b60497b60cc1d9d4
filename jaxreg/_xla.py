"""XLA settings that must be in place before the JAX backend starts."""

import logging
import os
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # private API moved: assume the worst
        return True


def configure_xla() -> None:
    """Turn off the YNNPACK library fusions that make reductions 2-70x slower on CPU (jaxlib 0.10).

    XLA reads XLA_FLAGS when the backend starts, so this works as long as jaxreg is imported before
    the first JAX computation; users can still override it through XLA_FLAGS.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    if _backend_started():
        logging.getLogger(__name__).warning(
            "import jaxreg before running any JAX computation: the JAX backend has started without "
            "%s, which makes jaxreg several times slower on CPU", FLAG)
        return
    os.environ["XLA_FLAGS"] = (flags + " " + FLAG).strip()
