"""Quality-control pictures of a registration: look before you trust.

One PNG per pair: three orthogonal slices through the fixed brain's centre (rows) and six panels
(columns): fixed, moving, moved, a checkerboard of fixed and moved, the deformed grid over the
moved image, and the log-Jacobian of the field with the non-diffeomorphic voxels (those the NDV
metric counts) marked in red; a one-line summary of the metrics that apply on top. Matplotlib is an
optional dependency (``pip install jaxreg[qc]``); everything else here is NumPy/SciPy.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import atomic_output
from ..evaluation.metrics import non_diffeomorphic_volume_map

PLANES = ("sagittal", "coronal", "axial")  # slice normal along array axis 0, 1, 2


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("quality-control pictures need matplotlib: pip install 'jaxreg[qc]'") from None
    return plt


def log_jacobian(disp: np.ndarray) -> np.ndarray:
    """log of the central-difference Jacobian determinant of ``id + disp`` (NaN where it is <= 0)."""
    grads = [np.gradient(disp[c], axis=(0, 1, 2)) for c in range(3)]
    jac = np.empty((3, 3) + disp.shape[1:], np.float32)
    for c in range(3):
        for a in range(3):
            jac[c, a] = grads[c][a] + (1.0 if c == a else 0.0)
    det = np.moveaxis(jac, (0, 1), (-2, -1))
    det = np.linalg.det(det)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(det > 0, np.log(np.maximum(det, 1e-12)), np.nan).astype(np.float32)


@dataclass
class QCSlices:
    """The arrays each panel shows, per plane (exposed so tests can check what is drawn)."""

    centre: tuple[int, int, int]
    fixed: dict
    moving: dict
    moved: dict
    disp: dict  # plane -> (2, H, W) in-plane displacement components
    log_jacobian: dict
    folds: dict  # plane -> boolean map of voxels with non-diffeomorphic volume > 0


def _slice(volume: np.ndarray, plane: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=plane)


def qc_slices(fixed: np.ndarray, moving: np.ndarray, disp: np.ndarray, moved: np.ndarray | None = None) -> QCSlices:
    """Cut the three planes through the centre of mass of the fixed brain (``fixed > 0``)."""
    if fixed.shape != moving.shape or disp.shape != (3,) + fixed.shape:
        raise InputError(f"QC needs fixed, moving {fixed.shape} and a (3,)+grid field, got {moving.shape} and {disp.shape}")
    mask = fixed > 0
    centre = tuple(int(round(c)) for c in (ndimage.center_of_mass(mask) if mask.any() else np.array(fixed.shape) / 2))
    if moved is None:
        grid = np.indices(fixed.shape, dtype=np.float32)
        moved = ndimage.map_coordinates(moving, grid + disp, order=1, mode="nearest")
    folds = non_diffeomorphic_volume_map(disp) > 0
    logj = log_jacobian(disp)
    pick = {p: (lambda v, p=p: _slice(v, p, centre[p])) for p in range(3)}
    return QCSlices(
        centre=centre,
        fixed={p: pick[p](fixed) for p in range(3)},
        moving={p: pick[p](moving) for p in range(3)},
        moved={p: pick[p](moved) for p in range(3)},
        disp={p: np.stack([pick[p](disp[a]) for a in range(3) if a != p]) for p in range(3)},
        log_jacobian={p: pick[p](logj) for p in range(3)},
        folds={p: pick[p](folds) for p in range(3)},
    )


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    size = max(1, min(a.shape) // tiles)
    rows, cols = np.indices(a.shape)
    return np.where(((rows // size) + (cols // size)) % 2 == 0, a, b)


def render_qc(slices: QCSlices, path: str | os.PathLike, summary: str = "", grid_step: int = 8) -> Path:
    """Draw the 3 x 6 panel figure to `path` (PNG, written atomically)."""
    plt = _require_matplotlib()
    columns = ("fixed", "moving", "moved", "checkerboard fixed/moved", "deformed grid", "log Jacobian, folds red")
    fig, axes = plt.subplots(3, 6, figsize=(18, 9.5))
    for row, plane in enumerate(range(3)):
        fixed, moving, moved = slices.fixed[plane], slices.moving[plane], slices.moved[plane]
        high = float(max(fixed.max(), moving.max(), 1e-6))
        show = lambda ax, img, **kw: ax.imshow(img.T, origin="lower", **kw)  # noqa: E731
        for col, image in enumerate((fixed, moving, moved, _checkerboard(fixed, moved))):
            show(axes[row, col], image, cmap="gray", vmin=0, vmax=high)
        ax = axes[row, 4]
        show(ax, moved, cmap="gray", vmin=0, vmax=high)
        du, dv = slices.disp[plane]
        u, v = np.indices(du.shape, dtype=np.float32)
        for k in range(0, du.shape[0], grid_step):
            ax.plot(u[k] + du[k], v[k] + dv[k], color="yellow", linewidth=0.5)
        for k in range(0, du.shape[1], grid_step):
            ax.plot(u[:, k] + du[:, k], v[:, k] + dv[:, k], color="yellow", linewidth=0.5)
        ax = axes[row, 5]
        show(ax, slices.log_jacobian[plane], cmap="RdBu_r", vmin=-1, vmax=1)
        fold_u, fold_v = np.nonzero(slices.folds[plane])
        ax.scatter(fold_u, fold_v, s=4, c="red", marker="s", linewidths=0)
        axes[row, 0].set_ylabel(f"{PLANES[plane]} {slices.centre[plane]}")
        for col in range(6):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=10)
    fig.suptitle(summary, fontsize=11)
    fig.tight_layout()
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return Path(path)


def qc_figure(fixed: np.ndarray, moving: np.ndarray, disp: np.ndarray, path, *, summary: str = "",
              moved: np.ndarray | None = None) -> Path:
    """Cut the slices and draw the figure in one call."""
    return render_qc(qc_slices(fixed, moving, disp, moved), path, summary)


def write_index(rows: list[dict], path: str | os.PathLike) -> Path:
    """An ``index.html`` that shows every pair's picture and figures, sortable by any column.

    `rows`: dicts with at least ``pair`` and ``image`` (a path relative to the page); other keys
    (e.g. ``dice``, ``ndv``) become sortable columns.
    """
    path = Path(path)
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("pair", "image")]
    head = "".join(f"<th onclick=\"sortBy({i + 1})\">{html.escape(k)} &#8597;</th>" for i, k in enumerate(keys))
    body = []
    for row in rows:
        cells = "".join(
            f"<td data-v=\"{html.escape(json.dumps(row.get(k)))}\">{_format(row.get(k))}</td>" for k in keys)
        body.append(f"<tr><td>{html.escape(str(row['pair']))}</td>{cells}"
                    f"<td><a href=\"{html.escape(row['image'])}\"><img src=\"{html.escape(row['image'])}\" width=\"480\"></a></td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>jaxreg QC</title>
<style>body{{font-family:sans-serif}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px}}th{{cursor:pointer;background:#eee}}</style>
<script>
function sortBy(col){{const t=document.getElementById('qc');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.col==col&&t.dataset.dir=='asc'?'desc':'asc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((a,b)=>{{const x=JSON.parse(a.cells[col].dataset.v),y=JSON.parse(b.cells[col].dataset.v);
const d=(x===null?Infinity:x)-(y===null?Infinity:y);return dir=='asc'?d:-d;}});rows.forEach(r=>t.tBodies[0].appendChild(r));}}
</script></head><body><h1>jaxreg quality control</h1><p>Click a column to sort (e.g. worst Dice or largest NDV first).</p>
<table id="qc"><thead><tr><th>pair</th>{head}<th>picture</th></tr></thead><tbody>
{''.join(body)}
</tbody></table></body></html>"""
    with atomic_output(path, ".html") as tmp:
        tmp.write_text(page)
    return path


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return html.escape(str(value))


