"""Following a job to its end from SQL, with rich progress bars.

Progress is read from the shard and run tables, never from the broker, so it shows
the truth even when messages are redelivered. What the reconciler re-sent for the
job is printed as it happens, and when progress stalls, the reason: a worker gone,
or no live worker serving the job's queue. Ctrl-C detaches; the job goes on.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import func, select

from shared import liveness, sweeps
from shared.db import session_scope
from shared.schema import DONE, RUNNING, Metric, Run, Shard, utcnow
from shared.state import ENDED, get_job

STALL_S = 20.0  # seconds without progress before watch says why


def stall_reasons(job_id: int, kind: str) -> list[str]:
    """Why job ``job_id`` may be making no progress, in words: its work held by a
    worker whose heartbeat stopped, or no live worker serving its queue."""
    # A sweep's trials train on the gpu queue; its steps run on the cpu queue.
    queues = {"train": ["gpu"], "sweep": ["gpu", "cpu"]}.get(kind, ["cpu"])
    seen, now = liveness.last_seen(), utcnow()
    live = liveness.alive(seen, now)
    with session_scope() as s:
        if kind == "train":
            held = [(f"run {i}", w) for i, w in s.execute(
                select(Run.id, Run.worker).where(Run.job_id == job_id, Run.status == RUNNING))]
        else:
            held = [(f"shard {i}", w) for i, w in s.execute(
                select(Shard.index, Shard.worker)
                .where(Shard.job_id == job_id, Shard.status == RUNNING))]
    reasons = [f"{what} was held by {w}, gone for {(now - seen[w]).total_seconds():.0f} s; "
               "the reconciler re-sends it" for what, w in held if w in seen and w not in live]
    for queue in queues:
        if not liveness.serving(queue):
            reasons.append(f"no live worker serves the {queue} queue "
                           f"(start one: captrain worker -Q {queue})")
    return reasons


def _poll(job_id: int) -> dict[str, Any]:
    with session_scope() as s:
        job = get_job(s, job_id)
        state: dict[str, Any] = {"status": job.status, "kind": job.kind, "error": job.error}
        if job.kind == "sweep":
            view = sweeps.summary(s, job_id)
            state.update(done=sum(view["counts"][k] for k in sweeps.FINAL),
                         total=view["trials_wanted"], best=(view["best"] or {}).get("value"))
        elif job.kind == "train":
            run = s.execute(select(Run).where(Run.job_id == job_id)).scalar_one()
            state.update(done=run.epochs_done, total=int(job.spec["epochs"]), run_id=run.id)
            last = {
                m.name: m.value
                for m in s.execute(
                    select(Metric).where(Metric.run_id == run.id, Metric.split == "val",
                                         Metric.epoch == run.epochs_done)
                ).scalars()
            }
            state["val"] = last
        else:
            total, done, items = s.execute(
                select(
                    func.count(),
                    func.count().filter(Shard.status == DONE),
                    func.coalesce(func.sum(Shard.count).filter(Shard.status == DONE), 0),
                ).where(Shard.job_id == job_id)
            ).one()
            state.update(done=done, total=total, items=items)
        return state


def wait(job_id: int, console: Console, interval: float = 0.5, quiet: bool = False,
         stall_s: float = STALL_S) -> str:
    """Block until the job ends; return its final status. Says what the reconciler
    re-sent, and why progress stalls after ``stall_s`` seconds. Raises NotFound."""
    state = _poll(job_id)
    unit = {"train": "epochs", "sweep": "trials"}.get(state["kind"], "shards")
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    started = last_move = said = time.monotonic()
    notes_seen, progress = 0, (state["done"], state.get("items"))
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task(f"job {job_id} {state['kind']} ({unit})", total=state["total"],
                            info="")
        while True:
            info = ""
            if state["kind"] == "train" and state.get("val"):
                v = state["val"]
                info = (f"loss {v.get('loss', 0):.3f} char {v.get('char_acc', 0):.3f} "
                        f"seq {v.get('seq_acc', 0):.3f}")
            elif state["kind"] == "sweep":
                info = "" if state["best"] is None else f"best {state['best']:.4f}"
            elif state["kind"] != "train":
                rate = state["items"] / max(time.monotonic() - started, 1e-6)
                info = f"{state['items']} items {rate:.0f}/s"
            bar.update(task, completed=state["done"], total=state["total"], info=info)
            if state["status"] in ENDED:
                break
            time.sleep(interval)
            state = _poll(job_id)
            for note_id, _at, message in liveness.notes(job_id, notes_seen):
                notes_seen = note_id
                bar.console.print(f"job {job_id}: {message}")
            now = time.monotonic()
            if (state["done"], state.get("items")) != progress:
                progress, last_move = (state["done"], state.get("items")), now
            elif now - last_move > stall_s and now - said > stall_s:
                said = now
                for reason in stall_reasons(job_id, state["kind"]):
                    bar.console.print(f"job {job_id}: no progress for "
                                      f"{now - last_move:.0f} s: {reason}")
    return str(state["status"])
