"""Jobs once submitted: list, show, follow, cancel, retry, reconcile."""

from __future__ import annotations

from typing import Annotated

import typer

from scheduler.cli.args import JsonOpt, WaitOpt, parse_id
from scheduler.cli.render import console, emit, err_console, job_summary, show_job
from shared.errors import SpecError

commands = typer.Typer()


def follow(job_id: int, wait: bool, as_json: bool) -> None:
    """After a submission: follow the job to its end with ``wait`` (exit 1 unless it is
    done), or say how to follow it."""
    from scheduler import status, watch

    if wait:
        import time

        t0 = time.monotonic()
        final = watch.wait(job_id, err_console if as_json else console, quiet=as_json)
        took = time.monotonic() - t0
        detail = status.job_detail(job_id)
        if as_json:
            emit({k: v for k, v in detail.items() if k != "shard_list"}, True)
        else:
            console.print(job_summary(detail, final, took), highlight=False)
        if final != "done":
            raise typer.Exit(1)
    elif as_json:
        emit({"job": job_id, "status": "pending"}, True)
    else:
        console.print(f"job {job_id} submitted; follow it with `captrain watch {job_id}`")


@commands.command()
def jobs(as_json: JsonOpt = False) -> None:
    """List jobs, newest first."""
    from scheduler.status import list_jobs

    emit(list_jobs(), as_json, ["id", "kind", "name", "status", "shards_done", "shards",
                                "created", "error"], "jobs", optional=["created", "kind"])


@commands.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """One job with per-shard progress."""
    from scheduler.status import job_detail

    d = job_detail(parse_id(job_id, "job"))
    if as_json:
        emit(d, True)
    else:
        show_job(d)


@commands.command()
def watch(job_id: str) -> None:
    """Follow a job with progress bars until it ends (Ctrl-C detaches)."""
    follow(parse_id(job_id, "job"), True, False)


@commands.command()
def cancel(job_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a job: queued tasks become no-ops, running ones stop at their next
    shard boundary or checkpoint."""
    from shared.state import cancel_job

    jid = parse_id(job_id, "job")
    changed = cancel_job(jid)
    if as_json:
        emit({"job": jid, "cancelled": changed}, True)
    else:
        console.print(f"job {jid} cancelled" if changed else f"job {jid} had already ended")


@commands.command()
def retry(job_id: str, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Re-run what a failed or cancelled job left undone (training resumes from its
    checkpoint)."""
    from shared.dispatch import send_job
    from shared.state import reopen_job

    jid = parse_id(job_id, "job")
    reopen_job(jid)
    send_job(jid)
    follow(jid, wait, as_json)


@commands.command("reconcile")
def reconcile_cmd(
    as_json: JsonOpt = False,
    every: Annotated[float | None, typer.Option(
        help="Repeat every this many seconds (for a service); Ctrl-C stops.")] = None,
) -> None:
    """Re-send the lost messages of unfinished jobs from SQL (workers do this by
    themselves every few seconds; this is one round by hand: two passes, and what
    looked lost in both is re-sent)."""
    import time

    from shared.reconcile import Reconciler, reconcile
    from shared.settings import get_settings

    if every is not None and every < 10:
        raise SpecError("--every must be at least 10 seconds")
    # Repeated: one pass each time, and what stays lost from one to the next is re-sent.
    repeated = Reconciler(get_settings().reconcile_confirm_seconds)
    while True:
        sent = reconcile() if every is None else repeated.run_pass()
        if as_json:
            emit(sent, True)
        else:
            console.print(f"re-sent {sent['shards']} shard tasks, {sent['runs']} runs, "
                          f"{sent['analyses']} analyses and {sent['steps']} sweep steps; "
                          f"left {sent['queued']} waiting in queues and {sent['held']} "
                          "that live workers hold")
        if every is None:
            return
        time.sleep(every)
