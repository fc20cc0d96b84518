"""The reconciler: re-send, from what SQL holds, the work whose message was lost, and
only that.

A message is alive when it waits in a queue (``shared.inflight`` marks it queued),
or a live worker holds it (received it: running, reserved, or held for a retry's
countdown), or SQL says a live worker runs its work (a running shard's worker, a
running run's worker). Anything else was lost: its worker died (its heartbeat in
``shared.liveness`` went stale), or the broker lost the message (a flush, a restart
without persistence). Lost work is re-sent, through the same door as submission
(``shared.dispatch.send``), and noted for ``captrain watch``.

One worker runs it every few seconds (``workers.keeper``, under a lock in Redis);
``captrain reconcile`` runs one pass by hand. Any number of passes over a backlog
adds no copy of queued work.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from shared import inflight, liveness
from shared.celery_app import TRAIN
from shared.db import session_scope
from shared.dispatch import SHARD_TASKS, Work, outstanding, send
from shared.errors import BrokerUnavailable
from shared.schema import PENDING, RUNNING, Job, Run, Shard, utcnow
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


def reconcile() -> dict[str, int]:
    """One pass: re-send every lost message of every unfinished job. Returns counts of
    re-sent shards, runs and analyses, and of messages left alone because they wait
    in a queue (``queued``) or a live worker holds them (``held``). Raises
    BrokerUnavailable (nothing is sent then)."""
    works = _unfinished()
    messages = [Message(w, name, args) for w in works for name, args in w.messages()]
    known = inflight.state([m.key for m in messages])
    if known is None:
        raise BrokerUnavailable("the broker cannot be read: nothing reconciled")
    queued, held = known
    seen, now = liveness.last_seen(), utcnow()
    live = liveness.alive(seen, now)
    holders = {**_sql_holders(works), **{k: inflight.holder(v) for k, v in held.items()}}
    counts: Counter[str] = Counter()
    lost: dict[int, list[Message]] = {}
    for msg in messages:
        if msg.key in queued:
            counts["queued"] += 1
        elif holders.get(msg.key) in live:
            counts["held"] += 1
        else:
            lost.setdefault(msg.work.job_id, []).append(msg)
    for job_id, msgs in lost.items():
        inflight.forget(m.key for m in msgs)  # a dead holder's entries
        alive_msgs = {(m.name, m.args) for m in messages
                      if m.work.job_id == job_id and m not in msgs}
        sent = send(msgs[0].work, skip=alive_msgs)
        kind = msgs[0].work.kind
        counts["shards" if kind in SHARD_TASKS else "runs" if kind == "train"
               else "analyses"] += sent
        for m in msgs[:NOTES_PER_JOB]:
            liveness.note(job_id, _why(m, holders.get(m.key), seen, now))
        if len(msgs) > NOTES_PER_JOB:
            liveness.note(job_id, f"and {len(msgs) - NOTES_PER_JOB} more; re-sent")
    _sweep({m.key for m in messages}, live)
    return {k: counts[k] for k in ("shards", "runs", "analyses", "queued", "held")}


def _sweep(outstanding_keys: set[str], live: set[str]) -> None:
    """Drop held entries of work that is finished, or whose holder is dead."""
    stale = [k for k, v in inflight.held_entries().items()
             if k not in outstanding_keys or inflight.holder(v) not in live]
    inflight.forget(stale)
