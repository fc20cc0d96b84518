"""Every Celery task: thin wrappers that decode ids and call ``workers.jobs``, on one
base class (``CaptrainTask``) that owns error mapping, retries and attempt counting.

A transient error (a dropped database or broker connection) retries with Celery's
exponential backoff and jitter; any other error marks the job failed in SQL, with
its message, and does not loop.

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
from celery.utils.time import get_exponential_backoff_interval

from shared import inflight
from shared.celery_app import (
    EXPLORE,
    GENERATE_SHARD,
    PING,
    REPORT,
    SPLIT_SHARD,
    SWEEP_STEP,
    TRAIN,
    app,
)
from shared.db import dispose_all, get_engine
from shared.errors import (
    Cancelled,
    CaptrainError,
    LeaseLost,
    NotFound,
    StopRequested,
    TransientError,
)
from shared.settings import get_settings
from shared.state import fail_job
from workers import keeper  # noqa: F401  (its signals: heartbeat, reconciler, markers)
from workers.jobs import analyses, shards, sweeps, training

log = get_task_logger(__name__)
HOST = socket.gethostname()

@worker_init.connect
def _warm_up(**_: Any) -> None:
    """In the worker's main process, before the pool forks: check the database schema
    once and import the captcha renderer, so that no pool process pays for either on
    its first task (most of the first import is alembic).

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
PROGRESS_PAUSE = 30.0  # s without progress events in this process after one failed
# A progress event is worth one quick reconnect (a pooled connection the broker
# dropped), not the default publish retries: the work must not wait on monitoring.
_EVENT_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                "interval_max": 0.2}
_progress_paused_until = 0.0  # time.monotonic(); per process, as the broker is shared


