"""State transitions of jobs, shards and runs in SQL, shared by workers and CLI.

Each transition is idempotent: applying it twice leaves the same rows. Completion
is decided by reading the shard table in a transaction of its own, after the shard's
own commit, so two shards that finish at once cannot both miss the last one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db import insert_for, session_scope
from shared.errors import NotFound
from shared.schema import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    Dataset,
    Job,
    Metric,
    Model,
    Run,
    Shard,
    utcnow,
)


def get_shard(session: Session, job_id: int, index: int) -> Shard:
    shard = session.execute(
        select(Shard).where(Shard.job_id == job_id, Shard.index == index)
    ).scalar_one_or_none()
    if shard is None:
        raise NotFound(f"job {job_id} has no shard {index}")
    return shard


def start_shard(job_id: int, index: int, worker: str) -> bool:
    """Record an attempt at a shard. Returns False if it is already done or its job
    has ended (nothing to do)."""
    with session_scope() as s:
        shard = get_shard(s, job_id, index)
        job = s.get(Job, job_id)
        assert job is not None
        if shard.status == DONE or job.status in (CANCELLED, FAILED):
            return False
        shard.attempts += 1
        shard.worker = worker
        shard.status = RUNNING
        if job.status == PENDING:
            job.status = RUNNING
        return True


def finish_shard(session: Session, job_id: int, index: int, sha256: str, worker: str) -> None:
    """Mark a shard done with its artifact. A second call for a done shard is a no-op."""
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.index == index, Shard.status != DONE)
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
