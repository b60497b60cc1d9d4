"""LUMIR's ten digital Jacobian determinants written straight from their definition (scipy
correlate kernels, mode='nearest', crop 1): the independent reference for NDV and the fold repair."""

import numpy as np
from scipy import ndimage


def identity(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)


def reference_digital_jacobians(disp):
    """The ten determinants as LUMIR.md defines them: scipy correlate kernels, mode='nearest', crop 1."""
    phi = disp.astype(np.float64) + identity(disp.shape[1:])

    def det(kx, ky, kz):
        g = [[ndimage.correlate(phi[c], k, mode="nearest") for c in range(3)] for k in (kx, ky, kz)]
        d = (g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1]) - g[1][0] * (g[0][1] * g[2][2] - g[0][2] * g[2][1])
             + g[2][0] * (g[0][1] * g[1][2] - g[0][2] * g[1][1]))
        return d[1:-1, 1:-1, 1:-1]

    forward, backward = np.array([0.0, -1, 1]), np.array([-1.0, 1, 0])
    dets = [det(sx.reshape(3, 1, 1), sy.reshape(1, 3, 1), sz.reshape(1, 1, 3))
            for sx in (forward, backward) for sy in (forward, backward) for sz in (forward, backward)]
    back_diag = np.array([[1.0, 0, 0], [0, -1, 0], [0, 0, 0]])
    fore_diag = np.array([[0.0, 0, 0], [0, -1, 0], [0, 0, 1]])
    dets.append(det(back_diag.reshape(3, 3, 1), back_diag.reshape(3, 1, 3), back_diag.reshape(1, 3, 3)))
    dets.append(det(fore_diag.reshape(3, 3, 1), fore_diag.reshape(1, 3, 3), fore_diag.reshape(3, 1, 3)))
    return dets
