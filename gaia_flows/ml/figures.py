"""The classifier's figures, each drawn on a bare matplotlib ``Figure`` (no pyplot state, no
window, nothing to close), as :mod:`gaia_flows.maps` draws the sky maps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gaia_flows.layout import TRAINING_TABLE, StateLayout
from gaia_flows.maps import render_healpix
from gaia_flows.science import astrometric as astro


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def figure_png(figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (for metadata previews)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def confusion_figure(matrix: np.ndarray):
    """Hold-out confusion matrix, rows = training label, columns = prediction (bad, good)."""
    figure, axes = _figure((4, 3.5))
    axes.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{value}", ha="center", va="center", color="black")
    axes.set_xticks([0, 1], ["bad", "good"])
    axes.set_yticks([0, 1], ["bad", "good"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("training label")
    axes.set_title("hold-out confusion matrix")
    return figure


def importance_figure(importances: dict[str, float]):
    """Horizontal bars of the forest's feature importances, largest at the top."""
    ordered = sorted(importances.items(), key=lambda kv: kv[1])
    figure, axes = _figure((6, 5))
    axes.barh([k for k, _ in ordered], [v for _, v in ordered])
    axes.set_xlabel("mean decrease in impurity")
    axes.set_title("feature importances")
    return figure


def roc_figure(labels, probability, auc: float):
    """ROC curve on the hold-out, the positive class being a good solution."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), probability, pos_label=astro.GOOD)
    figure, axes = _figure((4, 4))
    axes.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    axes.plot([0, 1], [0, 1], ls="--", color="grey")
    axes.set_xlabel("false positive rate (bad called good)")
    axes.set_ylabel("true positive rate (good called good)")
    axes.legend(loc="lower right")
    return figure


def importance_table(importances: dict[str, float]) -> str:
    """Markdown table of feature importances, largest first."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(importances.items(), key=lambda kv: -kv[1]))
    return "| feature | importance |\n|---|---|\n" + rows


def training_sky_pngs(
    layout: StateLayout, source_id: np.ndarray, labels: np.ndarray, level: int
) -> dict[str, bytes]:
    """Galactic Mollweide maps of the good and bad training rows per pixel at ``level``,
    written under ``<home>/maps/`` and returned as PNG bytes by class name."""
    out = {}
    for name, value in (("good", astro.GOOD), ("bad", astro.BAD)):
        counts = astro.sky_counts(source_id[labels == value], level)
        path: Path = render_healpix(
            np.where(counts > 0, counts, np.nan),
            layout.maps / f"{TRAINING_TABLE}_{name}.png",
            title=f"training set: {int(counts.sum()):,} {name} solutions (level {level}, Galactic)",
            unit="sources per pixel",
            lo=1.0,
            hi=max(2.0, float(counts.max())),
            norm="log",
            coord=["C", "G"],
        )
        out[name] = path.read_bytes()
    return out
