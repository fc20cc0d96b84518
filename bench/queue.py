"""Queue overhead: trivial-task dispatch rate through Redis, drain rate, and
submit-to-start latency (p50, p99) from Celery's own task events.

    python bench/queue.py [--tasks 3000]

The baseline, measured side by side, is raw redis-py LPUSH of a message of the same
size on the same broker: the ratio is what Celery's publish path costs over it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.harness import isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--idle", type=int, default=200, help="tasks for the idle latency")
    args = ap.parse_args()
    n = args.tasks

    import redis

    from shared.celery_app import PING, app
    from shared.embedded import ensure_broker
    from shared.settings import get_settings

    settings = get_settings()
    ensure_broker(settings)
    if settings.embedded_broker:
        raw = redis.Redis(unix_socket_path=str(settings.redis_socket))
    else:
        raw = redis.Redis.from_url(settings.effective_broker_url)
    body = b"x" * 900  # about the size of a Celery protocol-2 ping message
    t0 = time.perf_counter()
    for _ in range(n):
        raw.lpush("bench-baseline", body)
    raw_rate = n / (time.perf_counter() - t0)
    raw.delete("bench-baseline")

    sent: dict[str, float] = {}
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    done = threading.Event()

    def on_started(event: dict) -> None:
        started[event["uuid"]] = event["timestamp"]

    def on_succeeded(event: dict) -> None:
        finished[event["uuid"]] = event["timestamp"]
        if len(finished) >= n:
            done.set()

    def listen() -> None:
        with app.connection() as conn:
            recv = app.events.Receiver(conn, handlers={
                "task-started": on_started, "task-succeeded": on_succeeded})
            recv.capture(limit=None, timeout=None, wakeup=True)

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(1.0)  # the receiver binds its queue before anything is sent
    with workers("cpu", 1, HOME):
        with app.producer_or_acquire() as producer:
            t0 = time.perf_counter()
            for _ in range(n):
                ts = time.time()
                r = app.send_task(PING, producer=producer)
                sent[r.id] = ts
            dispatch = n / (time.perf_counter() - t0)
        done.wait(300)
        batch_end = [finished[k] for k in sent if k in finished]
        backlog_lat = sorted((started[k] - sent[k]) * 1000 for k in sent if k in started)
        # Latency on an idle queue: one task at a time, the next sent once it started.
        idle: list[float] = []
        for _ in range(args.idle):
            ts = time.time()
            tid = app.send_task(PING).id
            deadline = time.monotonic() + 10
            while tid not in started and time.monotonic() < deadline:
                time.sleep(0.0005)
            if tid in started:
                idle.append((started[tid] - ts) * 1000)
        idle.sort()
    drain = len(batch_end) / (max(batch_end) - min(sent.values()))
    print(f"machine: {machine()}")
    print(f"raw redis LPUSH (baseline):   {raw_rate:8.0f} msgs/s")
    print(f"celery dispatch (send_task):  {dispatch:8.0f} tasks/s "
          f"(ratio to raw LPUSH {dispatch / raw_rate:.3f})")
    print(f"drain, 1 worker process:      {drain:8.0f} tasks/s ({len(batch_end)}/{n} ran)")
    for label, lat in (("idle queue", idle), (f"backlog of {n}", backlog_lat)):
        if lat:
            print(f"submit-to-start latency, {label}: p50 {statistics.median(lat):.1f} ms, "
                  f"p99 {lat[max(0, int(len(lat) * 0.99) - 1)]:.1f} ms ({len(lat)} tasks)")


if __name__ == "__main__":
    main()
