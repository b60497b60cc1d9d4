"""Finite-difference Jacobian determinants of a transform, written once for NumPy and JAX arrays.

Only slicing and arithmetic, so the evaluator (:mod:`jaxreg.evaluation.metrics`, NumPy float64) and the fold
repair inside the jitted program (:mod:`jaxreg.stages.unfold`, JAX float32) use the same definition.
"""

from __future__ import annotations

import itertools


def det3(r0, r1, r2):
    """Determinant of the 3x3 matrix whose row a is the derivative along axis a of the 3 components.

    Expanded along the first column in the official evaluator's order, so the rounding matches.
    """
    return (r0[0] * (r1[1] * r2[2] - r1[2] * r2[1])
            - r1[0] * (r0[1] * r2[2] - r0[2] * r2[1])
            + r2[0] * (r0[1] * r1[2] - r0[2] * r1[1]))


def digital_jacobians(phi):
    """The ten finite-difference Jacobian determinants of Liu et al.'s digital diffeomorphism.

    `phi` holds rows i-1..i+1 around the voxels to evaluate (one extra voxel on every side); the
    determinants come back for the inner block. Eight use one-sided differences, forward or
    backward on each axis; two (J*1, J*2) use the face diagonals of the two tetrahedra that split
    the cube differently. All ten equal 1, resp. 2 for J*, on the identity.
    """
    _, nx, ny, nz = phi.shape

    def at(dx, dy, dz):  # phi shifted by (dx, dy, dz), on the inner block
        return phi[:, 1 + dx:nx - 1 + dx, 1 + dy:ny - 1 + dy, 1 + dz:nz - 1 + dz]

    centre = at(0, 0, 0)
    forward = [at(1, 0, 0) - centre, at(0, 1, 0) - centre, at(0, 0, 1) - centre]
    backward = [centre - at(-1, 0, 0), centre - at(0, -1, 0), centre - at(0, 0, -1)]
    for dx, dy, dz in itertools.product((forward, backward), repeat=3):
        yield det3(dx[0], dy[1], dz[2])
    yield det3(at(-1, -1, 0) - centre, at(-1, 0, -1) - centre, at(0, -1, -1) - centre)  # J*1
    yield det3(at(1, 1, 0) - centre, at(0, 1, 1) - centre, at(1, 0, 1) - centre)  # J*2
