"""The lease of a training run: which process trains it, renewed by heartbeats.

A run is long, so a second delivery of its message (late acks, a reconcile) must
not train it beside the first. The delivery that takes the lease trains; another
finds it held and stands down, until the holder's heartbeat goes stale
(``lease_stale_seconds``) or its process is seen dead on this host.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from shared import liveness
from shared.db import session_scope
from shared.errors import Cancelled, LeaseLost
from shared.schema import CANCELLED, Run, utcnow
from shared.settings import get_settings
from shared.state import ENDED, admit_attempt, fail_job, get_run


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


def _worker_is_dead(worker: str | None) -> bool:
    """Whether the Celery worker ``worker`` beat once and has gone silent since: on any
    host, a run it held can be taken over without waiting for its lease to go stale."""
    if worker is None:
        return False
    seen = liveness.last_seen()
    return worker in seen and worker not in liveness.alive(seen)


def acquire_run(run_id: int, owner: str, count_attempt: bool = True) -> str:
    """Take the lease of a run for ``owner`` ("host:pid"), counting an attempt if
    ``count_attempt`` (a Celery retry goes on with one already counted).

    Returns "acquired", "done" (nothing to do), "held" (another live process trains
    it: this delivery is a duplicate) or "exhausted" (attempts used up; the run is
    then marked failed). The compare-and-set UPDATE makes two simultaneous
    deliveries agree on one winner. Raises NotFound.
    """
    now = utcnow()
    stale = now - timedelta(seconds=get_settings().lease_stale_seconds)
    with session_scope() as s:
        run = get_run(s, run_id)
        if run.status in ENDED:
            return "done"
        attempts, job_id, holder = run.attempts, run.job_id, run.lease_owner
        free = or_(Run.lease_owner.is_(None), Run.lease_owner == owner,
                   Run.heartbeat_at < stale)
        if holder is not None and (_owner_is_dead(holder) or _worker_is_dead(run.worker)):
            free = or_(free, Run.lease_owner == holder)
        got = admit_attempt(s, Run, run_id, attempts, count_attempt,
                            Run.status.notin_(ENDED), free,
                            lease_owner=owner, heartbeat_at=now)
        if got is not None:
            return "acquired" if got else "held"
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


def heartbeat(session: Session, run_id: int, owner: str) -> None:
    """Renew the lease inside ``session``. Raises Cancelled if the run was cancelled,
    LeaseLost if another process holds it."""
    got = session.execute(
        update(Run).where(Run.id == run_id, Run.lease_owner == owner,
                          Run.status != CANCELLED)
        .values(heartbeat_at=utcnow())
    )
    if int(got.rowcount) != 1:  # type: ignore[attr-defined]
        if session.execute(select(Run.status).where(Run.id == run_id)).scalar() == CANCELLED:
            raise Cancelled(f"run {run_id} was cancelled")
        raise LeaseLost(f"run {run_id} was taken over by another worker")
