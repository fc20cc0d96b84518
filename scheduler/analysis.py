"""Explore and report jobs on the scheduler side: plan, send, wait, fetch, write out.

As for every job, the rows are committed before the message is sent, so a message
never names a row that does not exist. The worker's answer comes back through SQL
(an ``analyses`` row and its files), never through a Celery result backend.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import select

from scheduler.submit import enqueue_analysis
from shared.artifacts import read_verified
from shared.db import session_scope
from shared.errors import CaptrainError, InputError, NotFound, SpecError, StateError
from shared.records import finished_run
from shared.schema import DONE, Analysis, Job, Model
from shared.settings import get_settings

# What `captrain explore` can explore. The worker checks the same list
# (workers.explore.DATASETS); the scheduler does not import worker code.
EXPLORE_DATASETS = ("iris",)
# Test items a report reads by default, and at most: a report is a look, not a
# re-evaluation of a million-item test split.
REPORT_LIMIT, REPORT_LIMIT_MAX = 1000, 100_000


@dataclass
class AnalysisResult:
    """A finished analysis as the CLI needs it: its job, summary and files' bytes."""

    job_id: int
    kind: str
    subject: str
    summary: dict[str, Any]
    files: dict[str, bytes]


def check_out_dir(out: Path | None) -> None:
    """Refuse an output path that can never be a folder, before anything is written.

    Raises InputError when ``out`` (or the nearest part of it that exists) is not a
    directory.
    """
    if out is None:
        return
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{probe} is not a directory; --out needs a folder")


def _record_job(kind: str, spec: dict[str, Any]) -> int:
    with session_scope() as s:
        job = Job(kind=kind, spec=spec, settings=get_settings().redacted())
        s.add(job)
        s.flush()
        return job.id


def plan_explore(dataset: str) -> int:
    """Write an explore job for ``dataset``. Returns the job id.

    Raises SpecError for a dataset explore does not know (nothing is written).
    """
    if dataset not in EXPLORE_DATASETS:
        raise SpecError(f"explore knows the dataset 'iris' only, not {dataset!r}")
    return _record_job("explore", {"dataset": dataset})


def plan_report(run_id: int, limit: int = REPORT_LIMIT) -> int:
    """Write a report job for run ``run_id``, reading up to ``limit`` test items.

    Returns the job id. Raises SpecError for a bad limit, NotFound for an unknown run,
    StateError for a run that has not finished, has no stored model or is a tabular
    (Iris) run; in each case nothing is written.
    """
    if not 1 <= limit <= REPORT_LIMIT_MAX:
        raise SpecError(f"--limit must be between 1 and {REPORT_LIMIT_MAX}, not {limit}")
    with session_scope() as s:
        _, dataset = finished_run(s, run_id)
        if s.execute(select(Model.id).where(Model.run_id == run_id)).first() is None:
            raise StateError(f"run {run_id} has no stored model")
        if dataset.kind == "iris":
            # A tabular model has no test items to show and no characters to confuse.
            raise StateError(f"run {run_id} classifies Iris rows; a report shows runs on "
                             f"images or audio (see `captrain run {run_id}`)")
        name = dataset.name
    # "dataset" names the job in `captrain jobs`, as it does for training.
    return _record_job("report", {"run": run_id, "dataset": name, "limit": limit})


def enqueue(kind: str, job_id: int) -> None:
    """Send the explore or report task of ``job_id``. Raises BrokerUnavailable."""
    enqueue_analysis(kind, job_id)


def wait(job_id: int, console: Console, quiet: bool = False) -> None:
    """Block until the job ends, with a spinner unless ``quiet``.

    Raises CaptrainError with the job's own error if it failed or was cancelled.
    """
    from scheduler import watch

    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        kind = job.kind
    # The job has no shards to count, so a spinner says more than a 0/0 bar.
    spinner = console.status(f"job {job_id} {kind}: waiting for a cpu worker to finish it")
    with nullcontext() if quiet else spinner:
        final = watch.wait(job_id, console, quiet=True)
    if final != DONE:
        with session_scope() as s:
            job = s.get(Job, job_id)
            error = job.error if job is not None else None
        raise CaptrainError(f"{kind} job {job_id} {final}" + (f": {error}" if error else ""))


def fetch(job_id: int) -> AnalysisResult:
    """Load the analysis of a finished job with the bytes of its files (hash-checked).

    Raises NotFound when the job has no analysis, ArtifactError for a file that fails
    its sha256 check.
    """
    with session_scope() as s:
        row = s.execute(select(Analysis).where(Analysis.job_id == job_id)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"job {job_id} has no analysis")
        files = {f.name: read_verified(s, f.sha256) for f in row.files}
        return AnalysisResult(job_id, row.kind, row.subject, dict(row.summary), files)


def write_files(out: Path, files: dict[str, bytes]) -> list[Path]:
    """Write each file into folder ``out`` (created if missing). Returns the paths.

    Raises InputError when the folder cannot be written, or a stored name is not a
    plain file name (it would escape ``out``).
    """
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in sorted(files.items()):
            if Path(name).name != name or name in ("", ".", ".."):
                raise InputError(f"stored file name {name!r} is not a plain file name")
            path = out / name
            path.write_bytes(data)
            paths.append(path)
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    return paths
