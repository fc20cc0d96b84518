"""Every status transition of jobs, shards, runs and datasets: the one module that
writes a status. Workers, the scheduler and the CLI call these functions.

Each transition is idempotent: applying it twice leaves the same rows. Completion
is decided by reading the shard table in a transaction of its own, after the shard's
own commit, so two shards that finish at once cannot both miss the last one.

Attempts: a shard, a run, and a job that is one task (explore, report) count the
deliveries of their message. One that killed its worker ``max_attempts`` times is
poison and is marked failed (:func:`admit_attempt`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.errors import NotFound, StateError
from shared.schema import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    PRUNED,
    READY,
    RUNNING,
    Analysis,
    Dataset,
    Job,
    Model,
    Run,
    Shard,
    Trial,
    utcnow,
)
from shared.settings import get_settings

ENDED = (DONE, CANCELLED, FAILED, PRUNED)
# Jobs that lay out a dataset's shards: the dataset is ready when they are done.
LAYOUT_KINDS = ("generate", "split")
IMPORTED = "imported"  # a dataset of source shards, not yet split


def get_job(session: Session, job_id: int) -> Job:
    """The job ``job_id``. Raises NotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def get_run(session: Session, run_id: int) -> Run:
    """The run ``run_id``. Raises NotFound."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def get_shard(session: Session, job_id: int, index: int) -> Shard:
    """Shard ``index`` of job ``job_id``. Raises NotFound."""
    shard = session.execute(
        select(Shard).where(Shard.job_id == job_id, Shard.index == index)
    ).scalar_one_or_none()
    if shard is None:
        raise NotFound(f"job {job_id} has no shard {index}")
    return shard


def job_dataset(session: Session, job: Job) -> Dataset | None:
    """The dataset job ``job`` builds or reads, if it has one."""
    return session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None


def admit_attempt(session: Session, table: Any, row_id: int, attempts: int,
                  count_attempt: bool, *guards: ColumnElement[bool], **values: Any
                  ) -> bool | None:
    """Admit a delivery of the message of a shard, run or job row: count it (if
    ``count_attempt``) and write ``values``, where ``guards`` hold.

    Returns None when the row has used up its attempts (the caller marks it failed),
    True when the row was updated, False when a guard did not hold (another delivery
    won a compare-and-set). A Celery retry goes on with an attempt already admitted
    (``count_attempt`` False), so it is not judged against the limit again.
    """
    if count_attempt and attempts >= get_settings().max_attempts:
        return None
    # An atomic increment: two deliveries at once are both counted.
    done = session.execute(
        update(table).where(table.id == row_id, *guards)
        .values(attempts=table.attempts + int(count_attempt), **values))
    return int(done.rowcount) == 1  # type: ignore[attr-defined]


def start_shard(job_id: int, index: int, worker: str, count_attempt: bool = True) -> bool:
    """Record an attempt at a shard. Returns False if there is nothing to do: the
    shard is done, its job has ended, or it has used up its attempts (then the job
    is marked failed: a message that kills its worker each time must not loop).
    """
    with session_scope() as s:
        shard = get_shard(s, job_id, index)
        job = get_job(s, job_id)
        if shard.status == DONE or job.status in (CANCELLED, FAILED):
            return False
        attempts = shard.attempts
        if admit_attempt(s, Shard, shard.id, attempts, count_attempt,
                         worker=worker, status=RUNNING) is not None:
            if job.status == PENDING:
                job.status = RUNNING
            return True
    fail_job(job_id, f"shard {index} gave up after {attempts} attempts", index)
    return False


def start_job(job_id: int, kind: str, count_attempt: bool = True) -> dict[str, Any] | None:
    """Record an attempt at a job that is one task (explore, report); mark it running.

    Returns the job's spec, or None if there is nothing to do: the job has ended, or it
    has used up its attempts (then it is marked failed). Raises NotFound for an
    unknown job, StateError for a job of another kind.
    """
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.kind != kind:
            raise StateError(f"job {job_id} is a {job.kind} job, not {kind}")
        if job.status in ENDED:
            return None
        attempts, spec = job.attempts, dict(job.spec)
        if admit_attempt(s, Job, job_id, attempts, count_attempt,
                         status=RUNNING) is not None:
            return spec
    fail_job(job_id, f"{kind} gave up after {attempts} attempts: none of them finished "
                     "(each worker was killed or lost mid-task)")
    return None


def start_run(session: Session, run: Run, worker: str, device: str) -> None:
    """Mark a leased run and its job running on ``worker``'s ``device``."""
    job = get_job(session, run.job_id)
    run.status = job.status = RUNNING
    run.worker, run.device = worker, device
    run.started_at = run.started_at or utcnow()


