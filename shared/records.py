"""State transitions of jobs, shards and runs in SQL, shared by workers and CLI.

Each transition is idempotent: applying it twice leaves the same rows. Completion
is decided by reading the shard table in a transaction of its own, after the shard's
own commit, so two shards that finish at once cannot both miss the last one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from shared.db import insert_for, session_scope
from shared.errors import NotFound, StateError
from shared.schema import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    Analysis,
    Dataset,
    Job,
    Metric,
    Model,
    Run,
    Shard,
    utcnow,
)

# A shard, run or one-task job (explore, report) whose worker died this many times is
# poison: mark it failed.
MAX_ATTEMPTS = 5
# Seconds without a heartbeat after which a run on another host may be taken over.
# Heartbeats come every HEARTBEAT_SECONDS while training.
LEASE_STALE_SECONDS = 180
HEARTBEAT_SECONDS = 20


def get_shard(session: Session, job_id: int, index: int) -> Shard:
    shard = session.execute(
        select(Shard).where(Shard.job_id == job_id, Shard.index == index)
    ).scalar_one_or_none()
    if shard is None:
        raise NotFound(f"job {job_id} has no shard {index}")
    return shard


def start_shard(job_id: int, index: int, worker: str, count_attempt: bool = True) -> bool:
    """Record an attempt at a shard. Returns False if there is nothing to do: the
    shard is done, its job has ended, or it has used up its attempts (then the job
    is marked failed: a message that kills its worker each time must not loop).
    A Celery retry after a transient error is not a new attempt (``count_attempt``).
    """
    with session_scope() as s:
        shard = get_shard(s, job_id, index)
        job = s.get(Job, job_id)
        assert job is not None
        if shard.status == DONE or job.status in (CANCELLED, FAILED):
            return False
        attempts = shard.attempts
        # A Celery retry goes on with an attempt already admitted: it is not judged
        # against the limit again.
        if attempts < MAX_ATTEMPTS or not count_attempt:
            # Atomic increment: two deliveries at once must both be counted.
            s.execute(update(Shard).where(Shard.id == shard.id).values(
                attempts=Shard.attempts + int(count_attempt), worker=worker, status=RUNNING))
            if job.status == PENDING:
                job.status = RUNNING
            return True
    fail_job(job_id, f"shard {index} gave up after {attempts} attempts", index)
    return False


def start_job(job_id: int, kind: str, count_attempt: bool = True) -> dict[str, Any] | None:
    """Record an attempt at a job that is one task (explore, report); mark it running.

    Returns the job's spec, or None if there is nothing to do: the job has ended, or it
    has used up its ``MAX_ATTEMPTS`` (then it is marked failed: a message that kills
    its worker each time, redelivered under late acks, must not loop). A Celery retry
    after a transient error is not a new attempt (``count_attempt``). Raises NotFound
    for an unknown job, StateError for a job of another kind.
    """
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.kind != kind:
            raise StateError(f"job {job_id} is a {job.kind} job, not {kind}")
        if job.status in (DONE, CANCELLED, FAILED):
            return None
        attempts = job.attempts
        # A Celery retry goes on with an attempt already admitted: it is not judged
        # against the limit again.
        if attempts < MAX_ATTEMPTS or not count_attempt:
            spec = dict(job.spec)
            # Atomic increment: two deliveries at once must both be counted.
            s.execute(update(Job).where(Job.id == job_id).values(
                attempts=Job.attempts + int(count_attempt), status=RUNNING))
            return spec
    fail_job(job_id, f"{kind} gave up after {attempts} attempts: none of them finished "
                     "(each worker was killed or lost mid-task)")
    return None


def complete_if_analysed(job_id: int) -> bool:
    """Mark an explore or report job done if its analysis is stored. Returns True when
    it has one (the job is then done, now or already).

    The worker stores the analysis and marks the job done in one transaction, so an
    unfinished job with an analysis is a corner (a retry of a job failed while a slow
    attempt was storing it); it is complete all the same, and is not run again.
    """
    with session_scope() as s:
        if s.execute(select(Analysis.id).where(Analysis.job_id == job_id)).first() is None:
            return False
        s.execute(update(Job).where(Job.id == job_id, Job.status != DONE)
                  .values(status=DONE, error=None, finished_at=utcnow()))
        return True


def _rowcount(result: Any) -> int:
    return int(result.rowcount)  # an UPDATE's result is a CursorResult


class LeaseLost(StateError):
    """Another process took over this run (this one was silent for too long)."""


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # on another machine: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire_run(run_id: int, owner: str, count_attempt: bool = True) -> str:
    """Take the lease of a run for ``owner`` ("host:pid"), counting an attempt if
    ``count_attempt`` (a Celery retry goes on with one already counted).

    Returns "acquired", "done" (nothing to do), "held" (another live process trains
    it: this delivery is a duplicate) or "exhausted" (attempts used up; the run is
    then marked failed). The compare-and-set UPDATE makes two simultaneous
    deliveries agree on one winner.
    """
    now = utcnow()
    with session_scope() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        if run.status in (DONE, CANCELLED, FAILED):
            return "done"
        if run.attempts >= MAX_ATTEMPTS and count_attempt:
            attempts, job_id = run.attempts, run.job_id
        else:
            holder = run.lease_owner
            free = or_(
                Run.lease_owner.is_(None),
                Run.lease_owner == owner,
                Run.heartbeat_at < now - timedelta(seconds=LEASE_STALE_SECONDS),
            )
            if holder is not None and _owner_is_dead(holder):
                free = or_(free, Run.lease_owner == holder)
            got = _rowcount(s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.notin_([DONE, CANCELLED, FAILED]), free)
                .values(lease_owner=owner, heartbeat_at=now,
                        attempts=Run.attempts + int(count_attempt))
            ))
            return "acquired" if got == 1 else "held"
    fail_job(job_id, f"training gave up after {attempts} attempts")
    return "exhausted"


def release_run(run_id: int, owner: str, give_back_attempt: bool = False) -> None:
    """Give up the lease, if ``owner`` still holds it; with ``give_back_attempt``, also
    the attempt it counted (a warm shutdown: the run checkpointed and goes back to
    the queue, so five rolling restarts do not fail it)."""
    values: dict[str, Any] = {"lease_owner": None}
    if give_back_attempt:
        values["attempts"] = case((Run.attempts > 0, Run.attempts - 1), else_=0)
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == run_id, Run.lease_owner == owner)
                  .values(**values))


class Cancelled(StateError):
    """The job was cancelled; the task stops at its next checkpoint or shard boundary."""


def heartbeat(session: Session, run_id: int, owner: str) -> None:
    """Renew the lease inside ``session``. Raises Cancelled if the run was cancelled,
    LeaseLost if another process holds it."""
    got = _rowcount(session.execute(
        update(Run).where(Run.id == run_id, Run.lease_owner == owner,
                          Run.status != CANCELLED)
        .values(heartbeat_at=utcnow())
    ))
    if got != 1:
        if session.execute(select(Run.status).where(Run.id == run_id)).scalar() == CANCELLED:
            raise Cancelled(f"run {run_id} was cancelled")
        raise LeaseLost(f"run {run_id} was taken over by another worker")


def finish_shard(session: Session, job_id: int, index: int, sha256: str, worker: str) -> None:
    """Mark a shard done with its artifact. A second call for a done shard is a no-op."""
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.index == index,
               Shard.status.in_([PENDING, RUNNING]))
        .values(status=DONE, sha256=sha256, worker=worker, error=None, finished_at=utcnow())
    )


def complete_if_done(job_id: int) -> bool:
    """Mark the job done and its dataset ready if every shard is done. Returns True
    when the job is (now or already) done."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.status == DONE:
            return True
        left = s.execute(
            select(func.count()).select_from(Shard).where(
                Shard.job_id == job_id, Shard.status != DONE
            )
        ).scalar_one()
        if left:
            return False
        job.status = DONE
        job.finished_at = utcnow()
        dataset_id = s.execute(
            select(Shard.dataset_id).where(Shard.job_id == job_id).limit(1)
        ).scalar_one_or_none()
        if dataset_id is not None:
            s.execute(
                update(Dataset)
                .where(Dataset.id == dataset_id)
                .values(status=READY, layout_job_id=job_id)
            )
        return True


