"""Quality-control pictures of a registration: look before you trust.

One PNG per pair: three orthogonal slices through the fixed brain's centre (rows) and six panels
(columns): fixed, moving, moved, a checkerboard of fixed and moved, the deformed grid over the
moved image, and the log-Jacobian of the field in a purple-white-orange map with its colour bar,
where the folds (the voxels the NDV metric counts) are painted in green, a colour the map never
uses. Above the panels, one line of metrics, the same whichever command drew the picture
(:func:`summary_line`). A dataset run also gets a thumbnail per pair and an ``index.html`` that
sorts the pairs by any metric, worst first in one click. Matplotlib is an optional dependency
(``pip install jaxreg[qc]``); everything else here is NumPy/SciPy.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..evaluation import metrics
from ..io import atomic_output, check_not_blank, load_volume
from ..transforms import load_as_lumir

PLANES = ("sagittal", "coronal", "axial")  # slice normal along array axis 0, 1, 2
THUMBNAIL_PLANE = 2  # axial
THUMBNAIL_HEIGHT = 140  # CSS pixels on the index page; drawn at twice that for sharp high-density screens
LOG_JACOBIAN_MAP = "PuOr_r"  # purple = contraction, white = volume kept, orange = expansion
LOG_JACOBIAN_RANGE = 1.0  # the colour bar spans log det J in [-1, 1], i.e. det J from 0.37 to 2.7
FOLD_COLOUR = "#00d000"  # green: not in the purple-white-orange map, so a fold is never read as growth
GRID_COLOUR = "#ffd000"
GRID_STEP = 8

# what the one-line summary shows, in this order: (text, column header, cell, larger is worse)
METRICS = {
    "dice": ("Dice {:.4f}", "Dice", "{:.4f}", False),
    "hd95": ("HD95 {:.2f}", "HD95", "{:.2f}", True),
    "tre_lm": ("TRE_lm {:.2f}", "TRE_lm", "{:.2f}", True),
    "tre_kp": ("TRE_kp {:.2f}", "TRE_kp", "{:.2f}", True),
    "ndv": ("NDV {:.5f} %", "NDV %", "{:.5f}", True),
    "sdlogj": ("SDlogJ {:.4f}", "SDlogJ", "{:.4f}", True),
    "max_disp": ("max |u| {:.1f} vox", "max |u|", "{:.1f}", True),
}


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
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
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


def _plane_log_jacobian(disp: np.ndarray, plane: int, index: int) -> np.ndarray:
    """:func:`log_jacobian` on one plane, from the slab of three planes around it (the central
    differences need no more), equal to slicing the whole volume's."""
    low, high = max(index - 1, 0), min(index + 2, disp.shape[1 + plane])
    slab = np.take(disp, np.arange(low, high), axis=1 + plane)
    return _slice(log_jacobian(slab), plane, index - low)


def _plane_folds(disp: np.ndarray, plane: int, index: int) -> np.ndarray:
    """The voxels of one plane with non-diffeomorphic volume > 0 (NDV's map, computed on that plane)."""
    only = np.zeros(disp.shape[1:], bool)
    np.moveaxis(only, plane, 0)[index] = True
    return _slice(metrics.non_diffeomorphic_volume_map(disp, only) > 0, plane, index)


def _plane_moved(moving: np.ndarray, disp: np.ndarray, plane: int, index: int) -> np.ndarray:
    """The moving image pulled through the field on one plane (trilinear, border padding)."""
    grid = np.indices(moving.shape, dtype=np.float32)
    coordinates = _slice(grid, plane + 1, index) + _slice(disp, plane + 1, index)
    return ndimage.map_coordinates(moving, coordinates, order=1, mode="nearest")


