"""Exploring a dataset: summary statistics and plots of Fisher's Iris.

The data are scikit-learn's bundled copy (``sklearn.datasets.load_iris``): it ships
inside the wheel, so a worker needs no network. It is the corrected Fisher data,
the same as R's ``iris``; the UCI file differs in two values of sample 35 and 38.

Conventions, also written into the summary so that a reader of the JSON or the CSV
need not guess:

- standard deviation, variance and covariance are *sample* statistics (ddof=1,
  divisor n-1), as R's ``sd``/``var``/``cov`` and the UCI description give them;
- percentiles interpolate linearly between order statistics (numpy's default,
  R's type 7), so the 50th percentile is the median.

Plots are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never
through ``pyplot``: no global figure state, no GUI backend, safe in a worker process.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.errors import SpecError
from shared.kinds import EXPLORABLE

PERCENTILES = (10, 25, 50, 75, 90)
DDOF = 1  # sample statistics: divisor n-1
STAT_COLUMNS = ("min", "max", "mean", "sample_sd", "sample_var",
                *(f"p{q}" for q in PERCENTILES))
# One colour per species, fixed so that the scatter and the pair plot agree.
COLOURS = ("#1b9e77", "#d95f02", "#7570b3")


@dataclass
class Exploration:
    """What exploring a dataset produced: a JSON-able summary and named files."""

    summary: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def check_dataset(name: str) -> str:
    """Return ``name`` if it can be explored. Raises SpecError otherwise."""
    if name not in EXPLORABLE:
        raise SpecError(f"explore knows the dataset {' or '.join(map(repr, EXPLORABLE))} "
                        f"only, not {name!r}")
    return name


def column_stats(values: np.ndarray) -> dict[str, float]:
    """Min, max, mean, sample sd and variance (ddof=1) and percentiles of a 1-D array."""
    pct = np.percentile(values, PERCENTILES)  # linear interpolation (R type 7)
    out = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "sample_sd": float(values.std(ddof=DDOF)),
        "sample_var": float(values.var(ddof=DDOF)),
    }
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, pct, strict=True)})
    return out


def iris_statistics(data: np.ndarray, target: np.ndarray, attributes: list[str],
                    classes: list[str]) -> dict[str, Any]:
    """Statistics of each attribute, over all rows and per class, and the covariance.

    ``data`` is (N, 4) measurements in cm, ``target`` (N,) class indices into
    ``classes``. Returns the summary dict stored as the analysis summary.
    """
    rows = []
    groups = [("all", np.ones(len(target), dtype=bool))]
    groups += [(name, target == k) for k, name in enumerate(classes)]
    for j, attr in enumerate(attributes):
        for cls, mask in groups:
            rows.append({"attribute": attr, "class": cls, **column_stats(data[mask, j])})
    cov = np.cov(data, rowvar=False, ddof=DDOF)  # (4, 4)
    return {
        "dataset": "iris",
        "n": len(target),
        "attributes": attributes,
        "classes": classes,
        "counts": {name: int((target == k).sum()) for k, name in enumerate(classes)},
        "units": "cm",
        "ddof": DDOF,
        "conventions": "sample_sd, sample_var and covariance divide by n-1 (ddof=1); "
                       "percentiles interpolate linearly (numpy default, R type 7)",
        "stats": rows,
        "covariance": {"attributes": attributes, "ddof": DDOF,
                       "matrix": [[float(v) for v in row] for row in cov]},
    }


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" text chunk: the bytes depend on the data only, so a second run of
    # the same job stores the same artifact.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def scatter_png(data: np.ndarray, target: np.ndarray, attributes: list[str],
                classes: list[str], x: int = 0, y: int = 1) -> bytes:
    """PNG of attribute ``x`` against ``y`` (sepal length vs width), one colour per class."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for k, name in enumerate(classes):
        m = target == k
        ax.scatter(data[m, x], data[m, y], s=22, color=COLOURS[k % len(COLOURS)],
                   label=name, edgecolors="white", linewidths=0.4)
    ax.set_xlabel(attributes[x])
    ax.set_ylabel(attributes[y])
    ax.set_title(f"Iris: {attributes[x]} vs {attributes[y]}")
    ax.legend(title="species")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def pairplot_png(data: np.ndarray, target: np.ndarray, attributes: list[str],
                 classes: list[str]) -> bytes:
    """PNG of the pair plot: every attribute against every other, histograms on the
    diagonal, one colour per class."""
    n = data.shape[1]
    fig = Figure(figsize=(2.4 * n, 2.4 * n))
    axes = fig.subplots(n, n, squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i][j]
            for k, name in enumerate(classes):
                m = target == k
                colour = COLOURS[k % len(COLOURS)]
                if i == j:
                    ax.hist(data[m, j], bins=12, alpha=0.55, color=colour, label=name)
                else:
                    ax.scatter(data[m, j], data[m, i], s=6, color=colour, label=name)
            if i == n - 1:
                ax.set_xlabel(attributes[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(attributes[i], fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.suptitle("Iris pair plot (cm)", y=0.99)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965),
               ncol=len(classes), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _png(fig)


def stats_csv(summary: dict[str, Any]) -> bytes:
    """The statistics table as CSV: one row per (attribute, class)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["attribute", "class", "min", "max", "mean", "sd_sample_ddof1",
                "var_sample_ddof1", *(f"p{q}" for q in PERCENTILES)])
    for r in summary["stats"]:
        w.writerow([r["attribute"], r["class"], *(repr(r[c]) for c in STAT_COLUMNS)])
    return buf.getvalue().encode()


def covariance_csv(summary: dict[str, Any]) -> bytes:
    """The sample covariance matrix (ddof=1) as CSV, attributes as header and first column."""
    cov = summary["covariance"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["covariance_sample_ddof1", *cov["attributes"]])
    for attr, row in zip(cov["attributes"], cov["matrix"], strict=True):
        w.writerow([attr, *(repr(v) for v in row)])
    return buf.getvalue().encode()


def explore(name: str) -> Exploration:
    """Explore the dataset ``name``: statistics, a scatter plot, a pair plot and CSVs.

    Returns the summary and the files (``sepal-scatter.png``, ``pairplot.png``,
    ``stats.csv``, ``covariance.csv``). Raises SpecError for a dataset other than iris.
    """
    import sklearn
    from sklearn.datasets import load_iris

    check_dataset(name)
    iris = load_iris()
    data = np.asarray(iris.data, dtype=np.float64)  # (150, 4), cm
    target = np.asarray(iris.target)  # (150,)
    attributes = [str(a) for a in iris.feature_names]
    classes = [str(c) for c in iris.target_names]
    summary = iris_statistics(data, target, attributes, classes)
    summary["source"] = f"sklearn.datasets.load_iris (scikit-learn {sklearn.__version__})"
    files = {
        "sepal-scatter.png": scatter_png(data, target, attributes, classes),
        "pairplot.png": pairplot_png(data, target, attributes, classes),
        "stats.csv": stats_csv(summary),
        "covariance.csv": covariance_csv(summary),
    }
    return Exploration(summary, files)
