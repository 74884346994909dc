"""Figures of the course: one style, the predicted-vs-actual scatter of the validation notebooks, image grids.

Save every figure with :meth:`msif_lab.results.NotebookRun.savefig`; show it with ``plt.show()``.

Taught in notebook 00 (sections "The data" and "Reading a validation plot").
"""
from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import torch

from .metrics import pearson, spearman

STYLE = {
    "figure.figsize": (6.0, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
"""Matplotlib settings applied by :func:`use_style`: readable on screen and in print."""


def use_style() -> None:
    """Apply :data:`STYLE` and, inside Jupyter, show figures inline as PNG (not SVG: smaller notebooks)."""
    matplotlib.rcParams.update(STYLE)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")


def scatter_predicted_vs_actual(pred, actual, ax=None, title: str | None = None, *,
                                xlabel: str = "predicted change of the test loss",
                                ylabel: str = "actual change (re-run both stages)", label: str | None = None):
    """Scatter of predicted [n] against actual [n] changes, with the line y = x and both correlations.

    The legend reads e.g. ``"n = 100: Pearson 0.97, Spearman 0.95"``; a perfect prediction lies on y = x.
    Both axes get the same limits so that the diagonal is at 45°. Returns the axes.
    """
    pred = torch.as_tensor(pred).detach().cpu().double().reshape(-1)
    actual = torch.as_tensor(actual).detach().cpu().double().reshape(-1)
    r, rho = pearson(pred, actual), spearman(pred, actual)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 5.0))
    text = f"n = {len(pred)}: Pearson {r:.2f}, Spearman {rho:.2f}"
    ax.scatter(pred, actual, s=18, alpha=0.75, label=f"{label}, {text}" if label else text)
    lo, hi = float(torch.minimum(pred.min(), actual.min())), float(torch.maximum(pred.max(), actual.max()))
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, ls="--", label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best")
    return ax


def image_grid(images, titles: Sequence[str] | None = None, ncols: int | None = None, *,
               row_labels: Sequence[str] | None = None, scale: float = 1.2, suptitle: str | None = None):
    """Show images [k, C, H, W] (C = 1 grey or 3 RGB; floats in [0, 1] or uint8) in a grid; returns the figure.

    Float images outside [0, 1] (e.g. standardised ones) are min-max rescaled per image for display.
    ``titles`` (k strings) go above the images, ``row_labels`` (one per row) left of each row; ``ncols``
    defaults to min(k, 10); each cell is ``scale`` inches wide.
    """
    images = torch.as_tensor(images).detach().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [k, 1 or 3, H, W], got shape {tuple(images.shape)}.")
    k = len(images)
    if titles is not None and len(titles) != k:
        raise ValueError(f"{len(titles)} titles for {k} images.")
    if images.dtype == torch.uint8:
        images = images.double() / 255
    images = images.double()
    ncols = ncols or min(k, 10)
    nrows = max(1, -(-k // ncols))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows.")
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if row_labels is not None and i % ncols == 0:
            ax.text(-0.1, 0.5, row_labels[i // ncols], transform=ax.transAxes, ha="right", va="center")
        if i >= k:
            continue
        img = images[i]
        if img.min() < 0 or img.max() > 1:
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
