"""Following a job to its end from SQL, with rich progress bars.

Progress is read from the shard and run tables, never from the broker, so it shows
the truth even when messages are redelivered. Ctrl-C detaches; the job goes on.
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

from shared.db import session_scope
from shared.schema import DONE, Metric, Run, Shard
from shared.state import ENDED, get_job


def _poll(job_id: int) -> dict[str, Any]:
    with session_scope() as s:
        job = get_job(s, job_id)
        state: dict[str, Any] = {"status": job.status, "kind": job.kind, "error": job.error}
        if job.kind == "train":
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


def wait(job_id: int, console: Console, interval: float = 0.5, quiet: bool = False) -> str:
    """Block until the job ends; return its final status. Raises NotFound."""
    state = _poll(job_id)
    unit = "epochs" if state["kind"] == "train" else "shards"
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    started = time.monotonic()
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task(f"job {job_id} {state['kind']} ({unit})", total=state["total"],
                            info="")
        while True:
            info = ""
            if state["kind"] == "train" and state.get("val"):
                v = state["val"]
                info = (f"loss {v.get('loss', 0):.3f} char {v.get('char_acc', 0):.3f} "
                        f"seq {v.get('seq_acc', 0):.3f}")
            elif state["kind"] != "train":
                rate = state["items"] / max(time.monotonic() - started, 1e-6)
                info = f"{state['items']} items {rate:.0f}/s"
            bar.update(task, completed=state["done"], total=state["total"], info=info)
            if state["status"] in ENDED:
                break
            time.sleep(interval)
            state = _poll(job_id)
    return str(state["status"])
