"""The C++ kernels' FFI calls (``cpu_kernels.cc``), each beside the choice of the JAX path that
computes the same.

These pieces of the pipeline run several times faster as C++ loops than as XLA's CPU code:

- the trilinear sampling with slopes of the full-resolution level (XLA's gather copies element by
  element, and the corner index it reads is a full-size pass of its own);
- the feature level's SSD and gradient, reduced over the channels in the same loop;
- the fold penalty's gradient (non-zero on a small part of the grid, which XLA evaluates everywhere);
- the fold repair: the mask of negative digital Jacobians (ten determinants in one pass) and all
  the repair's rounds in one call, each touching only the rows near folding voxels;
- the coarse search's cost volume (each row's features in cache for all candidates) and its coupled
  argmin (one pass over the cost volume per round);
- box filters (one read and one write, where XLA makes a pass per axis), and the last one of each
  Adam step fused with Adam's update (where XLA wrote the filtered gradient, then read it, the
  moments and the parameters in three passes);
- the full-resolution level's local NCC and its derivative (the local sums and derivative terms
  kept per plane, where XLA wrote and re-read two stacks of 3 and 4 channels);
- the warps of images and fields (trilinear values, one pass, where XLA gathers each corner);
- MIND-SSC, pooled (each tile's twelve patch SSDs filtered in cache, where XLA stored the
  full-resolution SSD stack and read it back three times).

Each public function takes the JAX path (``jax_path``) from its caller and dispatches with
:func:`.dispatch.on_cpu`: the kernel in CPU programs, the JAX path on GPU and TPU, with
``JAXREG_NATIVE=0`` and where the library cannot be built (:mod:`.library`). The ``_native_*``
functions are the bare FFI calls; they run only in CPU programs once the library is registered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .dispatch import on_cpu

MAX_CHANNELS = 64  # kMaxChannels in cpu_kernels.cc: jaxreg_warped_ssd's per-cell buffers
MAX_BOX_SIZE = 33  # 2 kMaxRadius + 1: the widest window jaxreg_box takes


def trilinear_with_slopes(disp: jnp.ndarray, volume: jnp.ndarray, jax_path):
    """(value, [d/dx, d/dy, d/dz]) of `volume` (X,Y,Z) sampled trilinearly at ``x + disp(x)``,
    corners outside counting as 0; ``jax_path(disp, volume)`` computes the same (and serves volumes
    with channels, which the kernel does not take)."""
    if volume.ndim != 3:
        return jax_path(disp, volume)
    return on_cpu(_native_trilinear, jax_path, disp, volume)


def _native_trilinear(disp: jnp.ndarray, volume: jnp.ndarray):
    shape = disp.shape[1:]
    call = jax.ffi.ffi_call("jaxreg_trilinear", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                                 jax.ShapeDtypeStruct((3,) + shape, jnp.float32)),
                            vmap_method="sequential")
    value, slopes = call(disp.astype(jnp.float32), volume.astype(jnp.float32))
    return value, [slopes[0], slopes[1], slopes[2]]


def warped_ssd_and_gradient(disp: jnp.ndarray, moving: jnp.ndarray, fixed: jnp.ndarray, jax_path):
    """(mean over cells of sum over channels of (moving(x + disp) - fixed)^2, its gradient wrt disp),
    moving and fixed (X,Y,Z,C); ``jax_path(disp, moving, fixed)`` computes the same (and serves more
    than MAX_CHANNELS channels)."""
    if moving.ndim != 4 or moving.shape[-1] > MAX_CHANNELS:
        return jax_path(disp, moving, fixed)
    return on_cpu(_native_warped_ssd, jax_path, disp, moving, fixed)


def _native_warped_ssd(disp: jnp.ndarray, moving: jnp.ndarray, fixed: jnp.ndarray):
    shape = disp.shape[1:]
    call = jax.ffi.ffi_call("jaxreg_warped_ssd", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                                  jax.ShapeDtypeStruct(disp.shape, jnp.float32)),
                            vmap_method="sequential")
    per_cell, gradient = call(disp.astype(jnp.float32), moving.astype(jnp.float32), fixed.astype(jnp.float32))
    count = float(shape[0] * shape[1] * shape[2])
    return jnp.sum(per_cell) / count, gradient * (1.0 / count)


def fold_penalty_and_gradient(disp: jnp.ndarray, margin: float, jax_path):
    """(mean over the common interior of ``relu(margin - det J)^2``, its gradient wrt `disp`), J the
    forward-difference Jacobian of ``x + disp(x)``; ``jax_path(disp, margin)`` computes the same."""
    return on_cpu(lambda d: _native_fold(d, margin), lambda d: jax_path(d, margin), disp)


def _native_fold(disp: jnp.ndarray, margin: float):
    shape = disp.shape[1:]
    call = jax.ffi.ffi_call("jaxreg_fold", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                            jax.ShapeDtypeStruct(disp.shape, jnp.float32)),
                            vmap_method="sequential")
    shortfall, gradient = call(disp.astype(jnp.float32), margin=np.float32(margin))
    count = float((shape[0] - 1) * (shape[1] - 1) * (shape[2] - 1))
    return jnp.sum(shortfall * shortfall) / count, gradient


def fold_mask(disp: jnp.ndarray, jax_path) -> jnp.ndarray:
    """(X,Y,Z) booleans: one of the ten digital Jacobians of ``x + disp(x)`` negative (border False);
    ``jax_path(disp)`` computes the same."""
    return on_cpu(_native_fold_mask, jax_path, disp)


def _native_fold_mask(disp: jnp.ndarray) -> jnp.ndarray:
    call = jax.ffi.ffi_call("jaxreg_fold_mask", jax.ShapeDtypeStruct(disp.shape[1:], jnp.bool_),
                            vmap_method="sequential")
    return call(disp.astype(jnp.float32))


def unfold(disp: jnp.ndarray, rounds: int, local_rounds: int, grow: int, blend: float, jax_path):
    """The fold repair of :func:`jaxreg.stages.unfold.unfold`: (field, rounds run, folding voxels left).
    The kernel runs every round in one call and touches only the rows near folding voxels;
    ``jax_path(disp)`` computes the same."""
    return on_cpu(lambda d: _native_unfold(d, rounds, local_rounds, grow, blend), jax_path, disp)


def _native_unfold(disp, rounds: int, local_rounds: int, grow: int, blend: float):
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    call = jax.ffi.ffi_call("jaxreg_unfold", (jax.ShapeDtypeStruct(disp.shape, jnp.float32), scalar, scalar),
                            vmap_method="sequential")
    return call(disp.astype(jnp.float32), rounds=np.int32(rounds), local_rounds=np.int32(local_rounds),
                grow=np.int32(grow), blend=np.float32(blend))


def cost_volume(fixed, moving, offsets, jax_path):
    """(n,X,Y,Z): per candidate offset (offsets (n,3) integers), the sum over channels of
    ``(fixed(x) - moving(x + offset))^2``, moving zero outside; fixed, moving (C,X,Y,Z).
    ``jax_path`` (same arguments) computes the same."""
    return on_cpu(_native_cost_volume, jax_path, fixed, moving, offsets)


def _native_cost_volume(fixed, moving, offsets):
    call = jax.ffi.ffi_call("jaxreg_cost_volume",
                            jax.ShapeDtypeStruct((offsets.shape[0],) + fixed.shape[1:], jnp.float32),
                            vmap_method="sequential")
    return call(fixed.astype(jnp.float32), moving.astype(jnp.float32), offsets.astype(jnp.int32))


def coupled_argmin(cost, offsets, centre, weight: float, jax_path):
    """Per cell of cost (n,X,Y,Z), the first candidate index minimising ``cost + weight *
    |offsets - centre|^2`` (centre (3,X,Y,Z), or None for the cost alone); ``jax_path`` (same
    arguments) computes the same."""
    if centre is None:  # the kernel always takes a centre; weight 0 leaves the cost as it is
        return on_cpu(lambda c, o: _native_coupled_argmin(c, o, jnp.zeros((3,) + c.shape[1:]), 0.0),
                      lambda c, o: jax_path(c, o, None, 0.0), cost, offsets)
    return on_cpu(lambda c, o, m: _native_coupled_argmin(c, o, m, weight),
                  lambda c, o, m: jax_path(c, o, m, weight), cost, offsets, centre)


def _native_coupled_argmin(cost, offsets, centre, weight: float):
    call = jax.ffi.ffi_call("jaxreg_coupled_argmin", jax.ShapeDtypeStruct(cost.shape[1:], jnp.int32),
                            vmap_method="sequential")
    return call(cost.astype(jnp.float32), offsets.astype(jnp.float32), centre.astype(jnp.float32),
                weight=np.float32(weight))


def warp_channels(volume: jnp.ndarray, disp: jnp.ndarray, mode: str, jax_path) -> jnp.ndarray:
    """(C, X, Y, Z): `volume` (C, VX, VY, VZ) sampled trilinearly at ``x + disp(x)``, zero or border
    padded; ``jax_path(volume, disp)`` computes the same. The kernel takes one or three channels."""
    if volume.shape[0] not in (1, 3) or mode not in ("zeros", "border"):
        return jax_path(volume, disp)
    return on_cpu(lambda v, d: _native_sample(v, d, mode), jax_path, volume, disp)


def _native_sample(volume, disp, mode: str):
    call = jax.ffi.ffi_call("jaxreg_sample", jax.ShapeDtypeStruct(volume.shape[:1] + disp.shape[1:], jnp.float32),
                            vmap_method="sequential")
    return call(disp.astype(jnp.float32), volume.astype(jnp.float32), border=np.int32(mode == "border"))


def mind_ssc_pooled(image: jnp.ndarray, radius: int, pairs, factor: int, jax_path) -> jnp.ndarray:
    """MIND-SSC of `image` (X,Y,Z) averaged over factor^3 blocks: (12, X//f, Y//f, Z//f). `pairs`: the
    twelve channels' two voxel offsets (:func:`jaxreg.stages.features.mind_pairs`); ``jax_path(image)``
    computes the same."""
    if radius > MAX_BOX_SIZE // 2:  # the kernel's patch sums reach 16 voxels
        return jax_path(image)
    return on_cpu(lambda i: _native_mind(i, radius, pairs, factor), jax_path, image)


def _native_mind(image, radius: int, pairs, factor: int):
    shape = (len(pairs),) + tuple(n // factor for n in image.shape)
    call = jax.ffi.ffi_call("jaxreg_mind", jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(image.astype(jnp.float32), jnp.asarray(np.asarray(pairs, np.int32).reshape(len(pairs), 6)),
                radius=np.int32(radius), factor=np.int32(factor))


def lncc_and_derivative(warped, fixed, fixed_mean, fixed_var, window: int, epsilon: float, jax_path):
    """(1 - mean local squared NCC, its derivative wrt `warped`) over window^3 zero-padded boxes, all
    volumes (X,Y,Z); ``jax_path(warped, fixed, fixed_mean, fixed_var)`` computes the same."""
    if window > MAX_BOX_SIZE:
        return jax_path(warped, fixed, fixed_mean, fixed_var)
    return on_cpu(lambda *v: _native_lncc(*v, window, epsilon), jax_path, warped, fixed, fixed_mean, fixed_var)


def _native_lncc(warped, fixed, fixed_mean, fixed_var, window: int, epsilon: float):
    call = jax.ffi.ffi_call("jaxreg_lncc", (jax.ShapeDtypeStruct((), jnp.float32),
                                            jax.ShapeDtypeStruct(warped.shape, jnp.float32)),
                            vmap_method="sequential")
    volumes = (v.astype(jnp.float32) for v in (warped, fixed, fixed_mean, fixed_var))
    return call(*volumes, window=np.int32(window), epsilon=np.float32(epsilon))


def box_adam(gradient, corrections, moments, params, size: int, coefficients):
    """One Adam step on `params` (B, X, Y, Z) from the zero-padded size^3 box average of `gradient`,
    in one pass: (first moment, second moment, params), updated in place. `corrections` is (2,), Adam's
    bias corrections of this step; `coefficients` (1 - b1, b1, 1 - b2, b2, eps, -learning rate).
    A bare FFI call: only inside the `native` of :func:`.dispatch.on_cpu` (the Adam step's kernel path)."""
    names = ("one_minus_b1", "b1", "one_minus_b2", "b2", "eps", "minus_lr")
    call = jax.ffi.ffi_call("jaxreg_box_adam", (jax.ShapeDtypeStruct(params.shape, jnp.float32),) * 3,
                            input_output_aliases={2: 0, 3: 1, 4: 2}, vmap_method="sequential")
    arrays = (gradient, corrections, *moments, params)
    return call(*(a.astype(jnp.float32) for a in arrays), size=np.int32(size),
                **{name: np.float32(value) for name, value in zip(names, coefficients)})


def box_average(x: jnp.ndarray, size: int, axes, edge: bool) -> jnp.ndarray:
    """The kernel's box average of odd width `size` (at most MAX_BOX_SIZE) along `axes` (a subset of
    the last three), edge-replicated or zero-padded: what :func:`jaxreg.ops.filters.box_filter` computes.
    A bare FFI call: through :func:`.dispatch.on_cpu`, with the JAX box filter beside it."""
    mask = sum(1 << (a % x.ndim - (x.ndim - 3)) for a in axes)
    volumes = x.reshape((-1,) + x.shape[-3:]).astype(jnp.float32)
    call = jax.ffi.ffi_call("jaxreg_box", jax.ShapeDtypeStruct(volumes.shape, jnp.float32), vmap_method="sequential")
    return call(volumes, size=np.int32(size), axes=np.int32(mask), edge=np.int32(edge)).reshape(x.shape)
