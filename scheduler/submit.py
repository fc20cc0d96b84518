"""Sending task messages, after the rows they name are committed; and reconcile.

Messages carry ids only. If the broker is down at submission, the job stays
recorded in SQL and ``captrain reconcile`` sends its messages later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import group
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import select

from shared.celery_app import EXPLORE, GENERATE_SHARD, REPORT, SPLIT_SHARD, TRAIN, app
from shared.db import session_scope
from shared.errors import BrokerUnavailable
from shared.records import complete_if_analysed, complete_if_done
from shared.schema import DONE, PENDING, RUNNING, Job, Run, Shard

SHARD_TASKS = {"generate": GENERATE_SHARD, "split": SPLIT_SHARD}
# Jobs that are one task, with no shard or run rows: the task's result is their
# `analyses` row.
ANALYSIS_TASKS = {"explore": EXPLORE, "report": REPORT}


def _send(fn: Any, job_id: int) -> None:
    try:
        fn()
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise BrokerUnavailable(
            f"broker unreachable ({exc}); job {job_id} is recorded, "
            "run `captrain reconcile` once the broker is back"
        ) from exc


def enqueue_shards(kind: str, job_id: int, indices: Iterable[int]) -> int:
    """Send one shard task per index as a group. Returns how many were sent.

    An explore or report job has no shards: its one task is sent instead, whatever
    ``indices`` holds, so that ``captrain retry`` re-runs a reopened job of any kind
    but train through here. Raises BrokerUnavailable.
    """
    if kind in ANALYSIS_TASKS:
        enqueue_analysis(kind, job_id)
        return 1
    name = SHARD_TASKS[kind]
    indices = list(indices)
    # argsrepr is what Flower and `captrain workers` show instead of the bare ids.
    sigs = [
        app.signature(name, args=(job_id, i), immutable=True).set(
            argsrepr=f"job {job_id} shard {i}", kwargsrepr="{}")
        for i in indices
    ]
    if sigs:
        _send(lambda: group(sigs).apply_async(), job_id)
    return len(sigs)


def enqueue_train(run_id: int, job_id: int, time_limit: int) -> None:
    """Send the train task with its hard limit from the spec, and a soft limit a
    minute earlier: the task then fails cleanly, in Python, with its last epoch
    checkpoint kept, instead of being killed."""
    soft = max(5, time_limit - 60)
    _send(
        lambda: app.send_task(
            TRAIN, args=(run_id, job_id), time_limit=time_limit, soft_time_limit=soft,
            argsrepr=f"run {run_id} (job {job_id})", kwargsrepr="{}",
        ),
        job_id,
    )


def enqueue_analysis(kind: str, job_id: int) -> None:
    """Send the explore or report task of ``job_id``. Raises BrokerUnavailable."""
    _send(lambda: app.send_task(ANALYSIS_TASKS[kind], args=(job_id,),
                                argsrepr=f"job {job_id} {kind}", kwargsrepr="{}"), job_id)


def reconcile() -> dict[str, int]:
    """Re-send the messages of every unfinished job, from what SQL holds.

    Safe to run at any time: tasks are idempotent, so a message that was not lost
    only causes a no-op second run. Returns counts of re-sent shards, runs and
    analyses (explore and report tasks). An explore or report job whose analysis is
    stored already is complete: it is marked done, not run again.
    """
    with session_scope() as s:
        jobs = s.execute(
            select(Job.id, Job.kind, Job.spec).where(Job.status.in_([PENDING, RUNNING]))
        ).all()
        shard_work: dict[int, tuple[str, list[int]]] = {}
        runs: list[tuple[int, int, int]] = []
        analyses: list[tuple[int, str]] = []
        for job_id, kind, spec in jobs:
            if kind in SHARD_TASKS:
                idx = s.execute(
                    select(Shard.index).where(
                        Shard.job_id == job_id, Shard.status.in_([PENDING, RUNNING])
                    )
                ).scalars().all()
                shard_work[job_id] = (kind, list(idx))
            elif kind == "train":
                run = s.execute(select(Run).where(Run.job_id == job_id)).scalar_one()
                if run.status != DONE:
                    runs.append((run.id, job_id, int(spec.get("time_limit", 86400))))
            elif kind in ANALYSIS_TASKS:
                analyses.append((job_id, kind))
    sent = {"shards": 0, "runs": 0, "analyses": 0}
    for job_id, (kind, idx) in shard_work.items():
        if not idx:
            # Every shard done but the job not marked: its last worker died between
            # the two commits.
            complete_if_done(job_id)
        sent["shards"] += enqueue_shards(kind, job_id, idx)
    for run_id, job_id, limit in runs:
        enqueue_train(run_id, job_id, limit)
        sent["runs"] += 1
    for job_id, kind in analyses:
        if not complete_if_analysed(job_id):
            enqueue_analysis(kind, job_id)
            sent["analyses"] += 1
    return sent
