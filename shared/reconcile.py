"""The reconciler: re-send, from what SQL holds, the work whose message was lost, and
only that.

A message is alive when it waits in a queue (``shared.inflight`` marks it queued),
or a live worker holds it (received it: running, reserved, or held for a retry's
countdown), or SQL says a live worker runs its work (a running shard's worker, a
running run's worker). Anything else was lost: its worker died (its heartbeat in
``shared.liveness`` went stale), or the broker lost the message (a flush, a restart
without persistence). Lost work is re-sent, through the same door as submission
(``shared.dispatch.send``), and noted for ``captrain watch``.

A message is re-sent only when it looked lost in two passes ``confirm_s`` apart:
SQL is read before the markers, so one pass alone can miss a message that a sender
publishes right after its job's commit, or a task that ends between the two reads
(it releases its marker after its SQL commit, which the next pass then sees).

One worker runs it every few seconds (``workers.keeper``, under a lock in Redis),
keeping one ``Reconciler`` and its suspects from pass to pass; ``captrain
reconcile`` runs two passes by hand. Any number of passes over a backlog adds no
copy of queued work.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from shared import inflight, liveness
from shared.celery_app import SWEEP_STEP, TRAIN
from shared.db import session_scope
from shared.dispatch import SHARD_TASKS, Work, outstanding, send
from shared.errors import BrokerUnavailable
from shared.schema import PENDING, RUNNING, Job, Run, Shard, utcnow
from shared.settings import get_settings
from shared.state import complete_if_analysed, complete_if_done

log = logging.getLogger(__name__)
NOTES_PER_JOB = 20  # recovery notes per job and pass; the rest are counted in one


@dataclass(frozen=True)
class Message:
    work: Work
    name: str
    args: tuple[Any, ...]

    @property
    def key(self) -> str:
        return inflight.key(self.name, self.args)

    def what(self) -> str:
        if self.name in SHARD_TASKS.values():
            return f"shard {self.args[1]}"
        if self.name == SWEEP_STEP:
            return "the sweep's next step"
        return f"run {self.args[0]}" if self.name == TRAIN else f"{self.work.kind} task"


def _unfinished() -> list[Work]:
    with session_scope() as s:
        ids = s.execute(select(Job.id).where(Job.status.in_([PENDING, RUNNING]))
                        .order_by(Job.id)).scalars().all()
    works = []
    for job_id in ids:
        work = outstanding(job_id)
        if work.kind in SHARD_TASKS and not work.shards:
            # Every shard done but the job not marked: its last worker died between
            # the two commits.
            complete_if_done(job_id)
        elif work.analysis and complete_if_analysed(job_id):
            continue
        works.append(work)
    return works


def _sql_holders(works: list[Work]) -> dict[str, str]:
    """Work that SQL says a worker runs now: key -> that worker's name."""
    shard_jobs = [w.job_id for w in works if w.kind in SHARD_TASKS and w.shards]
    runs = [w.run_id for w in works if w.run_id is not None]
    out: dict[str, str] = {}
    with session_scope() as s:
        if shard_jobs:
            for job_id, index, worker, kind in s.execute(
                    select(Shard.job_id, Shard.index, Shard.worker, Job.kind)
                    .join(Job, Job.id == Shard.job_id)
                    .where(Shard.job_id.in_(shard_jobs), Shard.status == RUNNING)):
                if worker:
                    out[inflight.key(SHARD_TASKS[kind], (job_id, index))] = worker
        if runs:
            for run_id, job_id, worker in s.execute(
                    select(Run.id, Run.job_id, Run.worker)
                    .where(Run.id.in_(runs), Run.status == RUNNING)):
                if worker:
                    out[inflight.key(TRAIN, (run_id, job_id))] = worker
    return out


def _why(msg: Message, holder: str | None, seen: dict[str, datetime], now: datetime) -> str:
    if holder is None:
        return f"{msg.what()} had no message waiting in a queue (the broker lost it); re-sent"
    gone = f"gone for {(now - seen[holder]).total_seconds():.0f} s" if holder in seen \
        else "never seen alive"
    return f"{msg.what()} was held by {holder}, {gone}; re-sent"


