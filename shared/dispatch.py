"""Sending task messages, after the rows they name are committed: the one door for
submission, ``retry``, ``reconcile`` and ``demo``.

Messages carry ids only. If the broker is down at submission, the job stays
recorded in SQL and the reconciler (``shared.reconcile``) sends its messages later.
Each message sent is recorded as being sent, then as queued (``shared.inflight``),
so that a reconcile never copies work that merely waits in a queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import group
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import select

from shared import inflight, sweeps
from shared.celery_app import (
    EXPLORE,
    GENERATE_SHARD,
    REPORT,
    SPLIT_SHARD,
    SWEEP_STEP,
    TRAIN,
    app,
)
from shared.db import session_scope
from shared.errors import BrokerUnavailable
from shared.schema import PENDING, RUNNING, Run, Shard
from shared.spec import TrainSpec
from shared.state import ENDED, get_job

SHARD_TASKS = {"generate": GENERATE_SHARD, "split": SPLIT_SHARD}
# Jobs that are one task, with no shard or run rows: the task's result is their
# `analyses` row.
ANALYSIS_TASKS = {"explore": EXPLORE, "report": REPORT}


@dataclass
class Work:
    """What a job has left to do, as messages to send: read from SQL alone."""

    job_id: int
    kind: str
    shards: list[int] = field(default_factory=list)  # unfinished shard indices
    run_id: int | None = None  # an unfinished run
    time_limit: int = 0  # the run's hard limit, seconds, from its stored spec
    analysis: bool = False  # an explore or report task
    step: bool = False  # a sweep's step: a free slot to fill, or the sweep to finish
    label: str = ""  # what Flower shows for a sweep's trial: "sweep 3 trial 7"

    def messages(self) -> list[tuple[str, tuple[Any, ...]]]:
        """(task name, args) of each message that would do this work."""
        if self.kind in SHARD_TASKS:
            return [(SHARD_TASKS[self.kind], (self.job_id, i)) for i in self.shards]
        if self.run_id is not None:
            return [(TRAIN, (self.run_id, self.job_id))]
        if self.step:
            return [(SWEEP_STEP, (self.job_id,))]
        return [(ANALYSIS_TASKS[self.kind], (self.job_id,))] if self.analysis else []


def outstanding(job_id: int) -> Work:
    """The work job ``job_id`` has left, by its kind. Raises NotFound."""
    with session_scope() as s:
        job = get_job(s, job_id)
        work = Work(job_id, job.kind)
        if job.status in ENDED:
            return work
        if job.kind in SHARD_TASKS:
            work.shards = list(s.execute(
                select(Shard.index).where(Shard.job_id == job_id,
                                          Shard.status.in_([PENDING, RUNNING]))
                .order_by(Shard.index)).scalars())
        elif job.kind == "train":
            run = s.execute(select(Run).where(Run.job_id == job_id)).scalar_one()
            if run.status not in ENDED:
                spec = TrainSpec(**job.spec)
                work.run_id, work.time_limit = run.id, spec.time_limit
                if spec.sweep is not None:
                    work.label = f"sweep {spec.sweep} trial {spec.trial} "
        elif job.kind in ANALYSIS_TASKS:
            work.analysis = True
        elif job.kind == "sweep":
            work.step = sweeps.needs_step(s, job)
        return work


def _send(fn: Any, job_id: int) -> None:
    try:
        fn()
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise BrokerUnavailable(
            f"broker unreachable ({exc}); job {job_id} is recorded, "
            "run `captrain reconcile` once the broker is back"
        ) from exc


def _signature(name: str, args: tuple[Any, ...], time_limit: int, prefix: str = "") -> Any:
    # argsrepr is what Flower and `captrain workers` show instead of the bare ids.
    label = {GENERATE_SHARD: "job {} shard {}", SPLIT_SHARD: "job {} shard {}",
             TRAIN: "run {} (job {})", SWEEP_STEP: "sweep {} step"
             }.get(name, "job {} " + name.rpartition(".")[2])
    options: dict[str, Any] = {"argsrepr": prefix + label.format(*args), "kwargsrepr": "{}"}
    if name == TRAIN:
        # The hard limit from the spec, and a soft limit a minute earlier: the task
        # then fails cleanly, in Python, with its last epoch checkpoint kept.
        options.update(time_limit=time_limit, soft_time_limit=max(5, time_limit - 60))
    return app.signature(name, args=args, immutable=True).set(**options)


def send(work: Work, skip: set[tuple[str, tuple[Any, ...]]] | None = None) -> int:
    """Send the messages of ``work``, but those in ``skip``. Returns how many were
    sent. Raises BrokerUnavailable (the job stays recorded in SQL)."""
    messages = [(name, args) for name, args in work.messages()
                if (name, args) not in (skip or set())]
    sigs = [_signature(name, args, work.time_limit, work.label) for name, args in messages]
    keys = [inflight.key(name, args) for name, args in messages]
    # Marked as being sent before publishing, so that a worker's receipt always comes
    # after the marker it clears; moved to queued after. A sender that dies in
    # between leaves a sending entry, which the reconciler stops trusting after
    # inflight.SEND_GRACE: the work is re-sent then.
    inflight.mark_sending(keys)
    try:
        if len(sigs) == 1:
            _send(sigs[0].apply_async, work.job_id)
        elif sigs:
            _send(lambda: group(sigs).apply_async(), work.job_id)
    except BaseException:
        inflight.unmark_sending(keys)
        raise
    inflight.mark_published(keys)
    return len(sigs)


def send_job(job_id: int) -> int:
    """Send every message that job ``job_id``'s unfinished work needs: the one door
    through which submission, ``retry``, ``reconcile`` and ``demo`` send work. Returns
    how many were sent. Raises NotFound or BrokerUnavailable."""
    return send(outstanding(job_id))


@contextmanager
def inspector(timeout: float) -> Iterator[Any]:
    """Celery's ``inspect``, reading replies on a broker connection of its own that is
    closed after the block. A pooled one would keep a pending BRPOP, and a process
    forked later (a DataLoader worker) blocks on it for ever when kombu closes the
    inherited pool after the fork."""
    with app.connection_for_write() as conn:
        yield app.control.inspect(timeout=timeout, connection=conn)
