"""Celery tasks: thin wrappers that decode ids, call ``workers.jobs`` and map errors.

A transient error (a dropped database or broker connection) retries with
exponential backoff; any other error marks the job failed in SQL, with its message,
and does not loop.

Long tasks report progress as ``task-progress`` events (not ``update_state``: there
is no result backend). Celery's event ``State``, which Flower builds on, turns an
unknown ``task-<x>`` event into the custom state ``<X>``, so Flower shows such a
task as ``PROGRESS`` until its ``task-succeeded`` event.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_init
from celery.utils.log import get_task_logger

from shared.celery_app import GENERATE_SHARD, PING, SPLIT_SHARD, TRAIN, app
from shared.db import dispose_all, get_engine
from shared.errors import CaptrainError, NotFound, TransientError
from shared.records import LEASE_STALE_SECONDS, Cancelled, LeaseLost, fail_job
from shared.settings import get_settings
from workers import jobs
from workers.shutdown import StopRequested

log = get_task_logger(__name__)
HOST = socket.gethostname()



@worker_init.connect
def _warm_up(**_: Any) -> None:
    """In the worker's main process, before the pool forks: check the database schema
    once and import the captcha renderer, so that no pool process pays for either on
    its first task (about 0.4 s each on a 2-core VM, most of it importing alembic).

    A database that cannot be checked now is only logged: each task reports it.
    """
    import workers.synth  # noqa: F401  (captcha and Pillow, inherited by every fork)

    try:
        get_engine()
    except CaptrainError as exc:
        log.warning("database not checked at start (tasks will retry it): %s", exc)
    finally:
        dispose_all()  # no pooled connection may cross the fork


PROGRESS_EVENT = "task-progress"  # Flower's State shows it as the state PROGRESS
PROGRESS_INTERVAL = 0.5  # s: the least time between two progress events of a shard
PROGRESS_PAUSE = 30.0  # s without progress events in this process after one failed
# A progress event is worth one quick reconnect (a pooled connection the broker
# dropped), not the default publish retries: the work must not wait on monitoring.
_EVENT_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                "interval_max": 0.2}
_progress_paused_until = 0.0  # time.monotonic(); per process, as the broker is shared


def _send_progress(task: Task, **meta: Any) -> None:
    """Send a ``task-progress`` event with ``meta``. Never raises: a failure is logged
    and pauses progress events for ``PROGRESS_PAUSE``, since connecting to a broker
    that is down takes seconds each time (the connection timeout)."""
    global _progress_paused_until
    if time.monotonic() < _progress_paused_until:
        return
    try:
        task.send_event(PROGRESS_EVENT, retry=True, retry_policy=_EVENT_RETRY, **meta)
    except Exception as exc:  # monitoring must never fail the work
        _progress_paused_until = time.monotonic() + PROGRESS_PAUSE
        log.warning("task %s: progress event not sent (none for %.0f s): %s",
                    task.request.id, PROGRESS_PAUSE, exc)


def _item_progress(task: Task) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for a shard, throttled to one event per
    ``PROGRESS_INTERVAL``: a shard calls it once per item. A shard that takes less
    than the interval sends none."""
    last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL and done < total:
            last = now
            _send_progress(task, done=done, total=total)

    return progress


def _epoch_progress(task: Task) -> Callable[[int, int, int, dict[str, Any]], None]:
    """A ``progress(epoch, done, total, val_metrics)`` callback for ``jobs.train_run``:
    one event per epoch, with that epoch's validation loss and accuracies (``acc``:
    whole sequences right; ``char_acc``: characters right)."""
    def progress(epoch: int, done: int, total: int, metrics: dict[str, Any]) -> None:
        _send_progress(task, done=done, total=total, epoch=epoch, loss=metrics.get("loss"),
                       acc=metrics.get("seq_acc"), char_acc=metrics.get("char_acc"))

    return progress


def new_attempt(task: Task) -> bool:
    """Whether this delivery is a new attempt at its work, counted against
    ``MAX_ATTEMPTS``: a message's first delivery, and any redelivery (the broker
    restores a message whose worker was killed or lost). The first delivery of a
    Celery retry after a transient error goes on with an attempt already counted;
    if that one kills its worker, its redelivery counts again, so a poison message
    cannot loop forever once it has been retried."""
    info = task.request.delivery_info or {}
    return task.request.retries == 0 or bool(info.get("redelivered"))


def _run(task: Task, job_id: int, index: int | None, work: Callable[[], Any]) -> Any:
    try:
        return work()
    except NotFound as exc:
        # A message naming rows this database does not have (a stale queue after a
        # database reset): nothing to record it against, so drop it loudly.
        log.error("dropping task for job %s: %s", job_id, exc)
        return None
    except StopRequested as exc:
        # The worker is shutting down and the run checkpointed: back to the queue.
        log.warning("job %s: %s; requeued", job_id, exc)
        raise Reject(str(exc), requeue=True) from exc
    except SoftTimeLimitExceeded as exc:
        fail_job(job_id, "time limit reached; the last checkpoint is kept for a retry")
        raise exc
    except (LeaseLost, Cancelled) as exc:
        # Another process owns the run now and will finish it, or the user cancelled
        # it: either way not a failure of this task.
        log.warning("job %s: %s", job_id, exc)
        return None
    except TransientError as exc:
        limit = get_settings().task_max_retries
        if task.request.retries >= limit:
            fail_job(job_id, f"gave up after {task.request.retries} retries: {exc}", index)
            raise
        # The limit goes with the call: Celery's own default (3) would otherwise end
        # the task first, raising here with the job left running.
        raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries),
                         max_retries=limit) from exc
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail_job(job_id, f"{type(exc).__name__}: {exc}", index)
        raise


@app.task(name=GENERATE_SHARD, bind=True)
def generate_shard(self: Task, job_id: int, index: int) -> str | None:
    """Render and store shard ``index`` of generate job ``job_id``."""
    return _run(self, job_id, index,
                lambda: jobs.generate_shard(job_id, index, self.request.hostname or HOST,
                                           new_attempt(self), _item_progress(self)))


@app.task(name=SPLIT_SHARD, bind=True)
def split_shard(self: Task, job_id: int, index: int) -> str | None:
    """Build output shard ``index`` of split job ``job_id``."""
    return _run(self, job_id, index,
                lambda: jobs.split_shard(job_id, index, self.request.hostname or HOST,
                                        new_attempt(self), _item_progress(self)))


# max_retries=None: the retry while another process holds the run's lease has no
# limit (Celery's default is 3, and retry(max_retries=None) means that default).
@app.task(name=TRAIN, bind=True, max_retries=None)
def train(self: Task, run_id: int, job_id: int) -> dict[str, Any] | None:
    """Train run ``run_id`` (of job ``job_id``), resuming from its last checkpoint."""
    result = _run(self, job_id, None,
                  lambda: jobs.train_run(run_id, f"{self.request.hostname or HOST}",
                                         _epoch_progress(self), new_attempt(self)))
    if result is jobs.HELD:
        # A live process trains this run. Look again once its lease could have gone
        # stale: if that process died on another host, this copy takes over; if the
        # run finished, this copy ends as a no-op.
        raise self.retry(countdown=LEASE_STALE_SECONDS + 20)
    return result


@app.task(name=PING)
def ping() -> str:
    return "pong"
