"""The inverse of a displacement field, voxel by voxel, and how far it is from an exact inverse.

The pull map ``phi(x) = x + u(x)`` takes fixed voxels to moving voxel indices. Its inverse
``psi(y) = y + v(y)`` lives on the moving grid and solves ``phi(psi(y)) = y``, i.e. the residual
``r(y) = v(y) + u(y + v(y))`` (u sampled trilinearly) is zero; each moving voxel y is a problem of
its own. Every round proposes new values of v and keeps, voxel by voxel, whichever gives the
smallest ``|r|``, so no voxel's residual ever grows and the iteration cannot diverge:

1. On the whole grid (JAX, a few rounds): a half fixed-point step ``v - r / 2`` (the plain step
   ``v = -u(y + v)`` oscillates where the field compresses or stretches by more than a factor two)
   and a quasi-Newton step ``v - (I + dv/dy) r``, where the Jacobian of the current inverse stands
   in for the inverse Jacobian of phi. Most voxels converge here.
2. On the voxels left (NumPy, their number shrinks each round): Newton steps with phi's Jacobian
   at ``y + v`` (central differences of the trilinear field), half steps, and the six neighbours'
   current values, which bring a voxel caught in a local minimum of ``|r|`` (next to strong
   compression, typically at the brain's edge) to where its converged neighbours are.

Where phi folds or does not reach a moving voxel no exact inverse exists; those voxels keep a
residual, which :func:`consistency` reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..xla_options import compile_jitted, compile_once
from .warp import warp_field

log = logging.getLogger(__name__)

GRID_ROUNDS = 8
VOXEL_ROUNDS = 60
TOLERANCE = 1e-3  # voxels: a voxel with a smaller residual is done


@dataclass(frozen=True)
class ConsistencyError:
    """Lengths of a composition residual over a mask, in voxels."""

    mean: float
    p99: float
    max: float
    within_tenth: float  # share of the voxels with a residual under 0.1 voxel
    voxels: int

    def line(self) -> str:
        return (f"mean {self.mean:.4f}, 99th percentile {self.p99:.4f}, max {self.max:.3f} voxels; "
                f"{100 * self.within_tenth:.2f} % of {self.voxels} voxels within 0.1")


@dataclass(frozen=True)
class Inverse:
    """What :func:`invert` returns: the inverse field (3, X', Y', Z') on the moving grid, LUMIR
    convention, and ``|phi(psi(y)) - y|`` per moving voxel, in voxels."""

    disp: np.ndarray
    residual: np.ndarray


def _residual(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """``v(y) + u(y + v(y))`` (3, *v's grid)."""
    return v + warp_field(u, v, "border")


_residual_jit = jax.jit(_residual)


def _compiled(jitted, *args):
    """`jitted` compiled with jaxreg's XLA options for these arguments' shapes, once per process."""
    key = ("invert", jitted, tuple((a.shape, a.dtype) for a in args))
    return compile_once(key, lambda: compile_jitted(jitted, *args))[0]


def _keep_better(u, state, candidate):
    """Per voxel, `candidate` where its residual is smaller than the current one."""
    v, r, norm = state
    r_new = _residual(u, candidate)
    norm_new = jnp.sum(r_new * r_new, axis=0)
    better = norm_new < norm
    return jnp.where(better, candidate, v), jnp.where(better, r_new, r), jnp.minimum(norm, norm_new)


def invert_on_grid(u: jnp.ndarray, rounds: int = GRID_ROUNDS) -> jnp.ndarray:
    """The whole-grid rounds of :func:`invert` alone, as JAX code for use inside a program: the
    inverse of `u` (3, X, Y, Z) on its own grid, exact where the rounds converge (most voxels of a
    smooth field)."""
    return _grid_rounds(u, -u, rounds)[0]


def mean_with_inverse(forward: jnp.ndarray, backward: jnp.ndarray) -> jnp.ndarray:
    """The symmetric field of a forward field and the backward field of the same pair (each on its own
    fixed grid, both grids alike): the mean of `forward` and the inverse of `backward`
    (:func:`invert_on_grid`), so that neither image is the reference."""
    return 0.5 * (forward + invert_on_grid(backward))


def _grid_rounds(u: jnp.ndarray, v: jnp.ndarray, rounds: int = GRID_ROUNDS):
    """(v, its residual) after `rounds` whole-grid rounds from the start `v`."""
    return jax.lax.fori_loop(0, rounds, lambda _, vr: _grid_round(u, *vr), (v, _residual(u, v)))


_grid_rounds_jit = jax.jit(_grid_rounds)


def _grid_round(u: jnp.ndarray, v: jnp.ndarray, r: jnp.ndarray):
    state = (v, r, jnp.sum(r * r, axis=0))
    newton = jnp.stack([r[i] + sum(jnp.gradient(v[i], axis=j) * r[j] for j in range(3)) for i in range(3)])
    state = _keep_better(u, state, v - newton)
    v, r, _ = _keep_better(u, state, v - 0.5 * r)
    return v, r


class _VoxelPhase:
    """Rounds on the voxels still above the tolerance, with u sampled at their points only."""

    def __init__(self, u: np.ndarray, v: np.ndarray, r: np.ndarray):
        self.u = [np.asarray(channel, np.float64) for channel in u]
        self.v, self.r = v, r
        self.shape = v.shape[1:]

    def phi_minus_identity(self, points: np.ndarray) -> np.ndarray:
        """u at points (3, N), trilinear, clamped at the border (as :func:`warp_field`'s ``border``)."""
        return np.stack([ndimage.map_coordinates(c, points, order=1, mode="nearest") for c in self.u])

    def jacobian(self, points: np.ndarray) -> np.ndarray:
        """(N, 3, 3) Jacobian of phi at points, central differences over one voxel."""
        columns = []
        for axis in range(3):
            step = np.zeros((3, 1))
            step[axis] = 0.5
            columns.append(self.phi_minus_identity(points + step) - self.phi_minus_identity(points - step))
        return np.moveaxis(np.stack(columns, axis=1), -1, 0) + np.eye(3)

    def run(self, rounds: int, tolerance: float) -> None:
        flat_v = self.v.reshape(3, -1)
        flat_r = self.r.reshape(3, -1)
        for number in range(rounds):
            active = np.flatnonzero(np.sum(flat_r * flat_r, axis=0) > tolerance ** 2)
            if active.size == 0:
                break
            y = np.stack(np.unravel_index(active, self.shape)).astype(np.float64)
            v, r = flat_v[:, active].astype(np.float64), flat_r[:, active].astype(np.float64)
            norm = np.sum(r * r, axis=0)
            jac = self.jacobian(y + v)
            solvable = np.abs(np.linalg.det(jac)) > 1e-3
            newton = r.copy()
            newton[:, solvable] = np.linalg.solve(jac[solvable], r[:, solvable].T[..., None])[..., 0].T
            candidates = [v - newton, v - 0.5 * r]
            for axis in range(3):
                for shift in (1, -1):
                    neighbour = np.clip(y[axis] + shift, 0, self.shape[axis] - 1).astype(np.intp)
                    index = list(y.astype(np.intp))
                    index[axis] = neighbour
                    candidates.append(flat_v[:, np.ravel_multi_index(index, self.shape)].astype(np.float64))
            for candidate in candidates:
                r_new = candidate + self.phi_minus_identity(y + candidate)
                norm_new = np.sum(r_new * r_new, axis=0)
                better = norm_new < norm
                v[:, better], r[:, better], norm[better] = candidate[:, better], r_new[:, better], norm_new[better]
            flat_v[:, active], flat_r[:, active] = v, r
            log.debug("inverse, voxel round %d: %d voxels above %g, largest residual %.4f", number + 1, active.size,
                      tolerance, float(np.sqrt(norm.max())))


def invert(disp, *, shape=None, tolerance: float = TOLERANCE) -> Inverse:
    """The inverse of the pull field `disp` (3, X, Y, Z), on a moving grid of `shape` (default: the
    fixed grid's, as in LUMIR), solved voxel by voxel to `tolerance` voxels where it exists.

    The inverse is again a LUMIR field: it pulls the fixed image onto the moving grid,
    ``fixed_on_moving(y) = fixed(y + v(y))``, and maps moving-space points to fixed space.
    """
    u = np.asarray(disp, np.float32)
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(f"displacement has shape {u.shape}: expected (3, X, Y, Z).")
    shape = tuple(u.shape[1:]) if shape is None else tuple(int(n) for n in shape)
    u_device = jnp.asarray(u)
    v = -u_device if shape == tuple(u.shape[1:]) else jnp.zeros((3,) + shape, jnp.float32)
    v, r = _compiled(_grid_rounds_jit, u_device, v)(u_device, v)
    log.debug("inverse, %d grid rounds: largest residual %.4f voxels", GRID_ROUNDS,
              float(jnp.max(jnp.linalg.norm(r, axis=0))))
    phase = _VoxelPhase(u, np.array(v), np.array(r))
    phase.run(VOXEL_ROUNDS, tolerance)
    return Inverse(disp=phase.v, residual=np.linalg.norm(phase.r, axis=0))


def _summary(residual: np.ndarray, mask) -> ConsistencyError:
    values = residual[np.asarray(mask, bool)] if mask is not None else residual.ravel()
    if values.size == 0:
        raise InputError("the mask selects no voxel: is the image blank?")
    return ConsistencyError(mean=float(values.mean()), p99=float(np.percentile(values, 99)), max=float(values.max()),
                            within_tenth=float(np.mean(values < 0.1)), voxels=int(values.size))


def consistency(disp, inverse, *, fixed_mask=None, moving_mask=None) -> tuple[ConsistencyError, ConsistencyError]:
    """Inverse-consistency error of a field and its inverse, in voxels: ``|phi(psi(y)) - y|`` over
    the moving grid (`moving_mask`) and ``|psi(phi(x)) - x|`` over the fixed grid (`fixed_mask`);
    masks default to every voxel. The second is not what :func:`invert` solves: it also measures how
    far the trilinear inverse is from exact between voxel centres.
    """
    u = jnp.asarray(np.asarray(disp, np.float32))
    v = jnp.asarray(np.asarray(inverse, np.float32))
    on_moving = np.asarray(jnp.linalg.norm(_compiled(_residual_jit, u, v)(u, v), axis=0))
    on_fixed = np.asarray(jnp.linalg.norm(_compiled(_residual_jit, v, u)(v, u), axis=0))
    return _summary(on_moving, moving_mask), _summary(on_fixed, fixed_mask)
