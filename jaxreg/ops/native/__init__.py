"""Hand-written C++ kernels inside jaxreg's CPU programs (XLA FFI).

- :mod:`.library`: building, caching and registering the shared library (``cpu_kernels.cc``);
- :mod:`.dispatch`: the one place that chooses the kernel or the pure JAX path, and the custom
  gradients of ops that have a kernel;
- :mod:`.kernels`: the FFI calls, each with the choice of its JAX path.
"""
