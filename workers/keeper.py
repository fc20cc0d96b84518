"""What keeps a worker's work from being lost, run in its main process:

- a heartbeat in SQL every ``keeper_interval`` seconds (``shared.liveness``), by
  which the reconciler tells a dead worker's work from a live one's;
- the reconciler itself (``shared.reconcile``), run by exactly one worker at a time
  across all machines: the one that holds a lock in the broker's Redis, which
  expires after three intervals, so a dead holder is replaced within seconds;
- the in-flight markers of the messages it receives and finishes
  (``shared.inflight``).

Why inside the workers and not a beat process: wherever work can run, a worker runs,
so the embedded default, ``captrain demo`` and every deployment reconcile with no
extra process to start, monitor or forget; and the lock keeps one active.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import task_postrun, task_received, worker_ready, worker_shutdown

from shared import inflight, liveness
from shared.reconcile import Reconciler
from shared.settings import get_settings

log = logging.getLogger(__name__)
LOCK = "captrain:reconciler"


class Keeper(threading.Thread):
    """The heartbeat and, while it holds the lock, the reconciler of one worker."""

    def __init__(self, name: str, queues: str) -> None:
        super().__init__(name="captrain-keeper", daemon=True)
        self.worker, self.queues = name, queues
        settings = get_settings()
        self.interval = settings.keeper_interval
        self.stopped = threading.Event()
        self.reconciler = Reconciler(settings.reconcile_confirm_seconds)

    def run(self) -> None:
        while True:
            self.tick()
            if self.stopped.wait(self.interval):
                return

    def tick(self) -> None:
        """One beat, then one reconcile pass if this worker leads. Never raises: a
        database or broker that is down now is tried again next tick."""
        try:
            liveness.beat(self.worker, os.getpid(), self.queues)
        except Exception as exc:
            log.warning("heartbeat not written: %s", exc)
        try:
            if not self._lead():
                self.reconciler.forget()
                return
            sent = self.reconciler.run_pass()
            if sent["shards"] or sent["runs"] or sent["analyses"] or sent["steps"]:
                log.warning("reconciler re-sent lost work: %s", sent)
        except Exception as exc:
            log.warning("reconcile pass failed: %s", exc)

    def _lead(self) -> bool:
        """Take or keep the reconciler lock. Two workers may both lead for one pass
        if the lock expires between the check and the renewal: a pass re-sends only
        lost work, and what it sends is marked, so the second pass finds nothing."""
        return inflight.lead(LOCK, self.worker, int(self.interval * 3 * 1000))


_keeper: Keeper | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _keeper
    queues = ",".join(sorted(q.name for q in sender.task_consumer.queues))
    _keeper = Keeper(sender.hostname, queues)
    _keeper.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _keeper is not None:
        _keeper.stopped.set()


@task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    # In the main process, as the message arrives (to run now, reserved, or for a
    # countdown).
    inflight.received(inflight.key(request.name, request.args or ()),
                      inflight.holder_tag(request.hostname, request.id,
                                          int(request.request_dict.get("retries") or 0)))


@task_postrun.connect
def _finished(sender: Any = None, task_id: str = "", args: Any = (), **_: Any) -> None:
    # In the pool process that ran it, whatever the outcome.
    inflight.released(inflight.key(sender.name, args or ()), inflight.holder_tag(
        sender.request.hostname, task_id, sender.request.retries or 0))
