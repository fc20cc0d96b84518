"""Cooperative stop: a warm shutdown (SIGTERM) makes a running training checkpoint
mid-epoch and go back to the queue, instead of blocking the shutdown for hours.

The worker's main process receives the signal; the training runs in a pool child.
On ``worker_shutting_down`` the main process creates a stop file named after its
own pid; training checks for its parent's (prefork) or its own (solo pool) stop file
between batches, which costs one ``stat``, and stops with ``shared.errors.StopRequested``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from celery.signals import worker_init, worker_shutting_down


def stop_file(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"captrain-stop-{pid}"


def stop_requested() -> bool:
    """True once this process's worker has begun to shut down."""
    return stop_file(os.getppid()).exists() or stop_file(os.getpid()).exists()


@worker_init.connect
def _clear_stale_stop_file(**_: Any) -> None:
    # A pid can be reused: a stop file left by an earlier worker must not stop this one.
    stop_file(os.getpid()).unlink(missing_ok=True)


@worker_shutting_down.connect
def _request_stop(**_: Any) -> None:
    stop_file(os.getpid()).touch()
