"""Analyses computed on a cpu worker and awaited: explore a dataset, report on a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scheduler.cli.args import JsonOpt, OutOpt, parse_id
from scheduler.cli.render import console, emit, err_console, show_explore, show_report
from shared.errors import SpecError
from shared.spec import ReportSpec, default

commands = typer.Typer()


@commands.command()
def explore(
    dataset: Annotated[str, typer.Argument(help="Dataset to explore: iris.")],
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Statistics and plots of a dataset (iris), computed on a cpu worker; waits for it.

    Per attribute, overall and per class: min, max, mean, sample sd and variance
    (ddof=1), and the 10/25/50/75/90th percentiles; also the sample covariance.
    --out DIR writes sepal-scatter.png, pairplot.png, stats.csv and covariance.csv.
    """
    from scheduler import analysis
    from shared.dispatch import send_job

    analysis.check_out_dir(out)
    job_id = analysis.plan_explore(dataset)
    send_job(job_id)
    analysis.wait(job_id, err_console, quiet=as_json)
    result = analysis.fetch(job_id)
    written = analysis.write_files(out, result.files) if out is not None else []
    if as_json:
        emit({"job": job_id, **result.summary, "files": sorted(result.files),
              "written": [str(p) for p in written]}, True)
        return
    show_explore(result.summary)
    where = f"; wrote {len(written)} files to {out}" if written else ""
    console.print(f"job {job_id}: {result.summary['n']} rows of {dataset}{where}",
                  highlight=False)


@commands.command()
def report(
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for index.html and its PNGs (created if missing).")],
    run_id: Annotated[str | None, typer.Argument(help="Id of a finished training run.")
                      ] = None,
    sweep: Annotated[int | None, typer.Option(
        help="Report on this sweep instead of a run: Optuna's optimization history and "
             "parameter importances, and the trials.")] = None,
    limit: Annotated[int, typer.Option(
        help="Test items to read, at most (the first ones, in shard order).")
    ] = default(ReportSpec, "limit"),
    as_json: JsonOpt = False,
) -> None:
    """Training curves, a grid of test predictions and per-position confusion
    matrices of a finished run, with an index.html; or, with --sweep, a sweep's
    optimization history and parameter importances. Rendered on a cpu worker."""
    from scheduler import analysis
    from shared.dispatch import send_job

    if (run_id is None) == (sweep is None):
        raise SpecError("report on a RUN or on --sweep ID, one of them")
    rid = None if run_id is None else parse_id(run_id, "run")
    analysis.check_out_dir(out)
    if sweep is not None:
        job_id = analysis.plan_sweep_report(sweep)
    elif rid is not None:
        job_id = analysis.plan_report(rid, limit)
    send_job(job_id)
    analysis.wait(job_id, err_console, quiet=as_json)
    result = analysis.fetch(job_id)
    written = analysis.write_files(out, result.files)
    s = result.summary
    if as_json:
        # The confusion matrices are in summary.json in the folder; a script reading
        # this line wants the headline numbers and where the files went.
        emit({"job": job_id, **{k: v for k, v in s.items() if k != "confusion"},
              "out": str(out), "files": [p.name for p in written]}, True)
    elif rid is None:
        console.print(f"sweep {sweep}: {len(s['trials'])} trials; wrote "
                      f"{out / 'index.html'}", highlight=False)
    else:
        show_report(rid, s, str(out / "index.html"))
