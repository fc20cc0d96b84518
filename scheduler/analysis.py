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

from shared import sweeps
from shared.artifacts import read_verified
from shared.db import session_scope
from shared.errors import CaptrainError, InputError, NotFound, SpecError, StateError
from shared.kinds import EXPLORABLE, kind_of
from shared.lookup import finished_run
from shared.schema import DONE, Analysis, Job, Model
from shared.settings import get_settings
from shared.spec import REPORT_LIMIT_MAX, ExploreSpec, ReportSpec, default, validate
from shared.state import get_job


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


def _record_job(kind: str, spec: dict[str, Any], dataset_id: int | None = None) -> int:
    with session_scope() as s:
        job = Job(kind=kind, spec=spec, settings=get_settings().redacted(),
                  dataset_id=dataset_id)
        s.add(job)
        s.flush()
        return job.id


def plan_explore(dataset: str) -> int:
    """Write an explore job for ``dataset``. Returns the job id.

    Raises SpecError for a dataset explore does not know (nothing is written).
    """
    if dataset not in EXPLORABLE:
        raise SpecError(f"explore knows the dataset {' or '.join(map(repr, EXPLORABLE))} "
                        f"only, not {dataset!r}")
    return _record_job("explore", validate(ExploreSpec, dataset=dataset).model_dump())


def plan_report(run_id: int, limit: int = default(ReportSpec, "limit")) -> int:
    """Write a report job for run ``run_id``, reading up to ``limit`` test items.

    Returns the job id. Raises SpecError for a bad limit, NotFound for an unknown run,
    StateError for a run that has not finished, has no stored model or is on a kind
    of dataset a report cannot show (Iris); in each case nothing is written.
    """
    if not 1 <= limit <= REPORT_LIMIT_MAX:
        raise SpecError(f"--limit must be between 1 and {REPORT_LIMIT_MAX}, not {limit}")
    spec = validate(ReportSpec, run=run_id, limit=limit)
    with session_scope() as s:
        _, dataset = finished_run(s, run_id)
        if s.execute(select(Model.id).where(Model.run_id == run_id)).first() is None:
            raise StateError(f"run {run_id} has no stored model")
        if not kind_of(dataset.kind).reportable:
            # A tabular model has no test items to show and no characters to confuse.
            raise StateError(f"run {run_id} classifies Iris rows; a report shows runs on "
                             f"images or audio (see `captrain run {run_id}`)")
        name, dataset_id = dataset.name, dataset.id
    spec = spec.model_copy(update={"dataset": name})
    return _record_job("report", spec.model_dump(), dataset_id)


def plan_sweep_report(sweep_id: int) -> int:
    """Write a report job for sweep ``sweep_id``: Optuna's optimization history and
    parameter importances. Returns the job id. Raises NotFound, or StateError for a
    job that is not a sweep or a sweep with no trial yet; nothing is written then."""
    with session_scope() as s:
        job = get_job(s, sweep_id)
        if job.kind != "sweep":
            raise StateError(f"job {sweep_id} is a {job.kind} job, not a sweep")
        if not sweeps.trials(s, sweep_id):
            raise StateError(f"sweep {sweep_id} has no trial yet")
        spec = validate(ReportSpec, sweep=sweep_id, dataset=job.spec["dataset"])
        dataset_id = job.dataset_id
    return _record_job("report", spec.model_dump(), dataset_id)


def wait(job_id: int, console: Console, quiet: bool = False) -> None:
    """Block until the job ends, with a spinner unless ``quiet``.

    Raises CaptrainError with the job's own error if it failed or was cancelled.
    """
    from scheduler import watch

    with session_scope() as s:
        kind = get_job(s, job_id).kind
    # The job has no shards to count, so a spinner says more than a 0/0 bar.
    spinner = console.status(f"job {job_id} {kind}: waiting for a cpu worker to finish it")
    with nullcontext() if quiet else spinner:
        final = watch.wait(job_id, console, quiet=True)
    if final != DONE:
        with session_scope() as s:
            error = get_job(s, job_id).error
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
