"""XLA settings that must be in place before jax is first imported."""

import os
import sys


def configure_xla() -> None:
    """Turn off the YNNPACK fusion that makes leading-axis reductions 50-70x slower on CPU (jaxlib 0.10).

    Has no effect if jax was imported before jaxreg; users can override through XLA_FLAGS.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()
