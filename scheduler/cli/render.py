"""What the commands print: rich tables for people, JSON for scripts, closing lines.

Nothing here reads SQL or sends a message; the commands pass in what they loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

# Columns a table never cuts: squeezed to "runni…" or "demo-2…" they say nothing. The
# others fold, and a narrow terminal drops the less important ones (see _fit).
WHOLE = frozenset({"id", "job", "kind", "name", "dataset", "model", "status", "index",
                   "split", "epoch", "statistic"})
# The width a folding column asks for when deciding whether a table fits: enough for
# its header ("test_seq_acc") and a number whole.
FOLD_MIN = 12


def emit(data: Any, as_json: bool, columns: list[str] | None = None, title: str = "",
         optional: Sequence[str] = ()) -> None:
    """Print ``data`` (a dict or a list of dicts) as JSON, or as a table of ``columns``.

    When the table does not fit the terminal, columns empty in every row go first,
    then the ``optional`` ones, least important first.
    """
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    cols = columns or (list(rows[0].keys()) if rows else [])
    cells = [["" if r.get(c) is None else fmt(r.get(c)) for c in cols] for r in rows]
    keep = _fit(cols, cells, console.width, optional)
    table = Table(title=title or None)
    for i in keep:
        c = cols[i]
        if c in WHOLE:
            table.add_column(c, no_wrap=True)
        else:
            table.add_column(c, overflow="fold")
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    console.print(table)


def _fit(cols: list[str], cells: list[list[str]], width: int,
         optional: Iterable[str]) -> list[int]:
    """The indices of the columns to show in ``width`` characters."""
    def need(i: int) -> int:
        longest = max([len(cols[i]), *(len(row[i]) for row in cells)])
        return longest if cols[i] in WHOLE else min(longest, FOLD_MIN)

    keep = list(range(len(cols)))
    empty = [i for i in keep if cols[i] not in WHOLE and not any(row[i] for row in cells)]
    named = [cols.index(c) for c in optional if c in cols]
    for drop in [*empty, *(i for i in named if i not in empty)]:
        # Each column takes its text, a space either side and a border.
        if sum(need(i) + 3 for i in keep) + 1 <= width:
            break
        keep.remove(drop)
    return keep


def fmt(v: Any) -> str:
    """A cell: floats to four places, the rest as text."""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def show_settings(data: dict[str, Any]) -> None:
    """The settings in use, one per line."""
    table = Table("setting", "value")
    for k, v in data.items():
        table.add_row(k, str(v))
    console.print(table)


def test_line(t: dict[str, Any]) -> str:
    """A run's test result in words: cross-validated accuracy for Iris, whole-sequence
    and per-character accuracy for everything read as text."""
    if "cv_acc" in t:
        return (f"cross-validated accuracy {t['cv_acc']:.4f} ± {t['cv_std']:.4f} "
                f"over {t['folds']} folds")
    return f"test seq_acc {t['seq_acc']:.4f}, char_acc {t['char_acc']:.4f}"


def job_summary(detail: dict[str, Any], final: str, took: float) -> str:
    """The closing line of a followed job: what it made, how fast, or why it stopped."""
    line = f"job {detail['id']} {detail['kind']} {final} after {took:.1f}s"
    if detail["shard_list"]:
        items = sum(s["count"] for s in detail["shard_list"] if s["status"] == "done")
        workers = len({s["worker"] for s in detail["shard_list"] if s["worker"]})
        line += (f": {detail['shards_done']}/{detail['shards']} shards, {items} items "
                 f"({items / max(took, 1e-9):.0f}/s) by {workers} worker(s)")
    if "run" in detail and detail["run"]["test"]:
        line += f": {test_line(detail['run']['test'])}"
    if detail.get("error"):
        line += f": {detail['error']}"
    return line


def show_job(d: dict[str, Any]) -> None:
    """A job, its shards and, for a train job, its run."""
    # The shards table below says what the shard counts do, when the error needs room.
    emit({k: v for k, v in d.items() if k in ("id", "kind", "name", "status",
                                              "shards_done", "shards", "error")}, False,
         optional=["shards", "shards_done"])
    if d["shard_list"]:
        emit(d["shard_list"], False, ["index", "split", "count", "status", "worker",
                                      "attempts", "error"], "shards")
    if "run" in d:
        show_run(d["run"])


def show_run(d: dict[str, Any]) -> None:
    """A run: its row, per-epoch metrics and test result."""
    emit({k: d[k] for k in ("id", "dataset", "model", "status", "device", "epochs_done",
                            "epochs", "resumed_from", "error")}, False,
         optional=["device", "resumed_from", "epochs"])
    if d["per_epoch"]:
        emit(d["per_epoch"], False, ["epoch", "train_loss", "train_seq_acc", "val_loss",
                                     "val_char_acc", "val_seq_acc"], "epochs")
    t = d["test"]
    if t and "cv_acc" in t:
        console.print(f"{test_line(t)}; per fold {[round(a, 4) for a in t['fold_acc']]}")
    elif t:
        console.print(f"{test_line(t)}, per position "
                      f"{[round(p, 4) for p in t['per_position']]} ({t['count']} items)")


def show_sweep(d: dict[str, Any]) -> None:
    """A sweep: its trials, one row each with what was drawn, and its best."""
    c = d["counts"]
    console.print(f"sweep {d['sweep']} on {d['dataset']}: {d['status']}; {d['metric']} "
                  f"({d['direction']}), {d['sampler']} sampler, {d['pruner']} pruner; "
                  f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed, "
                  f"{c['running']} running of {d['trials_wanted']}", highlight=False)
    rows = [{"trial": t["number"], "state": t["state"], "value": t["value"],
             "params": " ".join(f"{k}={fmt(v)}" for k, v in t["params"].items()),
             "run": t["run"], "epochs": t["epochs"]} for t in d["trials"]]
    if rows:
        emit(rows, False, ["trial", "state", "value", "params", "run", "epochs"], "trials",
             optional=["epochs", "run"])
    b = d["best"]
    if b is not None:
        console.print(f"best: trial {b['number']} (run {b['run']}), {d['metric']} "
                      f"{b['value']:.4f}, {b['params']}; model {b['model']}", highlight=False)
    if d["error"]:
        console.print(f"error: {d['error']}", highlight=False)


def show_explore(summary: dict[str, Any]) -> None:
    """Explore's statistics: one table per attribute, and the covariance."""
    # Statistics down and classes across: it fits 80 columns.
    labels = {"min": "min", "max": "max", "mean": "mean", "sample_sd": "sd (sample, ddof=1)",
              "sample_var": "var (sample, ddof=1)"}
    classes = ["all", *summary["classes"]]
    for attr in summary["attributes"]:
        by_class = {r["class"]: r for r in summary["stats"] if r["attribute"] == attr}
        stats = [c for c in by_class["all"] if c not in ("attribute", "class")]
        rows = [{"statistic": labels.get(st, f"{st[1:]}th percentile"),
                 **{c: by_class[c][st] for c in classes}} for st in stats]
        emit(rows, False, ["statistic", *classes], f"{summary['dataset']}: {attr}")
    cov = summary["covariance"]
    names = [a.removesuffix(" (cm)") for a in cov["attributes"]]
    emit([{"": a, **dict(zip(names, row, strict=True))}
          for a, row in zip(names, cov["matrix"], strict=True)], False, ["", *names],
         "sample covariance (ddof=1), cm²")
    console.print("percentiles interpolate linearly between order statistics (R type 7)",
                  highlight=False)


def show_report(rid: int, s: dict[str, Any], index: str) -> None:
    """The line a finished report ends with."""
    console.print(
        f"report of run {rid} ({s['dataset']}): {s['evaluated']} of {s['test_items']} test "
        f"items, seq_acc {s['seq_acc']:.4f}, char_acc {s['char_acc']:.4f}, "
        f"{s['length_mismatch']} length mismatches; open {index}",
        highlight=False)
