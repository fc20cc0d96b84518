"""Which workers are alive, from the heartbeats their main processes write to SQL,
and the reconciler's notes of what it recovered.

A worker beats every ``keeper_interval`` seconds (``workers.keeper``); one whose
last beat is older than ``worker_dead_seconds`` is dead, and the work it held is
lost. The beats live in SQL, the system of record, so that a flushed or restarted
broker does not make every live worker look dead at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select

from shared.db import insert_for, session_scope
from shared.schema import Recovery, WorkerBeat, utcnow
from shared.settings import get_settings


def beat(name: str, pid: int, queues: str) -> None:
    """Record that worker ``name`` is alive now (an upsert)."""
    now = utcnow()
    with session_scope() as s:
        stmt = insert_for(s)(WorkerBeat).values(name=name, pid=pid, queues=queues,
                                                started_at=now, seen_at=now)
        s.execute(stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"seen_at": now, "pid": pid, "queues": queues}))


def last_seen() -> dict[str, datetime]:
    """Each worker that ever beat, with its last beat."""
    with session_scope() as s:
        return {name: seen for name, seen in s.execute(
            select(WorkerBeat.name, WorkerBeat.seen_at))}


def alive(seen: dict[str, datetime], now: datetime | None = None) -> set[str]:
    """The workers of ``seen`` whose last beat is recent enough to count as alive."""
    limit = (now or utcnow()) - timedelta(seconds=get_settings().worker_dead_seconds)
    return {name for name, at in seen.items() if at >= limit}


def serving(queue: str) -> list[str]:
    """The live workers that consume ``queue``."""
    limit = utcnow() - timedelta(seconds=get_settings().worker_dead_seconds)
    with session_scope() as s:
        rows = s.execute(select(WorkerBeat.name, WorkerBeat.queues)
                         .where(WorkerBeat.seen_at >= limit)).all()
    return [name for name, queues in rows if queue in queues.split(",")]


def forget_workers_dead_for(days: float = 7) -> None:
    """Drop the beats of workers gone for ``days`` (restarts leave a row each)."""
    with session_scope() as s:
        s.execute(delete(WorkerBeat).where(
            WorkerBeat.seen_at < utcnow() - timedelta(days=days)))


def note(job_id: int, message: str) -> None:
    """Record what the reconciler did for job ``job_id`` (``captrain watch`` shows it)."""
    with session_scope() as s:
        s.add(Recovery(job_id=job_id, message=message[:2000]))


def notes(job_id: int, after_id: int = 0) -> list[tuple[int, datetime, str]]:
    """(id, when, message) of the recoveries of job ``job_id`` after ``after_id``."""
    with session_scope() as s:
        return [(i, at, m) for i, at, m in s.execute(
            select(Recovery.id, Recovery.at, Recovery.message)
            .where(Recovery.job_id == job_id, Recovery.id > after_id)
            .order_by(Recovery.id)).all()]