def prune_run(session: Session, run_id: int) -> None:
    """Mark a sweep's trial run and its job pruned: its sweep's pruner stopped it at an
    epoch's end, whose metrics are stored. A run already ended is left as it is."""
    run = get_run(session, run_id)
    job = get_job(session, run.job_id)
    if run.status in ENDED:
        return
    run.status = job.status = PRUNED
    run.finished_at = job.finished_at = utcnow()


def start_sweep(job: Job) -> None:
    """A sweep's first step asked for trials: the sweep runs."""
    if job.status == PENDING:
        job.status = RUNNING


def finish_sweep(session: Session, job: Job, best_run: int | None,
                 error: str | None) -> None:
    """Every trial of sweep ``job`` ended: it is done, and the registry alias ``best``
    of its model name points at ``best_run``'s version; or, with no trial complete,
    it fails with ``error`` (None: every trial was pruned, which is done, with no
    best)."""
    from shared import registry  # the registry reads the state module's rows

    if best_run is not None:
        model = session.execute(select(Model).where(Model.run_id == best_run)).scalar_one()
        registry.set_alias(session, f"{model.name}@{model.version}", "best")
    job.status = FAILED if error else DONE
    job.error, job.finished_at = error, utcnow()


def finish_run(session: Session, run_id: int, resumed_from: int | None) -> None:
    """Mark the run and its job done, inside the transaction that stored its model."""
    run = get_run(session, run_id)
    job = get_job(session, run.job_id)
    if resumed_from is not None and run.resumed_from is None:
        run.resumed_from = resumed_from
    run.status = job.status = DONE
    run.finished_at = job.finished_at = utcnow()


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
        job = get_job(s, job_id)
        if job.status == DONE:
            return True
        left = s.execute(
            select(func.count()).select_from(Shard).where(
                Shard.job_id == job_id, Shard.status != DONE)
        ).scalar_one()
        if left:
            return False
        job.status, job.finished_at = DONE, utcnow()
        if job.dataset_id is not None:
            s.execute(update(Dataset).where(Dataset.id == job.dataset_id)
                      .values(status=READY, layout_job_id=job_id))
        return True


def finish_analysis(session: Session, job_id: int) -> bool:
    """Mark an explore or report job done, inside the transaction that stores its
    analysis. Returns False, changing nothing, if it was cancelled or failed
    meanwhile (then the analysis must not be stored)."""
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    if status in (CANCELLED, FAILED):
        return False
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_([PENDING, RUNNING]))
                    .values(status=DONE, error=None, finished_at=utcnow()))
    return True


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


def _layout_dataset(session: Session, job_id: int) -> int | None:
    """The dataset whose shards job ``job_id`` lays out, if it is such a job."""
    job = get_job(session, job_id)
    return job.dataset_id if job.kind in LAYOUT_KINDS else None


def fail_job(job_id: int, error: str, index: int | None = None) -> None:
    """Mark the job (and the shard ``index``, if given) failed with ``error``; so are
    its run, and the dataset it was laying out."""
    error = error[:2000]
    with session_scope() as s:
        if index is not None:
            s.execute(update(Shard)
                      .where(Shard.job_id == job_id, Shard.index == index, Shard.status != DONE)
                      .values(status=FAILED, error=error))
        s.execute(update(Job).where(Job.id == job_id,
                                    Job.status.notin_([DONE, CANCELLED, PRUNED]))
                  .values(status=FAILED, error=error, finished_at=utcnow()))
        s.execute(update(Run).where(Run.job_id == job_id, Run.status.notin_([DONE, PRUNED]))
                  .values(status=FAILED, error=error, finished_at=utcnow()))
        ds = _layout_dataset(s, job_id)
        if ds is not None:
            s.execute(update(Dataset).where(Dataset.id == ds, Dataset.status != READY)
                      .values(status=FAILED))