def qc_slices(fixed: np.ndarray, moving: np.ndarray, disp: np.ndarray, moved: np.ndarray | None = None) -> QCSlices:
    """Cut the three planes through the centre of mass of the fixed brain (``fixed > 0``); only
    those planes are computed (moved image, log-Jacobian, folds)."""
    if fixed.shape != moving.shape or disp.shape != (3,) + fixed.shape:
        raise InputError(f"QC needs fixed, moving {fixed.shape} and a (3,)+grid field, got {moving.shape} and {disp.shape}")
    mask = fixed > 0
    centre = tuple(int(round(c)) for c in (ndimage.center_of_mass(mask) if mask.any() else np.array(fixed.shape) / 2))
    planes = range(3)
    return QCSlices(
        centre=centre,
        fixed={p: _slice(fixed, p, centre[p]) for p in planes},
        moving={p: _slice(moving, p, centre[p]) for p in planes},
        moved={p: (_slice(moved, p, centre[p]) if moved is not None else _plane_moved(moving, disp, p, centre[p]))
               for p in planes},
        disp={p: np.stack([_slice(disp[a], p, centre[p]) for a in range(3) if a != p]) for p in planes},
        log_jacobian={p: _plane_log_jacobian(disp, p, centre[p]) for p in planes},
        folds={p: _plane_folds(disp, p, centre[p]) for p in planes},
    )


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    size = max(1, min(a.shape) // tiles)
    rows, cols = np.indices(a.shape)
    return np.where(((rows // size) + (cols // size)) % 2 == 0, a, b)


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------

def _show(ax, image: np.ndarray, **kwargs):
    """An image with x to the right and the slice's second axis up, filling the panel edge to edge."""
    shown = ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)
    ax.set_xlim(-0.5, image.shape[0] - 0.5)
    ax.set_ylim(-0.5, image.shape[1] - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _draw_grid(ax, disp_plane: np.ndarray, step: int) -> None:
    """The deformed grid lines: every `step`-th row and column of ``id + disp`` in the plane."""
    from matplotlib.collections import LineCollection

    du, dv = disp_plane
    u, v = np.indices(du.shape, dtype=np.float32)
    x, y = u + du, v + dv
    lines = [np.stack([x[k], y[k]], -1) for k in range(0, du.shape[0], step)]
    lines += [np.stack([x[:, k], y[:, k]], -1) for k in range(0, du.shape[1], step)]
    ax.add_collection(LineCollection(lines, colors=GRID_COLOUR, linewidths=0.6))


def _draw_log_jacobian(ax, log_j: np.ndarray, folds: np.ndarray):
    """log det J in the diverging map, the folds on top in FOLD_COLOUR (an RGBA overlay)."""
    shown = _show(ax, log_j, cmap=LOG_JACOBIAN_MAP, vmin=-LOG_JACOBIAN_RANGE, vmax=LOG_JACOBIAN_RANGE)
    if folds.any():
        import matplotlib.colors as mcolors

        overlay = np.zeros(folds.shape + (4,), np.float32)
        # a black rim: a single folded voxel must stay visible when the picture is shrunk
        grown = ndimage.binary_dilation(folds, iterations=1) & ~folds
        overlay[grown] = (0.0, 0.0, 0.0, 1.0)
        overlay[folds] = mcolors.to_rgba(FOLD_COLOUR)
        ax.imshow(np.transpose(overlay, (1, 0, 2)), origin="lower", interpolation="nearest")
    return shown


def render_qc(slices: QCSlices, path: str | os.PathLike, summary: str = "", grid_step: int = GRID_STEP) -> Path:
    """Draw the 3 x 6 panel figure with its colour bar and fold legend to `path` (PNG, atomic)."""
    plt = _require_matplotlib()
    from matplotlib.patches import Patch

    columns = ("fixed", "moving", "moved", "checkerboard fixed / moved", "deformed grid on moved",
               "log det J, folds")
    fig, axes = plt.subplots(3, 6, figsize=(17, 9.6), layout="constrained", gridspec_kw={"wspace": 0.01, "hspace": 0.01})
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02)
    shown = None
    for row in range(3):
        fixed, moving, moved = slices.fixed[row], slices.moving[row], slices.moved[row]
        high = float(max(fixed.max(), moving.max(), 1e-6))
        for col, image in enumerate((fixed, moving, moved, _checkerboard(fixed, moved), moved)):
            _show(axes[row, col], image, cmap="gray", vmin=0, vmax=high)
        _draw_grid(axes[row, 4], slices.disp[row], grid_step)
        shown = _draw_log_jacobian(axes[row, 5], slices.log_jacobian[row], slices.folds[row])
        axes[row, 0].set_ylabel(f"{PLANES[row]} slice {slices.centre[row]}", fontsize=11)
    for col, title in enumerate(columns):
        axes[0, col].set_title(title, fontsize=12)
    bar = fig.colorbar(shown, ax=axes[:, 5], location="right", shrink=0.9, aspect=30, extend="both")
    bar.set_ticks([-1, -0.5, 0, 0.5, 1], labels=["-1 (x0.37)", "-0.5", "0 (volume kept)", "0.5", "1 (x2.7)"])
    bar.set_label("log det J: purple shrinks, orange grows", fontsize=11)
    fig.legend(handles=[Patch(facecolor=FOLD_COLOUR, edgecolor="black", label="fold (a voxel NDV counts)")],
               loc="outside upper right", fontsize=11, frameon=False)
    fig.suptitle(summary, fontsize=13, x=0.01, ha="left")
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return Path(path)


def render_thumbnail(slices: QCSlices, path: str | os.PathLike, height_px: int = 2 * THUMBNAIL_HEIGHT) -> Path:
    """One strip for the index page: fixed, moved, checkerboard and log det J with folds, on the
    axial plane, edge to edge (PNG, atomic)."""
    plt = _require_matplotlib()
    plane = THUMBNAIL_PLANE
    fixed, moved = slices.fixed[plane], slices.moved[plane]
    width, height = fixed.shape  # shown transposed: array axis 0 across
    dpi = 100
    fig = plt.figure(figsize=(4 * width / height * height_px / dpi, height_px / dpi), dpi=dpi)
    high = float(max(fixed.max(), moved.max(), 1e-6))
    for col in range(4):
        ax = fig.add_axes((col / 4, 0, 1 / 4, 1))
        ax.set_axis_off()
        if col < 3:
            image = (fixed, moved, _checkerboard(fixed, moved))[col]
            _show(ax, image, cmap="gray", vmin=0, vmax=high)
        else:
            _draw_log_jacobian(ax, slices.log_jacobian[plane], slices.folds[plane])
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def qc_figure(fixed: np.ndarray, moving: np.ndarray, disp: np.ndarray, path, *, summary: str = "",
              moved: np.ndarray | None = None) -> Path:
    """Cut the slices and draw the figure in one call."""
    return render_qc(qc_slices(fixed, moving, disp, moved), path, summary)


# --------------------------------------------------------------------------------------------
# the metric line
# --------------------------------------------------------------------------------------------

def field_values(disp: np.ndarray, fixed: np.ndarray, known: dict | None = None) -> dict:
    """What every QC picture reports about a field, with or without label maps: NDV (% of the fixed
    brain, LUMIR25's mask), SDlogJ and the largest displacement component (voxels). Values already
    in `known` (e.g. from an evaluation) are kept, not computed again."""
    values = dict(known or {})
    if "ndv" not in values:
        values["ndv"] = metrics.ndv(disp, metrics.image_mask(fixed))
    if "sdlogj" not in values:
        values["sdlogj"] = metrics.sdlogj(disp)
    if "max_disp" not in values:
        values["max_disp"] = float(np.abs(disp).max())
    return values


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_line(values: dict, label: str = "") -> str:
    """One line of the metrics present, in a fixed order, e.g.
    ``0002 <- 0001 | Dice 0.5724 | HD95 5.14 | NDV 0.00013 % | SDlogJ 0.0767 | max |u| 6.1 vox``."""
    parts = [label] if label else []
    parts += [text.format(values[key]) for key, (text, *_) in METRICS.items() if _number(values.get(key))]
    return " | ".join(parts)


def _load_pair(fixed_path, moving_path, disp_path, convention: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fixed, _ = load_volume(fixed_path, "fixed image")
    moving, _ = load_volume(moving_path, "moving image")
    check_not_blank(fixed, f"fixed image '{fixed_path}'")
    check_not_blank(moving, f"moving image '{moving_path}'")
    if fixed.shape != moving.shape:
        raise InputError(f"fixed image is {fixed.shape} but moving image is {moving.shape}: both must be on one grid.")
    return fixed, moving, load_as_lumir(disp_path, fixed=fixed_path, moving=moving_path, convention=convention,
                                        shape=fixed.shape)


def qc_for_files(fixed_path, moving_path, disp_path, output, *, values: dict | None = None, label: str = "",
                 thumbnail=None, progress: Callable[[str], None] | None = None,
                 convention: str = "auto") -> tuple[Path, dict]:
    """Read a pair and its field, complete the metric line (:func:`field_values` for what `values`
    lacks), draw the picture (and a thumbnail at `thumbnail`, if given). Returns (path, values).
    `progress`, if given, is called with the name of each step as it starts; `convention`: the
    field's (:func:`jaxreg.transforms.detect_convention`; an ITK field is converted first)."""
    step = progress or (lambda name: None)
    step("reading")
    fixed, moving, disp = _load_pair(fixed_path, moving_path, disp_path, convention)
    step("measuring")
    values = field_values(disp, fixed, values)
    slices = qc_slices(fixed, moving, disp)
    step("drawing")
    path = render_qc(slices, output, summary_line(values, label))
    if thumbnail is not None:
        render_thumbnail(slices, thumbnail)
    return path, values


# --------------------------------------------------------------------------------------------
# a dataset's pictures and their index
# --------------------------------------------------------------------------------------------

def _cell(key: str, value) -> str:
    """A table cell's text: the metric's own format; ``nan`` (e.g. a vanished landmark) is shown but
    sorts with the missing values."""
    if not _number(value):
        return "–"
    if math.isnan(value):
        return "nan"
    return html.escape(METRICS[key][2].format(value) if key in METRICS else f"{value:.5g}")


def _larger_is_worse(key: str) -> bool:
    return METRICS[key][3] if key in METRICS else True


def _summary_rows(rows: list[dict], keys: list[str]) -> str:
    """Two rows above the pairs: the mean of each column and its worst pair."""
    means, worst = [], []
    for key in keys:
        present = [(row[key], row["pair"]) for row in rows if _number(row.get(key)) and not math.isnan(row[key])]
        if not present:
            means.append("<td>–</td>")
            worst.append("<td>–</td>")
            continue
        value, pair = (max if _larger_is_worse(key) else min)(present, key=lambda item: item[0])
        means.append(f"<td>{_cell(key, float(np.mean([v for v, _ in present])))}</td>")
        worst.append(f"<td>{_cell(key, value)}<br><small>{html.escape(str(pair))}</small></td>")
    n = len(rows)
    return (f"<tr class=\"summary\"><th>mean of {n} pair{'s' if n != 1 else ''}</th>{''.join(means)}<td></td></tr>"
            f"<tr class=\"summary\"><th>worst pair</th>{''.join(worst)}<td></td></tr>")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxreg quality control</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 12px 16px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px 0; }}
p.help {{ margin: 0 0 8px 0; font-size: 14px; }}
button {{ font-size: 14px; padding: 3px 10px; cursor: pointer; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: middle; }}
th:first-child, td:first-child {{ text-align: left; white-space: nowrap; }}
thead tr.names th {{ position: sticky; top: 0; background: #e8e8e8; z-index: 1; }}
thead th.sortable {{ cursor: pointer; white-space: nowrap; }}
thead th.sortable:hover {{ background: #d0d8ff; }}
thead th.sorted {{ background: #c8d4ff; }}
tr.summary th, tr.summary td {{ background: #f6f6f0; }}
tbody tr:hover {{ background: #f4f8ff; }}
td.pic {{ padding: 2px; }}
td.pic img {{ height: {height}px; display: block; cursor: zoom-in; }}
dialog {{ padding: 0; border: 0; max-width: 98vw; max-height: 98vh; }}
dialog img {{ max-width: 98vw; max-height: 96vh; display: block; cursor: zoom-out; }}
dialog::backdrop {{ background: rgba(0, 0, 0, 0.7); }}
</style></head><body>
<h1>jaxreg quality control: {count}</h1>
<p class="help"><button id="worst" onclick="worstFirst()">worst first</button>
Click a column to sort it (worst first, click again for best first; missing values stay last) and a
picture to enlarge it. <b id="order"></b></p>
<table id="qc"><thead>
<tr class="names"><th class="sortable" data-col="0" data-key="pair" data-worst="asc" data-name="pair">pair <span class="dir"></span></th>{heads}<th>axial slice: fixed · moved · checkerboard · log det J, folds green</th></tr>
{summary}
</thead><tbody>
{body}
</tbody></table>
<dialog id="big" onclick="this.close()"><img alt="quality-control picture"></dialog>
<script>
const table = document.getElementById('qc');
function value(row, col) {{ return JSON.parse(row.cells[col].dataset.v); }}
function sortBy(col, dir) {{
  const head = table.tHead.rows[0].cells[col];
  if (dir === undefined) {{
    dir = (table.dataset.col == col) ? (table.dataset.dir == 'asc' ? 'desc' : 'asc') : head.dataset.worst;
  }}
  const rows = [...table.tBodies[0].rows];
  rows.sort((a, b) => {{
    const x = value(a, col), y = value(b, col);
    if (x === null && y === null) return 0;
    if (x === null) return 1;   // missing values last, whatever the direction
    if (y === null) return -1;
    const d = (typeof x === 'string') ? x.localeCompare(y) : x - y;
    return dir == 'asc' ? d : -d;
  }});
  rows.forEach(r => table.tBodies[0].appendChild(r));
  table.dataset.col = col; table.dataset.dir = dir;
  for (const th of table.tHead.rows[0].cells) {{
    th.classList.remove('sorted');
    const span = th.querySelector('.dir'); if (span) span.textContent = '';
  }}
  head.classList.add('sorted');
  head.querySelector('.dir').textContent = dir == 'asc' ? '\\u25B2' : '\\u25BC';
  const worst = dir == head.dataset.worst;
  document.getElementById('order').textContent = 'Sorted by ' + head.dataset.name + ', '
      + (dir == 'asc' ? 'ascending' : 'descending') + (col > 0 ? (worst ? ' (worst first).' : ' (best first).') : '.');
  history.replaceState(null, '', '#sort=' + head.dataset.key + '-' + dir);  // a link to this view
}}
function worstFirst() {{ sortBy({worst_col}, table.tHead.rows[0].cells[{worst_col}].dataset.worst); }}
function fromAddress() {{  // index.html#worst, #sort=ndv (worst first), #sort=dice-desc
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted == 'worst') return worstFirst();
  const m = wanted.match(/^sort=(.+?)(?:-(asc|desc))?$/);
  const head = m && [...table.tHead.rows[0].cells].find(th => th.dataset.key == m[1]);
  if (head) sortBy(head.cellIndex, m[2] || head.dataset.worst);
}}
for (const th of table.tHead.rows[0].cells) {{
  if (th.classList.contains('sortable')) th.addEventListener('click', () => sortBy(th.cellIndex));
}}
fromAddress();
window.addEventListener('hashchange', fromAddress);
for (const img of document.querySelectorAll('td.pic img')) {{
  img.addEventListener('click', () => {{
    const big = document.getElementById('big');
    big.querySelector('img').src = img.dataset.full; big.showModal();
  }});
}}
</script></body></html>
"""


def write_index(rows: list[dict], path: str | os.PathLike, thumbnail_height: int = THUMBNAIL_HEIGHT) -> Path:
    """An ``index.html`` of every pair: its figures, sortable (worst first in one click, missing
    values last), a summary row (means, worst pair) and a thumbnail that enlarges to the full picture.

    `rows`: dicts with ``pair``, ``image`` (the full picture, relative to the page) and optionally
    ``thumbnail``; every other key (e.g. ``dice``, ``ndv``) becomes a column.
    """
    path = Path(path)
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("pair", "image", "thumbnail")]
    keys = sorted(keys, key=lambda k: list(METRICS).index(k) if k in METRICS else len(METRICS))
    names = {key: METRICS[key][1] if key in METRICS else key for key in keys}
    heads = "".join(
        f"<th class=\"sortable\" data-col=\"{i + 1}\" data-key=\"{html.escape(k)}\" data-name=\"{html.escape(names[k])}\" "
        f"data-worst=\"{'desc' if _larger_is_worse(k) else 'asc'}\">{html.escape(names[k])} "
        "<span class=\"dir\"></span></th>" for i, k in enumerate(keys))
    body = []
    for row in rows:
        cells = "".join(f"<td data-v=\"{html.escape(json.dumps(_json_value(row.get(k))))}\">{_cell(k, row.get(k))}</td>"
                        for k in keys)
        image = html.escape(row["image"])
        thumb = html.escape(row.get("thumbnail") or row["image"])
        body.append(f"<tr><td data-v=\"{html.escape(json.dumps(str(row['pair'])))}\">{html.escape(str(row['pair']))}</td>"
                    f"{cells}<td class=\"pic\"><a href=\"{image}\" onclick=\"return false\"><img src=\"{thumb}\" "
                    f"data-full=\"{image}\" alt=\"QC of {html.escape(str(row['pair']))}\" loading=\"lazy\"></a></td></tr>")
    worst_col = 1 + keys.index("dice") if "dice" in keys else (1 + keys.index("ndv") if "ndv" in keys else 0)
    page = _PAGE.format(height=thumbnail_height, count=f"{len(rows)} pair{'s' if len(rows) != 1 else ''}",
                        heads=heads, summary=_summary_rows(rows, keys), body="\n".join(body), worst_col=worst_col)
    with atomic_output(path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _json_value(value):
    """Numbers for sorting; None for what is missing or not a number (NaN, inf, text)."""
    return float(value) if _number(value) and math.isfinite(value) else None


INDEX_COLUMNS = ("dice", "hd95", "tre_lm", "tre_kp", "ndv", "sdlogj")


def qc_dataset(items, fields_dir, qc_dir, *, progress: Callable[[str], None] | None = None) -> Path:
    """Pictures and thumbnails for every (pair, metrics) of a dataset run, plus the sortable
    ``index.html``. `progress`, if given, is called with each pair's label after its picture.

    `items`: (pair, metrics) with ``pair.fixed``, ``pair.moving``, ``pair.field_name``, ``pair.label``.
    """
    qc_dir = Path(qc_dir)
    rows = []
    for pair, values in items:
        name = pair.field_name.replace(".nii.gz", ".png")
        thumb = name.replace(".png", "_thumb.png")
        _, values = qc_for_files(pair.fixed, pair.moving, Path(fields_dir) / pair.field_name, qc_dir / name,
                                 values={k: v for k, v in (values or {}).items() if _number(v)}, label=pair.label,
                                 thumbnail=qc_dir / thumb, convention="lumir")
        rows.append({"pair": pair.label, **{k: values.get(k) for k in INDEX_COLUMNS if k in values},
                     "image": name, "thumbnail": thumb})
        if progress is not None:
            progress(pair.label)
    return write_index(rows, qc_dir / "index.html")
