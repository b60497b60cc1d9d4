"""jaxreg: JAX instance-optimisation registration of 3-D brain MRI in the LUMIR convention."""

from ._xla import configure_xla as _configure_xla

_configure_xla()

__version__ = "0.1.0"
