"""Figures for OOD evaluation: ROC curves, score histograms, image grids.

matplotlib is imported lazily inside each function, so importing this module
is cheap.  Figures are drawn on the Agg canvas directly (no pyplot, no global
backend switch).  Every writer is atomic: output goes to a temporary file in
the destination directory and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from hvaeood.io_utils import atomic_write

__all__ = ["plot_roc", "plot_histograms", "image_grid", "save_image_grid"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _format_of(path) -> str:
  ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
  return ext or "png"


def _new_figure(figsize: Tuple[float, float]):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save_figure(fig, path, dpi: int) -> str:
  fmt = _format_of(path)
  return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
  # trapezoid rule; on a tie-grouped ROC this equals the Mann-Whitney AUROC
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def _finite(arr, what: str) -> np.ndarray:
  a = np.asarray(arr, dtype=np.float64).ravel()
  bad = int(np.count_nonzero(~np.isfinite(a)))
  if bad:
    raise ValueError(f"{what} contains {bad} non-finite value(s)")
  if a.size == 0:
    raise ValueError(f"{what} is empty")
  return a


# --------------------------------------------------------------------------- #
# ROC curves
# --------------------------------------------------------------------------- #
def plot_roc(
  curves: Mapping[str, Mapping[str, Tuple[np.ndarray, np.ndarray]]],
  path,
  title: Optional[str] = None,
  dpi: int = 100,
) -> str:
  """One subplot per OOD set, one ROC curve per score (AUROC in the legend),
  with the chance diagonal.  ``curves[ood][score] = (fpr, tpr)``, e.g. from
  ``ood_metrics.ood_roc_curves``.  Returns the written path."""
  if not curves:
    raise ValueError("curves is empty")
  n = len(curves)
  ncols = min(n, 3)
  nrows = math.ceil(n / ncols)
  fig = _new_figure((4.2 * ncols, 4.0 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for i, (ood_name, per_score) in enumerate(curves.items()):
    ax = axes[i // ncols][i % ncols]
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for score_name, (fpr, tpr) in per_score.items():
      fpr = _finite(fpr, f"fpr of {ood_name}/{score_name}")
      tpr = _finite(tpr, f"tpr of {ood_name}/{score_name}")
      if fpr.shape != tpr.shape:
        raise ValueError(
          f"fpr/tpr of {ood_name}/{score_name} differ in length: "
          f"{fpr.shape} vs {tpr.shape}"
        )
      ax.plot(fpr, tpr, linewidth=1.5, label=f"{score_name} (AUROC {_area(fpr, tpr):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (OOD)")
    ax.set_title(str(ood_name))
    ax.legend(loc="lower right", fontsize="small")
  for j in range(n, nrows * ncols):
    axes[j // ncols][j % ncols].set_axis_off()
  if title:
    fig.suptitle(title)
  return _save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- #
# score histograms
# --------------------------------------------------------------------------- #
def plot_histograms(
  in_scores: Mapping[str, np.ndarray],
  ood_scores: Mapping[str, Mapping[str, np.ndarray]],
  path,
  bins: int = 50,
  in_label: str = "in-distribution",
  score_order: Optional[Sequence[str]] = None,
  dpi: int = 100,
) -> str:
  """Grid of histograms: rows = OOD sets, columns = scores.  Each panel
  overlays the in-distribution and the OOD scores (densities) using bin
  edges shared by all panels of that column.  Returns the written path."""
  if not in_scores or not ood_scores:
    raise ValueError("in_scores and ood_scores must be non-empty")
  scores = list(score_order) if score_order is not None else list(in_scores)
  ins = {s: _finite(in_scores[s], f"in-distribution score {s!r}") for s in scores}
  oods = {
    o: {s: _finite(v, f"OOD set {o!r} score {s!r}") for s, v in d.items() if s in ins}
    for o, d in ood_scores.items()
  }
  edges = {}
  for s in scores:
    allv = np.concatenate([ins[s]] + [d[s] for d in oods.values() if s in d])
    lo, hi = float(allv.min()), float(allv.max())
    if lo == hi:
      lo, hi = lo - 0.5, hi + 0.5
    edges[s] = np.linspace(lo, hi, int(bins) + 1)

  nrows, ncols = len(oods), len(scores)
  fig = _new_figure((3.6 * ncols, 2.8 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for r, (ood_name, per_score) in enumerate(oods.items()):
    legend = True  # one legend per row, on its first panel: every panel of a row overlays the same two sets
    for c, s in enumerate(scores):
      ax = axes[r][c]
      if s not in per_score:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        continue
      for values, label in ((ins[s], in_label), (per_score[s], str(ood_name))):
        # One filled step artist per histogram (ax.hist draws a patch per bin; with a legend per panel the figure
        # of 3 x 10 panels took 8-10 CPU s, now 3-4: benchmarks/README.md, ninth session).
        density, _ = np.histogram(values, bins=edges[s], density=True)
        ax.stairs(density, edges[s], fill=True, alpha=0.55, label=label)
      if r == 0:
        ax.set_title(str(s))
      if c == 0:
        ax.set_ylabel(f"{ood_name}\ndensity")
      if legend:
        ax.legend(fontsize="x-small")
        legend = False
  return _save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- #
# image grids
# --------------------------------------------------------------------------- #
def image_grid(images, ncols: Optional[int] = None, pad_value: float = 1.0) -> np.ndarray:
  """The uint8 grid `save_image_grid` writes: [rows*H + rows-1, cols*W + cols-1] (C = 1) or [..., C]."""
  x = np.asarray(images)
  if x.ndim == 3:  # N,H,W -> grayscale
    x = x[..., None]
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"images must have shape [N,H,W,C] (or [N,H,W]), got {x.shape}")
  n, h, w, c = x.shape
  if c not in (1, 3, 4):
    raise ValueError(f"images must have 1, 3 or 4 channels, got {c}")
  if x.dtype == np.uint8:
    u8 = x
  else:
    xf = x.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(xf)))
    if bad:
      raise ValueError(f"images contain {bad} non-finite value(s)")
    u8 = np.rint(np.clip(xf, 0.0, 1.0) * 255.0).astype(np.uint8)
  if ncols is None:
    ncols = math.ceil(math.sqrt(n))
  ncols = int(ncols)
  if ncols < 1:
    raise ValueError(f"ncols must be >= 1, got {ncols}")
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  pad = int(round(float(np.clip(pad_value, 0.0, 1.0)) * 255))
  grid = np.full((nrows * h + nrows - 1, ncols * w + ncols - 1, c), pad, dtype=np.uint8)
  if c == 4:
    grid[..., 3] = 255
  for i in range(n):
    r, col = divmod(i, ncols)
    y0, x0 = r * (h + 1), col * (w + 1)
    grid[y0 : y0 + h, x0 : x0 + w] = u8[i]
  return grid[..., 0] if c == 1 else grid


def save_image_grid(
  images,
  path,
  ncols: Optional[int] = None,
  pad_value: float = 1.0,
) -> str:
  """Tile ``images`` ([N,H,W,C] floats in [0,1], clipped; or uint8; or
  [N,H,W]) into a PNG grid with 1-pixel separators of ``pad_value``.

  ``ncols`` defaults to ceil(sqrt(N)).  The output is
  ``(rows*H + rows-1) x (ncols*W + ncols-1)`` pixels, grayscale for C=1,
  RGB(A) otherwise; empty trailing cells are filled with ``pad_value``.
  Returns the written path.
  """
  grid = image_grid(images, ncols, pad_value)

  def write(tmp: str) -> None:
    try:
      from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
      import matplotlib.image as mimage

      if grid.ndim == 2:
        mimage.imsave(tmp, grid, cmap="gray", vmin=0, vmax=255, format="png")
      else:
        mimage.imsave(tmp, grid, format="png")
      return
    # mode inferred from shape: [H,W] -> L, [H,W,3] -> RGB, [H,W,4] -> RGBA
    Image.fromarray(np.ascontiguousarray(grid)).save(tmp, format="PNG")

  return atomic_write(path, write)
