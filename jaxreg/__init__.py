"""jaxreg: JAX instance-optimisation registration of 3-D brain MRI in the LUMIR convention.

Public API::

    result = jaxreg.register(fixed, moving, preset="lumir")   # arrays or NIfTI paths
    jaxreg.save_field(result.disp, "disp.nii.gz")

The names below are re-exported lazily, so that host-only parts (``jaxreg.evaluation.metrics``,
``jaxreg.evaluation.evaluate``) start without importing jax. Importing jaxreg changes nothing in the
process (no environment variable, no JAX setting); ``jaxreg.configure(cache_dir=...)`` turns on the
one process-wide setting jaxreg offers, the on-disk cache of compiled programs.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "register": "registration", "register_files": "registration", "RegistrationResult": "registration",
    "RegistrationConfig": "config", "load_config": "config", "preset_names": "config",
    "ConfigError": "errors", "InputError": "errors", "JaxregError": "errors",
    "load_field": "io", "load_volume": "io", "save_field": "io",
    "configure": "compilation",
    "apply": "apps.apply", "apply_files": "apps.apply", "invert": "ops.invert", "write_inverse": "apps.invert",
    "convert_field": "apps.convert", "export_native": "apps.convert",
    "lumir_to_itk": "transforms", "itk_to_lumir": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'jaxreg' has no attribute {name!r}")