def fail_job(job_id: int, error: str, index: int | None = None) -> None:
    """Mark the job (and the shard ``index``, if given) failed with ``error``."""
    with session_scope() as s:
        if index is not None:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index == index, Shard.status != DONE)
                .values(status=FAILED, error=error[:2000])
            )
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.notin_([DONE, CANCELLED]))
            .values(status=FAILED, error=error[:2000], finished_at=utcnow())
        )
        s.execute(
            update(Run)
            .where(Run.job_id == job_id, Run.status != DONE)
            .values(status=FAILED, error=error[:2000], finished_at=utcnow())
        )
        ds = s.execute(
            select(Shard.dataset_id).where(Shard.job_id == job_id).limit(1)
        ).scalar_one_or_none()
        if ds is not None:
            s.execute(
                update(Dataset)
                .where(Dataset.id == ds, Dataset.status != READY)
                .values(status=FAILED)
            )


def cancel_job(job_id: int) -> bool:
    """Mark an unfinished job, its unfinished shards and its run cancelled.

    Queued messages become no-ops (tasks check SQL when they start); running ones stop
    at their next shard boundary or training checkpoint. Returns False if the job had
    already ended. Raises NotFound.
    """
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.status in (DONE, FAILED, CANCELLED):
            return False
        job.status, job.finished_at = CANCELLED, utcnow()
        s.execute(update(Shard).where(Shard.job_id == job_id,
                                      Shard.status.in_([PENDING, RUNNING]))
                  .values(status=CANCELLED))
        s.execute(update(Run).where(Run.job_id == job_id, Run.status != DONE)
                  .values(status=CANCELLED, finished_at=utcnow()))
        if job.kind in ("generate", "split"):
            s.execute(update(Dataset)
                      .where(Dataset.layout_job_id == job_id, Dataset.status != READY)
                      .values(status=CANCELLED))
            if job.kind == "split":
                ds = s.execute(select(Shard.dataset_id).where(Shard.job_id == job_id)
                               .limit(1)).scalar()
                s.execute(update(Dataset).where(Dataset.id == ds, Dataset.status != READY)
                          .values(status=CANCELLED))
        return True


