"""The report of a finished training run: curves, a prediction grid, confusion
matrices and an HTML page that shows them together.

Everything here is a plain function of numbers, shard items and predictions; the
SQL and model loading around it live in ``workers.jobs.analyses``. Files are named
``curves.png``, ``grid.png`` (image datasets only), ``confusion.png`` and
``index.html``, which links the others by relative names, so the folder can be
opened from disk or served as is.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot`` (no global state, no GUI backend in a worker).
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from shared.images import load_rgb_bytes
from shared.kinds import kind_of
from shared.shardfmt import Item

METRICS = ("loss", "char_acc", "seq_acc")
IMAGE_EXTS = ("pgm", "png", "jpg", "jpeg")
GRID_MAX = 32  # test images shown in the grid
GRID_COLUMNS = 8
# Above this many labels a confusion matrix is too dense for per-cell numbers.
ANNOTATE_MAX_LABELS = 12
RED, BLACK, GREY = "#d62728", "#222222", "#777777"


@dataclass
class Report:
    """What reporting on a run produced: a JSON-able summary and named files."""

    summary: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" text chunk: the same run gives the same bytes, hence one artifact.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def has_images(kind: str, items: Sequence[Item]) -> bool:
    """True when the items are pictures that a grid can show (not audio clips)."""
    return kind_of(kind).images and all(it.ext.lower() in IMAGE_EXTS for it in items)


def curves_png(metrics: Sequence[dict[str, Any]]) -> bytes:
    """PNG of loss, char_acc and seq_acc per epoch, train and val lines, with the
    test value (measured once, after the last epoch) as a star.

    ``metrics`` are rows ``{"epoch", "split", "name", "value"}`` as the metrics table
    holds them.
    """
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, len(METRICS), squeeze=False)[0]
    for ax, name in zip(axes, METRICS, strict=True):
        for split, style in (("train", "o-"), ("val", "s--")):
            pts = sorted((m["epoch"], m["value"]) for m in metrics
                         if m["split"] == split and m["name"] == name)
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], style, label=split)
        test = [(m["epoch"], m["value"]) for m in metrics
                if m["split"] == "test" and m["name"] == name]
        if test:
            ax.plot([test[0][0]], [test[0][1]], "*", markersize=13, label="test")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center",
                    transform=ax.transAxes, color=GREY)
    fig.tight_layout()
    return _png(fig)


def grid_png(items: Sequence[Item], predictions: Sequence[tuple[str, float]]) -> bytes:
    """PNG of the first ``GRID_MAX`` test images, each with its true and predicted
    text. A wrong character is red, and so is the frame of an image read wrongly.

    Raises InputError for an item that is not a readable image.
    """
    n = min(len(items), GRID_MAX)
    cols = max(1, min(GRID_COLUMNS, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(2.1 * cols, 1.75 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    fontsize = 10
    advance = 0.61 * fontsize  # points per character of DejaVu Sans Mono
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.set_axis_off()
            continue
        item, (pred, _conf) = items[k], predictions[k]
        ax.imshow(np.asarray(load_rgb_bytes(item.data, f"test item {item.index}")))
        wrong = pred != item.label
        for spine in ax.spines.values():
            spine.set_color(RED if wrong else GREY)
            spine.set_linewidth(2.5 if wrong else 0.8)
        ax.set_title(f"true {item.label}", fontsize=fontsize, family="monospace",
                     color=BLACK, pad=3)
        # Character by character, so that only the wrong ones are red.
        ax.annotate("pred", xy=(0, 0), xycoords="axes fraction", xytext=(0, -3),
                    textcoords="offset points", va="top", fontsize=fontsize,
                    family="monospace", color=BLACK)
        for i, ch in enumerate(pred):
            ok = i < len(item.label) and item.label[i] == ch
            ax.annotate(ch, xy=(0, 0), xycoords="axes fraction",
                        xytext=((5 + i) * advance, -3), textcoords="offset points",
                        va="top", fontsize=fontsize, family="monospace",
                        color=BLACK if ok else RED, fontweight="normal" if ok else "bold")
    fig.suptitle(f"first {n} test images: true text above, prediction below "
                 "(mistakes in red)", fontsize=10)
    fig.tight_layout(h_pad=1.6)
    return _png(fig)


def confusion(labels: Sequence[str], predictions: Sequence[str], charset: str
              ) -> tuple[list[np.ndarray], str, int]:
    """Per-position confusion matrices of true against predicted characters.

    Only pairs of equal length are counted, position by position; a prediction of
    another length has no position-wise meaning. Returns (matrices, axis characters,
    number of pairs left out for a length mismatch). Matrix ``p`` is (C, C) counts,
    row the true character, column the predicted one, both in the order of the
    returned characters: the charset first, then any other character seen.
    """
    seen = {c for t in (*labels, *predictions) for c in t}
    chars = charset + "".join(sorted(seen - set(charset)))
    pos = {c: i for i, c in enumerate(chars)}
    pairs = [(t, p) for t, p in zip(labels, predictions, strict=True) if len(t) == len(p)]
    length = max((len(t) for t, _ in pairs), default=0)
    mats = [np.zeros((len(chars), len(chars)), dtype=np.int64) for _ in range(length)]
    for t, p in pairs:
        for i, (a, b) in enumerate(zip(t, p, strict=True)):
            mats[i][pos[a], pos[b]] += 1
    return mats, chars, len(labels) - len(pairs)


def confusion_png(mats: Sequence[np.ndarray], chars: str, mismatched: int) -> bytes:
    """PNG of one confusion matrix per position (rows true, columns predicted)."""
    n = len(mats)
    cols = max(1, min(4, n))
    rows = max(1, -(-n // cols))
    side = 3.2 if len(chars) <= 20 else 5.0
    fig = Figure(figsize=(side * cols + 0.6, side * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    ticks = list(range(len(chars))) if len(chars) <= 40 else []
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.set_axis_off()
            if n == 0:
                ax.text(0.5, 0.5, "no prediction had the true length", ha="center",
                        va="center", transform=ax.transAxes, color=GREY)
            continue
        m = mats[k]
        ax.imshow(m, cmap="Blues", interpolation="nearest")
        ax.set_title(f"position {k + 1}", fontsize=10)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_xticks(ticks, [chars[i] for i in ticks], fontsize=7)
        ax.set_yticks(ticks, [chars[i] for i in ticks], fontsize=7)
        if len(chars) <= ANNOTATE_MAX_LABELS:
            top = m.max() or 1
            for (r, c), v in np.ndenumerate(m):
                if v:
                    ax.text(c, r, str(v), ha="center", va="center", fontsize=6,
                            color="white" if v > top / 2 else BLACK)
    note = (f"; {mismatched} prediction{'s' if mismatched != 1 else ''} of another length "
            "left out" if mismatched else "")
    fig.suptitle(f"confusion per position (rows true, columns predicted){note}",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


def index_html(summary: dict[str, Any], files: Sequence[str]) -> bytes:
    """The page that shows the report's PNGs (by relative links) and its numbers.

    Its small script marks ``<body data-images-loaded="k/n">`` once the page has
    loaded, ``k`` being the images that really decoded: a headless browser, and the
    test, can tell a page with broken images from a good one.
    """
    e = html.escape
    captions = {
        "curves.png": "Training curves: loss, character and sequence accuracy per epoch",
        "grid.png": "Test images with true and predicted text; mistakes in red",
        "confusion.png": "Confusion of true and predicted characters, per position",
    }
    figures = "\n".join(
        f'<figure><a href="{e(name)}"><img src="{e(name)}" alt="{e(captions[name])}">'
        f"</a><figcaption>{e(captions[name])}</figcaption></figure>"
        for name in ("curves.png", "grid.png", "confusion.png") if name in files
    )
    s = summary
    stored = s.get("test_metrics") or {}
    rows = [
        ("run", s["run"]), ("dataset", f"{s['dataset']} ({s['kind']})"),
        ("epochs", s["epochs"]),
        ("test items read", f"{s['evaluated']} of {s['test_items']}"),
        ("sequence accuracy", f"{s['seq_acc']:.4f}"),
        ("character accuracy (equal lengths)", f"{s['char_acc']:.4f}"),
        ("per position", ", ".join(f"{v:.4f}" for v in s["per_position_acc"])),
        ("length mismatches", s["length_mismatch"]),
        ("stored test metrics", ", ".join(f"{k} {v:.4f}" for k, v in sorted(stored.items()))),
    ]
    table = "\n".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    title = f"captrain report: run {s['run']} on {s['dataset']}"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0 0 2em 0; }}
img {{ max-width: 100%; border: 1px solid #ccc; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<table>
{table}
</table>
{figures}
<script>
// Marks the page once every image has either decoded or failed, for headless checks.
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-images-loaded", ok.length + "/" + imgs.length);
}});
</script>
</body>
</html>
"""
    return page.encode()