class CaptrainTask(Task):
    """The base of captrain's tasks: maps errors to retry, requeue or a failed job,
    counts attempts, and sends progress events."""

    # Transient errors: Celery's exponential backoff (1, 2, 4 ... s, at most 60 s)
    # with full jitter, so that workers cut off together do not come back together.
    retry_backoff = 1
    retry_backoff_max = 60
    retry_jitter = True

    @property
    def worker(self) -> str:
        return self.request.hostname or HOST

    def new_attempt(self) -> bool:
        """Whether this delivery is a new attempt at its work, counted against
        ``max_attempts``: a message's first delivery, and any redelivery (the broker
        restores a message whose worker was killed or lost). The first delivery of a
        Celery retry after a transient error goes on with an attempt already counted;
        if that one kills its worker, its redelivery counts again, so a poison message
        cannot loop forever once it has been retried."""
        info = self.request.delivery_info or {}
        return self.request.retries == 0 or bool(info.get("redelivered"))

    def run_job(self, job_id: int, index: int | None, work: Callable[[], Any]) -> Any:
        """Run ``work`` for job ``job_id`` (shard ``index``), mapping its errors."""
        try:
            return work()
        except NotFound as exc:
            # A message naming rows this database does not have (a stale queue after a
            # database reset): nothing to record it against, so drop it loudly.
            log.error("dropping task for job %s: %s", job_id, exc)
            return None
        except StopRequested as exc:
            # The worker is shutting down and the run checkpointed: back to the queue,
            # where the reconciler must see it waiting.
            log.warning("job %s: %s; requeued", job_id, exc)
            inflight.mark_requeued(inflight.key(self.name, self.request.args or ()))
            raise Reject(str(exc), requeue=True) from exc
        except SoftTimeLimitExceeded:
            fail_job(job_id, "time limit reached; the last checkpoint is kept for a retry")
            raise
        except (LeaseLost, Cancelled) as exc:
            # Another process owns the run now and will finish it, or the user
            # cancelled it: either way not a failure of this task.
            log.warning("job %s: %s", job_id, exc)
            return None
        except TransientError as exc:
            self._retry_transient(job_id, index, exc)
            raise
        except Exception as exc:
            log.exception("job %s failed", job_id)
            fail_job(job_id, f"{type(exc).__name__}: {exc}", index)
            raise

    def _retry_transient(self, job_id: int, index: int | None, exc: Exception) -> None:
        """Raise Celery's Retry with a backoff; or, once ``task_max_retries`` are used
        up, mark the job failed and return (the caller re-raises ``exc``)."""
        limit = get_settings().task_max_retries
        if self.request.retries >= limit:
            fail_job(job_id, f"gave up after {self.request.retries} retries: {exc}", index)
            return
        countdown = get_exponential_backoff_interval(
            self.retry_backoff, self.request.retries, self.retry_backoff_max,
            self.retry_jitter)
        # The limit goes with the call: Celery's own default (3) would otherwise end
        # the task first, raising here with the job left running.
        raise self.retry(exc=exc, countdown=countdown, max_retries=limit)

    def send_progress(self, **meta: Any) -> None:
        """Send a ``task-progress`` event with ``meta``. Never raises: a failure is
        logged and pauses progress events for ``PROGRESS_PAUSE``, since connecting to
        a broker that is down takes seconds each time (the connection timeout)."""
        global _progress_paused_until
        if time.monotonic() < _progress_paused_until:
            return
        try:
            self.send_event(PROGRESS_EVENT, retry=True, retry_policy=_EVENT_RETRY, **meta)
        except Exception as exc:  # monitoring must never fail the work
            _progress_paused_until = time.monotonic() + PROGRESS_PAUSE
            log.warning("task %s: progress event not sent (none for %.0f s): %s",
                        self.request.id, PROGRESS_PAUSE, exc)

    def item_progress(self) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for a shard, throttled to one event per
        ``progress_interval``: a shard calls it once per item. A shard that takes
        less than the interval sends none."""
        interval = get_settings().progress_interval
        last = time.monotonic()

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= interval and done < total:
                last = now
                self.send_progress(done=done, total=total)

        return progress

    def epoch_progress(self, epoch: int, done: int, total: int,
                       metrics: dict[str, Any]) -> None:
        """One event per epoch, with that epoch's validation loss and accuracies
        (``acc``: whole sequences right; ``char_acc``: characters right)."""
        self.send_progress(done=done, total=total, epoch=epoch, loss=metrics.get("loss"),
                           acc=metrics.get("seq_acc"), char_acc=metrics.get("char_acc"))


@app.task(name=GENERATE_SHARD, base=CaptrainTask, bind=True)
def generate_shard(self: CaptrainTask, job_id: int, index: int) -> str | None:
    """Render and store shard ``index`` of generate job ``job_id``."""
    return self.run_job(job_id, index, lambda: shards.generate_shard(
        job_id, index, self.worker, self.new_attempt(), self.item_progress()))


@app.task(name=SPLIT_SHARD, base=CaptrainTask, bind=True)
def split_shard(self: CaptrainTask, job_id: int, index: int) -> str | None:
    """Build output shard ``index`` of split job ``job_id``."""
    return self.run_job(job_id, index, lambda: shards.split_shard(
        job_id, index, self.worker, self.new_attempt(), self.item_progress()))


# max_retries=None: the retry while another process holds the run's lease has no
# limit (Celery's default is 3, and retry(max_retries=None) means that default).
@app.task(name=TRAIN, base=CaptrainTask, bind=True, max_retries=None)
def train(self: CaptrainTask, run_id: int, job_id: int) -> dict[str, Any] | None:
    """Train run ``run_id`` (of job ``job_id``), resuming from its last checkpoint; a
    sweep's trial that ended (done, pruned or failed) sends its sweep's next step."""
    try:
        result = self.run_job(job_id, None, lambda: training.train_run(
            run_id, self.worker, self.epoch_progress, self.new_attempt()))
    finally:
        training.after_trial(run_id)
    if result is training.HELD:
        # A live process trains this run. Look again once its lease could have gone
        # stale: if that process died on another host, this copy takes over; if the
        # run finished, this copy ends as a no-op.
        raise self.retry(countdown=get_settings().lease_stale_seconds + 20)
    return result


@app.task(name=EXPLORE, base=CaptrainTask, bind=True)
def explore(self: CaptrainTask, job_id: int) -> int | None:
    """Compute the statistics and plots of explore job ``job_id``; returns the analysis id."""
    return self.run_job(job_id, None,
                        lambda: analyses.run_explore(job_id, self.new_attempt()))


@app.task(name=REPORT, base=CaptrainTask, bind=True)
def report(self: CaptrainTask, job_id: int) -> int | None:
    """Render the report of report job ``job_id``; returns the analysis id."""
    return self.run_job(job_id, None,
                        lambda: analyses.run_report(job_id, self.new_attempt()))


@app.task(name=SWEEP_STEP, base=CaptrainTask, bind=True)
def sweep_step(self: CaptrainTask, job_id: int) -> list[int] | None:
    """Fill sweep ``job_id``'s free trial slots, or finish it; returns new train jobs."""
    return self.run_job(job_id, None, lambda: sweeps.run_step(job_id))


@app.task(name=PING)
def ping() -> str:
    return "pong"