def cancel_job(job_id: int) -> bool:
    """Mark an unfinished job, its unfinished shards and its run cancelled.

    Queued messages become no-ops (tasks check SQL when they start); running ones stop
    at their next shard boundary or training checkpoint. Returns False if the job had
    already ended. Raises NotFound.
    """
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.status in ENDED:
            return False
        job.status, job.finished_at = CANCELLED, utcnow()
        s.execute(update(Shard).where(Shard.job_id == job_id,
                                      Shard.status.in_([PENDING, RUNNING]))
                  .values(status=CANCELLED))
        s.execute(update(Run).where(Run.job_id == job_id, Run.status != DONE)
                  .values(status=CANCELLED, finished_at=utcnow()))
        ds = _layout_dataset(s, job_id)
        if ds is not None:
            s.execute(update(Dataset).where(Dataset.id == ds, Dataset.status != READY)
                      .values(status=CANCELLED))
        if job.kind == "sweep":
            # Its unfinished trials with it: each stops at its next heartbeat.
            trials = select(Trial.job_id).where(Trial.sweep_job_id == job_id)
            s.execute(update(Job).where(Job.id.in_(trials), Job.status.notin_(ENDED))
                      .values(status=CANCELLED, finished_at=utcnow()))
            s.execute(update(Run).where(Run.job_id.in_(trials), Run.status.notin_(ENDED))
                      .values(status=CANCELLED, finished_at=utcnow()))
        return True


def reopen_job(job_id: int) -> str:
    """Make a failed or cancelled job runnable again, from where it stopped; returns
    its kind. Done shards stay done and a run keeps its checkpoint; attempts start
    again from zero. Raises NotFound, or StateError for a job that did not end badly.
    """
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.status not in (FAILED, CANCELLED):
            raise StateError(f"job {job_id} is {job.status}; only failed or cancelled jobs "
                             "are retried")
        job.status, job.error, job.finished_at, job.attempts = PENDING, None, None, 0
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.status != DONE)
                  .values(status=PENDING, attempts=0, error=None))
        s.execute(update(Run).where(Run.job_id == job_id).values(
            status=PENDING, attempts=0, error=None, lease_owner=None, finished_at=None))
        ds = _layout_dataset(s, job_id)
        if ds is not None:
            s.execute(update(Dataset).where(Dataset.id == ds, Dataset.status != READY)
                      .values(status=PENDING))
        return job.kind


def relayout(dataset: Dataset) -> None:
    """A split job was planned for ``dataset``: it is pending until its shards are."""
    dataset.status = PENDING


def record_done_import(job: Job, dataset: Dataset, ready: bool) -> None:
    """An import ran on the submitting machine and stored everything in the
    transaction that created ``job`` and ``dataset``: the job is done, and the dataset
    ready (MNIST: split already) or ``imported`` (source shards to split)."""
    job.status, job.finished_at = DONE, utcnow()
    dataset.status = READY if ready else IMPORTED


def record_builtin(dataset: Dataset) -> None:
    """A dataset that ships with the code (Iris) is ready when it is registered."""
    dataset.status = READY


def new_train_job(session: Session, spec: dict[str, Any], settings: dict[str, Any],
                  dataset_id: int, model: str) -> tuple[int, int]:
    """Write a pending train job with ``spec`` and its run, inside ``session``. Returns
    (run id, job id)."""
    job = Job(kind="train", spec=spec, settings=settings, dataset_id=dataset_id)
    session.add(job)
    session.flush()
    run = Run(job_id=job.id, dataset_id=dataset_id, model=model)
    session.add(run)
    session.flush()
    return run.id, job.id


def stored_shard(**values: Any) -> Shard:
    """A new shard row whose bytes are stored already (an import's source shards,
    MNIST's split ones): done as it is written."""
    return Shard(status=DONE, finished_at=utcnow(), **values)
