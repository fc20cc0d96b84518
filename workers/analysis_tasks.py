"""Celery tasks for explore and report jobs: thin wrappers over ``workers.analysis``.

Errors are mapped as for every other task (``workers.tasks._run``): a transient one
retries with backoff, any other marks the job failed with its message.
"""

from __future__ import annotations

from celery import Task

from shared.celery_app import EXPLORE, REPORT, app
from workers import analysis
from workers.tasks import _run, new_attempt


@app.task(name=EXPLORE, bind=True)
def explore(self: Task, job_id: int) -> int | None:
    """Compute the statistics and plots of explore job ``job_id``; returns the analysis id."""
    return _run(self, job_id, None,
                lambda: analysis.run_explore(job_id, new_attempt(self)))


@app.task(name=REPORT, bind=True)
def report(self: Task, job_id: int) -> int | None:
    """Render the report of report job ``job_id``; returns the analysis id."""
    return _run(self, job_id, None,
                lambda: analysis.run_report(job_id, new_attempt(self)))
