"""Starting and stopping local ``celery worker`` processes (for ``worker`` and ``demo``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

APP = "shared.celery_app"


def worker_argv(queues: str, concurrency: int | None, name: str | None, loglevel: str,
                pool: str | None = None) -> list[str]:
    """The command line of a real celery worker for the captrain app.

    Events on (``-E``) for Flower. Mingle and gossip off: they share revoked task ids
    and a clock among workers, and captrain revokes nothing (cancelling is a row in
    SQL that each task reads), so they would only cost a second at every start
    (mingle waits for replies) and event traffic between every pair of workers.
    """
    argv = [sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queues,
            "--loglevel", loglevel, "-E", "--without-mingle", "--without-gossip"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if name:
        argv += ["-n", name]
    if pool:
        argv += ["-P", pool]
    return argv


def start_worker(queues: str, concurrency: int, name: str, log: Path,
                 loglevel: str = "INFO") -> subprocess.Popen[bytes]:
    """Start a worker in its own session, logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            worker_argv(queues, concurrency, name, loglevel),
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL of the whole process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