def build_report(*, run_id: int, dataset: str, kind: str, charset: str, epochs: int,
                 metrics: Sequence[dict[str, Any]], items: Sequence[Item],
                 predictions: Sequence[tuple[str, float]], test_items: int) -> Report:
    """Render the report of run ``run_id`` from its metric rows and its predictions
    of test ``items`` (``test_items`` is how many the test split holds in all).

    Returns the summary and files; the grid is left out for items that are not
    images. Raises InputError for an image item that cannot be decoded.
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    labels = [it.label for it in items]
    texts = [p for p, _ in predictions]
    mats, chars, mismatched = confusion(labels, texts, charset)
    equal = len(labels) - mismatched
    correct = [int(np.trace(m)) for m in mats]
    counted = [int(m.sum()) for m in mats]
    summary: dict[str, Any] = {
        "run": run_id, "dataset": dataset, "kind": kind, "epochs": epochs,
        "test_items": test_items, "evaluated": len(items),
        "seq_acc": sum(t == p for t, p in zip(labels, texts, strict=True)) / max(len(items), 1),
        "char_acc": sum(correct) / max(sum(counted), 1),
        "per_position_acc": [c / max(n, 1) for c, n in zip(correct, counted, strict=True)],
        "equal_length": equal, "length_mismatch": mismatched,
        "test_metrics": {m["name"]: m["value"] for m in metrics if m["split"] == "test"},
        "confusion": {"chars": chars, "rows": "true", "columns": "predicted",
                      "matrices": [m.tolist() for m in mats]},
        "grid": has_images(kind, items) and bool(items),
    }
    files = {"curves.png": curves_png(metrics)}
    if summary["grid"]:
        files["grid.png"] = grid_png(items, predictions)
    files["confusion.png"] = confusion_png(mats, chars, mismatched)
    files["index.html"] = index_html(summary, list(files))
    files["summary.json"] = json.dumps(summary, indent=2, sort_keys=True).encode()
    return Report(summary, files)