class Reconciler:
    """Passes of the reconciler, remembering what looked lost in the last one: work is
    re-sent once it has looked lost in passes at least ``confirm_s`` seconds apart."""

    def __init__(self, confirm_s: float) -> None:
        self.confirm_s = confirm_s
        self.suspects: dict[str, float] = {}  # message key -> monotonic time first seen lost

    def forget(self) -> None:
        """Drop the suspects (this process stopped leading: another reconciles now)."""
        self.suspects.clear()

    def run_pass(self) -> dict[str, int]:
        """One pass: re-send every confirmed lost message of every unfinished job.
        Returns counts of re-sent shards, runs, analyses and sweep steps; of messages left alone
        because they wait in a queue (``queued``) or a live worker holds them
        (``held``); and of those that look lost for the first time (``suspect``).
        Raises BrokerUnavailable (nothing is sent then)."""
        works = _unfinished()
        messages = [Message(w, name, args) for w in works for name, args in w.messages()]
        known = inflight.state([m.key for m in messages])
        if known is None:
            raise BrokerUnavailable("the broker cannot be read: nothing reconciled")
        queued, held = known
        seen, now, clock = liveness.last_seen(), utcnow(), time.monotonic()
        live = liveness.alive(seen, now)
        holders = {**_sql_holders(works),
                   **{k: inflight.holder(v) for k, v in held.items()}}
        counts: Counter[str] = Counter()
        lost: dict[int, list[Message]] = {}
        suspects: dict[str, float] = {}
        for msg in messages:
            if msg.key in queued:
                counts["queued"] += 1
            elif holders.get(msg.key) in live:
                counts["held"] += 1
            elif clock - self.suspects.get(msg.key, clock) >= self.confirm_s:
                lost.setdefault(msg.work.job_id, []).append(msg)
            else:
                suspects[msg.key] = self.suspects.get(msg.key, clock)
                counts["suspect"] += 1
        self.suspects = suspects  # what is alive again, or done, is no longer suspect
        for job_id, msgs in lost.items():
            what, sent = _resend(job_id, msgs, messages, holders, seen, now)
            counts[what] += sent
        _sweep({m.key for m in messages}, live)
        return {k: counts[k] for k in ("shards", "runs", "analyses", "steps", "queued",
                                       "held", "suspect")}


def _resend(job_id: int, msgs: list[Message], messages: list[Message],
            holders: dict[str, str], seen: dict[str, datetime], now: datetime
            ) -> tuple[str, int]:
    """Re-send job ``job_id``'s lost ``msgs`` (not its other messages, alive or
    suspect) and note why; returns what they count as, and how many were sent."""
    inflight.forget(m.key for m in msgs)  # a dead holder's entries
    others = {(m.name, m.args) for m in messages
              if m.work.job_id == job_id and m not in msgs}
    sent = send(msgs[0].work, skip=others)
    for m in msgs[:NOTES_PER_JOB]:
        liveness.note(job_id, _why(m, holders.get(m.key), seen, now))
    if len(msgs) > NOTES_PER_JOB:
        liveness.note(job_id, f"and {len(msgs) - NOTES_PER_JOB} more; re-sent")
    kind = msgs[0].work.kind
    what = {"train": "runs", "sweep": "steps"}.get(kind, "analyses")
    return ("shards" if kind in SHARD_TASKS else what), sent


def reconcile(confirm_s: float | None = None) -> dict[str, int]:
    """Two passes ``confirm_s`` seconds apart (default: ``reconcile_confirm_seconds``),
    as ``captrain reconcile`` runs them: re-send what was lost in both. Returns the
    second pass's counts (see ``Reconciler.run_pass``). Raises BrokerUnavailable."""
    r = Reconciler(get_settings().reconcile_confirm_seconds if confirm_s is None
                   else confirm_s)
    first = r.run_pass()
    if not first["suspect"]:
        return first
    time.sleep(r.confirm_s)
    return r.run_pass()


def _sweep(outstanding_keys: set[str], live: set[str]) -> None:
    """Drop held entries of work that is finished, or whose holder is dead, and
    sending entries of finished work."""
    stale = [k for k, v in inflight.held_entries().items()
             if k not in outstanding_keys or inflight.holder(v) not in live]
    stale += [k for k in inflight.sending_entries() if k not in outstanding_keys]
    inflight.forget(stale)