def reopen_job(job_id: int) -> tuple[str, list[int], int | None]:
    """Make a failed or cancelled job runnable again, from where it stopped.

    Returns (kind, shard indices to send, run id to send). Done shards stay done and a
    run keeps its checkpoint; attempts start again from zero. An explore or report job
    has neither shards nor a run: its one task is what the caller sends again. Raises
    NotFound, or StateError for a job that did not end badly.
    """
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.status not in (FAILED, CANCELLED):
            raise StateError(f"job {job_id} is {job.status}; only failed or cancelled jobs "
                             "are retried")
        job.status, job.error, job.finished_at, job.attempts = PENDING, None, None, 0
        idx = list(s.execute(
            select(Shard.index).where(Shard.job_id == job_id, Shard.status != DONE)
        ).scalars())
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.status != DONE)
                  .values(status=PENDING, attempts=0, error=None))
        run_id = s.execute(select(Run.id).where(Run.job_id == job_id)).scalar()
        if run_id is not None:
            s.execute(update(Run).where(Run.id == run_id).values(
                status=PENDING, attempts=0, error=None, lease_owner=None, finished_at=None))
        ds = s.execute(select(Shard.dataset_id).where(Shard.job_id == job_id)
                       .limit(1)).scalar()
        if ds is not None:
            s.execute(update(Dataset).where(Dataset.id == ds, Dataset.status != READY)
                      .values(status=PENDING))
        return job.kind, idx, run_id


def upsert_metrics(
    session: Session, run_id: int, epoch: int, split: str, values: dict[str, Any]
) -> None:
    """Write one epoch's numbers; a repeated epoch overwrites, never duplicates."""
    insert = insert_for(session)
    for name, value in values.items():
        if not isinstance(value, int | float):
            continue
        stmt = insert(Metric).values(
            run_id=run_id, epoch=epoch, split=split, name=name, value=float(value)
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["run_id", "epoch", "split", "name"],
                set_={"value": stmt.excluded.value},
            )
        )


def finished_run(session: Session, run_id: int) -> tuple[Run, Dataset]:
    """The run ``run_id`` and its dataset, for work that needs a finished run (a report).

    Raises NotFound for an unknown run, StateError for one that is not done.
    """
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if run.status != DONE:
        raise StateError(f"run {run_id} is {run.status}; a report needs a finished run")
    dataset = session.get(Dataset, run.dataset_id)
    assert dataset is not None  # a foreign key
    return run, dataset


def find_model(session: Session, ref: str) -> Model:
    """Resolve ``ref``: ``latest``, a run id, or a dataset name (its newest model).

    Raises NotFound when nothing matches.
    """
    query = select(Model).order_by(Model.created_at.desc(), Model.id.desc()).limit(1)
    if ref == "latest":
        row = session.execute(query).scalar_one_or_none()
    elif ref.isdigit():
        row = session.execute(
            select(Model).where(Model.run_id == int(ref))
        ).scalar_one_or_none()
    else:
        row = session.execute(
            query.join(Dataset, Dataset.id == Model.dataset_id).where(Dataset.name == ref)
        ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no trained model for {ref!r}")
    return row
