"""The report of a sweep: Optuna's optimization history and parameter importances,
the trials as CSV, and an HTML page that shows them together.

The plots are Optuna's own matplotlib visualizations, drawn from the in-memory study
that ``workers.jobs.sweeps`` rebuilds from SQL. They draw through ``pyplot``, so this
module selects the Agg backend (no GUI in a worker) and closes each figure once it
is saved.
"""

from __future__ import annotations

import csv
import html
import io
import json
import warnings
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna

from workers.report import Report


def _png(ax: Any) -> bytes:
    fig = ax.figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _csv(summary: dict[str, Any]) -> bytes:
    names = sorted({k for t in summary["trials"] for k in t["params"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "state", "value", "epochs", "run", *names])
    for t in summary["trials"]:
        writer.writerow([t["number"], t["state"], t["value"], t["epochs"], t["run"],
                         *(t["params"].get(n) for n in names)])
    return out.getvalue().encode()


def build_sweep_report(summary: dict[str, Any], study: optuna.Study) -> Report:
    """Files ``history.png``, ``importances.png`` (once two trials are complete and a
    parameter varies among them), ``trials.csv``, ``summary.json`` and ``index.html``
    for sweep ``summary`` (``shared.sweeps.summary``) and its ``study``."""
    files: dict[str, bytes] = {"trials.csv": _csv(summary)}
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib API experimental
        files["history.png"] = _png(
            optuna.visualization.matplotlib.plot_optimization_history(study))
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        try:
            if len(complete) < 2:
                raise ValueError("fewer than two complete trials")
            files["importances.png"] = _png(
                optuna.visualization.matplotlib.plot_param_importances(study))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            notes.append(f"no parameter importances: {exc}")
    body = {**summary, "notes": notes}
    files["summary.json"] = json.dumps(body, indent=2, default=str).encode()
    files["index.html"] = _html(body, sorted(f for f in files if f.endswith(".png"))).encode()
    return Report(summary=body, files=files)


def _html(summary: dict[str, Any], pngs: list[str]) -> str:
    best = summary["best"]
    head = (f"best trial {best['number']} (run {best['run']}): {summary['metric']} "
            f"{best['value']:.4f}, {json.dumps(best['params'])}" if best else "no complete trial")
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            t["number"], t["state"], t["value"], t["epochs"], t["run"],
            json.dumps(t["params"]))) + "</tr>" for t in summary["trials"])
    images = "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in pngs)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in summary["notes"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sweep "
            f"{summary['sweep']}</title></head><body><h1>sweep {summary['sweep']} on "
            f"{html.escape(summary['dataset'])}</h1><p>{html.escape(head)}</p>{images}"
            f"{notes}<table border='1'><tr><th>trial</th><th>state</th><th>value</th>"
            f"<th>epochs</th><th>run</th><th>params</th></tr>{rows}</table></body></html>")
