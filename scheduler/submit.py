"""Sending task messages, after the rows they name are committed; and reconcile.

Messages carry ids only. If the broker is down at submission, the job stays
recorded in SQL and ``captrain reconcile`` sends its messages later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def inspector(timeout: float) -> Iterator[Any]:
    """Celery's ``inspect``, reading replies on a broker connection of its own that is
    closed after the block. A pooled one would keep a pending BRPOP, and a process
    forked later (a DataLoader worker) blocks on it for ever when kombu closes the
    inherited pool after the fork."""
    with app.connection_for_write() as conn:
        yield app.control.inspect(timeout=timeout, connection=conn)


def held_by_live_workers(timeout: float = 1.0) -> set[tuple[str, tuple[Any, ...]]]:
    """(task name, args) of each task a live worker runs, holds reserved, or holds
    for a retry's countdown: its message is not lost. A worker that does not answer
    within ``timeout`` holds nothing. Raises BrokerUnavailable."""
    try:
        with inspector(timeout) as insp:
            active, reserved, scheduled = insp.active(), insp.reserved(), insp.scheduled()
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise BrokerUnavailable(f"broker unreachable ({exc})") from exc
    requests = [t for reply in (active, reserved) for tasks in (reply or {}).values()
                for t in tasks]
    requests += [e["request"] for entries in (scheduled or {}).values() for e in entries]
    return {(t["name"], tuple(t["args"])) for t in requests
            if isinstance(t.get("args"), (list, tuple))}


def reconcile() -> dict[str, int]:
    """Re-send the messages of every unfinished job, from what SQL holds.

    Safe to run at any time: tasks are idempotent, so a message that was not lost
    only causes a no-op second run. What a live worker runs or holds now is not
    re-sent (``held``): a copy would start beside it, and count an attempt against
    the limit that stops poison messages. Returns counts of re-sent shards, runs and
    analyses (explore and report tasks), and of held tasks left alone. An explore or
    report job whose analysis is stored already is complete: it is marked done, not
    run again. Raises BrokerUnavailable.
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
    # After the SQL read: a task that starts in between is seen as held.
    held = held_by_live_workers()
    sent = {"shards": 0, "runs": 0, "analyses": 0, "held": 0}
    for job_id, (kind, idx) in shard_work.items():
        if not idx:
            # Every shard done but the job not marked: its last worker died between
            # the two commits.
            complete_if_done(job_id)
        lost = [i for i in idx if (SHARD_TASKS[kind], (job_id, i)) not in held]
        sent["held"] += len(idx) - len(lost)
        sent["shards"] += enqueue_shards(kind, job_id, lost)
    for run_id, job_id, limit in runs:
        if (TRAIN, (run_id, job_id)) in held:
            sent["held"] += 1
            continue
        enqueue_train(run_id, job_id, limit)
        sent["runs"] += 1
    for job_id, kind in analyses:
        if complete_if_analysed(job_id):
            continue
        if (ANALYSIS_TASKS[kind], (job_id,)) in held:
            sent["held"] += 1
            continue
        enqueue_analysis(kind, job_id)
        sent["analyses"] += 1
    return sent