def summary_line(values: dict) -> str:
    """One line of the metrics that apply, e.g. ``Dice 0.5724 | HD95 5.14 | NDV 0.00013 %``."""
    names = {"dice": "Dice {:.4f}", "hd95": "HD95 {:.2f}", "tre_lm": "TRE_lm {:.2f}", "tre_kp": "TRE_kp {:.2f}",
             "ndv": "NDV {:.5f} %", "sdlogj": "SDlogJ {:.4f}", "ncc_before": "NCC before {:.4f}",
             "ncc_after": "NCC after {:.4f}"}
    parts = [fmt.format(values[key]) for key, fmt in names.items()
             if isinstance(values.get(key), (int, float)) and values.get(key) is not None]
    return " | ".join(parts)


def qc_for_files(fixed_path, moving_path, disp_path, output, *, values: dict | None = None,
                 label: str = "") -> tuple[Path, dict]:
    """Read a pair and its field, compute NDV (fixed mask) if not given, draw the picture."""
    from ..io import load_field, load_volume
    from ..evaluation.metrics import ndv

    fixed, _ = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    disp = load_field(disp_path, fixed.shape)
    values = dict(values or {})
    values.setdefault("ndv", float(ndv(disp, fixed > 0)))
    title = f"{label}   {summary_line(values)}".strip()
    return qc_figure(fixed, moving, disp, output, summary=title), values


def qc_dataset(items, fields_dir, qc_dir) -> Path:
    """Pictures for every (pair, metrics) of a dataset run, plus the sortable ``index.html``.

    `items`: (pair, metrics) with ``pair.fixed``, ``pair.moving``, ``pair.field_name``, ``pair.label``.
    """
    qc_dir = Path(qc_dir)
    rows = []
    for pair, values in items:
        name = pair.field_name.replace(".nii.gz", ".png")
        _, values = qc_for_files(pair.fixed, pair.moving, Path(fields_dir) / pair.field_name, qc_dir / name,
                                 values=values, label=pair.label)
        rows.append({"pair": pair.label, **{k: values.get(k) for k in ("dice", "hd95", "tre_kp", "ndv")}, "image": name})
    return write_index(rows, qc_dir / "index.html")
