"""Flower, for real: a Flower process and a worker, checked through Flower's REST API
and its Prometheus endpoint; progress events checked as a monitor receives them."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, wait_for
from typer.testing import CliRunner

from scheduler.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()
AUTH = "admin:flower-pw"


def _fetch(url: str, auth: str | None = AUTH) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; status 0 when nothing answers."""
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, "", b""


def _get(url: str, auth: str | None = AUTH) -> tuple[int, Any]:
    code, _, body = _fetch(url, auth)
    return code, json.loads(body or b"null") if code == 200 else None


@contextmanager
def _flower(env: dict[str, str], log: Path) -> Iterator[str]:
    """`captrain flower` with basic auth on a free loopback port; yields its base URL."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    full.update(env, CAPTRAIN_FLOWER_BASIC_AUTH=AUTH)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "flower", "--port",
                                 str(port)], cwd=ROOT, env=full, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/api/workers", None)[0] == 401, 60,
                 what="Flower answering (and refusing an anonymous caller)")
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


class EventMonitor:
    """A second real event consumer on the broker, beside Flower: it keeps the
    ``task-progress`` events as sent and feeds every event into a
    ``celery.events.state.State``, the class Flower's own state extends. Flower's REST
    API shows only ``Task._fields``, so this is where the progress fields can be read.
    """

    def __init__(self) -> None:
        from celery.events.state import State

        from shared.celery_app import app as celery_app

        self.state = State()
        self.progress: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._conn = celery_app.connection_for_read()
        self._receiver = celery_app.events.Receiver(self._conn, handlers={"*": self._on})
        self._thread = threading.Thread(target=self._receiver.capture,
                                        kwargs={"limit": None, "timeout": None,
                                                "wakeup": True}, daemon=True)

    def _on(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.state.event(dict(event))
            if event["type"] == "task-progress":
                self.progress.append(event)
        # `wakeup` asks the workers for a heartbeat: the first event means our queue
        # is bound, so nothing sent from now on is missed.
        self.ready.set()

    def __enter__(self) -> EventMonitor:
        self._thread.start()
        assert self.ready.wait(30), "no event reached the monitor"
        return self

    def __exit__(self, *_: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._conn.release()

    def progress_of(self, uuid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.progress if e["uuid"] == uuid]

    def tasks(self, name: str) -> list[Any]:
        """The ``celery.events.state.Task`` objects of the tasks named ``name``."""
        with self._lock:
            return [t for t in self.state.tasks.values() if t.name == name]


class ProgressWatcher:
    """Polls Flower's /api/tasks?state=PROGRESS while jobs run, since Flower keeps only
    a task's latest state and every task ends as SUCCESS."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.seen: dict[str, dict[str, Any]] = {}  # uuid -> the task as Flower showed it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            code, body = _get(f"{self.base}/api/tasks?state=PROGRESS")
            for uuid, task in (body or {}).items() if code == 200 else ():
                self.seen.setdefault(uuid, task)
            self._stop.wait(0.1)

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [t for t in self.seen.values() if t["name"] == name]


def _ok(args: list[str]) -> Any:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _flower_saw_a_ping(base: str) -> bool:
    """Send a ping task; True if Flower lists a finished one within a second."""
    from shared.celery_app import PING
    from shared.celery_app import app as celery_app

    celery_app.send_task(PING)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        code, body = _get(f"{base}/api/tasks?taskname={PING}&state=SUCCESS")
        if code == 200 and body:
            return True
        time.sleep(0.1)
    return False


def test_flower_shows_the_worker_and_the_jobs_tasks(backend, start_worker, tmp_path):
    worker = start_worker(backend, queues="cpu,gpu", concurrency=1)
    with _flower(backend, tmp_path / "flower.log") as base:
        # Flower answers HTTP before its event consumer is on the broker, and events
        # sent before that are not Flower's to see: ping until Flower shows a ping.
        wait_for(lambda: _flower_saw_a_ping(base), 30, what="Flower receiving events")
        job = _ok(["generate", "--name", "flower", "--count", "60", "--shard-size", "20",
                   "--wait", "--json"])
        assert job["status"] == "done"

        def worker_listed():
            code, body = _get(f"{base}/api/workers?refresh=1")
            return code == 200 and any(w.startswith(worker.name.split("@")[0])
                                       for w in (body or {}))

        wait_for(worker_listed, 30, what="worker in /api/workers")

        def shard_tasks():
            code, body = _get(f"{base}/api/tasks")
            return [t for t in (body or {}).values()
                    if t.get("name") == "captrain.generate_shard"] if code == 200 else []

        tasks = wait_for(lambda: len(shard_tasks()) >= 5 and shard_tasks(), 30,
                         what="the job's tasks in /api/tasks")
        assert {t["state"] for t in tasks} == {"SUCCESS"}
        assert all(t["args"].startswith("job ") and " shard " in t["args"] for t in tasks)
        print(f"\nFlower: worker listed, {len(tasks)} generate_shard tasks in /api/tasks")


def _flower_counts(base: str, kind: str, name: str) -> dict[tuple, float] | None:
    """Flower's /metrics, fetched without credentials and parsed as Prometheus text
    into {(sample name, sorted labels): value}; None until some worker's
    ``flower_events_total`` for (``kind``, ``name``) is above zero."""
    from prometheus_client.parser import text_string_to_metric_families

    code, content_type, body = _fetch(f"{base}/metrics", auth=None)
    # Measured: /metrics answers without credentials even with basic auth on (Flower's
    # Metrics handler has no auth check), while the API beside it refuses them.
    assert code == 200 and content_type.startswith("text/plain"), (code, content_type)
    assert _get(f"{base}/api/tasks", None)[0] == 401
    assert _fetch(f"{base}/healthcheck", auth=None)[:1] == (200,)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    hit = any(n == "flower_events_total" and dict(labels).get("type") == kind
              and dict(labels).get("task") == name and value > 0
              for (n, labels), value in samples.items())
    return samples if hit else None


def test_flower_shows_shards_and_training_in_progress_and_serves_metrics(
        sqlite_env, start_worker, tmp_path):
    # One process renders and trains, so each task runs alone and its timing is its own.
    worker = start_worker(sqlite_env, queues="cpu,gpu", concurrency=1)
    with _flower(sqlite_env, tmp_path / "flower.log") as base, \
            EventMonitor() as monitor, ProgressWatcher(base) as watcher:
        # 1250 items: one 1000-item train shard (about 2 s of rendering: several
        # throttled progress events), and 125-item val and test shards.
        job = _ok(["generate", "--name", "prog", "--count", "1250", "--shard-size", "1000",
                   "--wait", "--json"])
        train = _ok(["train", "--dataset", "prog", "--epochs", "2", "--batch-size", "64",
                     "--wait", "--json"])
        wait_for(lambda: [t.state for t in monitor.tasks("captrain.train")] == ["SUCCESS"],
                 30, what="the train task's success event, at the monitor")
        # Flower's counters, once Flower too has seen the training end.
        samples = wait_for(lambda: _flower_counts(base, "task-succeeded", "captrain.train"),
                           30, what="the train task's success in Flower's /metrics")
    assert job["status"] == "done" and train["status"] == "done"

    # Flower showed both kinds of task in the custom state PROGRESS while they ran.
    assert watcher.named("captrain.generate_shard"), "no shard seen in PROGRESS"
    assert len(watcher.named("captrain.train")) == 1, "training not seen in PROGRESS"
    seen = watcher.named("captrain.train")[0]
    assert seen["args"] == f"run {train['run']['id']} (job {train['id']})"
    # ...but its REST API has no progress fields: it serializes Task._fields only
    # (mher/flower#453). If this fails, Flower learnt to show them: update deploy/README.
    assert not {"done", "total", "epoch"} & set(seen)

    # The progress fields, as a monitor receives them.
    shards = _ok(["job", str(job["id"]), "--json"])["shard_list"]
    counts = {f"job {job['id']} shard {s['index']}": s["count"] for s in shards}
    shard_events = 0
    for task in monitor.tasks("captrain.generate_shard"):
        events = monitor.progress_of(task.uuid)
        shard_events += len(events)
        done = [e["done"] for e in events]
        assert done == sorted(done) and all(0 < d < counts[task.args] for d in done)
        assert all(e["total"] == counts[task.args] for e in events)
        # Throttled: at most one event per PROGRESS_INTERVAL (0.5 s) of the task's run.
        assert len(events) <= task.runtime / 0.5 + 1, (len(events), task.runtime)
    assert shard_events >= 1

    [task] = monitor.tasks("captrain.train")
    epochs = monitor.progress_of(task.uuid)
    run = _ok(["run", str(train["run"]["id"]), "--json"])
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e, stored in zip(epochs, run["per_epoch"], strict=True):
        assert (e["done"], e["total"]) == (e["epoch"] * 1000, 2 * 1000)
        # The very numbers written to SQL for that epoch.
        assert e["loss"] == pytest.approx(stored["val_loss"])
        assert e["acc"] == pytest.approx(stored["val_seq_acc"])
        assert e["char_acc"] == pytest.approx(stored["val_char_acc"])
    # Celery's State (Flower's base) keeps the last progress fields after SUCCESS.
    assert task.state == "SUCCESS" and (task.epoch, task.done, task.total) == (2, 2000, 2000)

    # Flower's Prometheus endpoint counted the progress events, by task and worker.
    host = task.worker.hostname
    assert host.startswith(worker.name.split("@")[0])

    def events_total(kind: str, name: str) -> float:
        return samples.get(("flower_events_total", (("task", name), ("type", kind),
                                                    ("worker", host))), 0.0)

    assert events_total("task-progress", "captrain.train") == 2
    assert events_total("task-progress", "captrain.generate_shard") == shard_events
    assert events_total("task-succeeded", "captrain.generate_shard") == 3
    assert samples[("flower_worker_online", (("worker", host),))] == 1.0
    print(f"\nPROGRESS seen in Flower for {len(watcher.seen)} tasks; "
          f"{shard_events} shard and 2 epoch progress events")


def test_a_progress_event_the_broker_refuses_is_logged_and_the_task_goes_on(
        monkeypatch, caplog):
    from celery import Celery

    from workers import tasks

    monkeypatch.setattr(tasks, "_progress_paused_until", 0.0)
    # A real connection attempt to a port nothing listens on.
    down = Celery("down", broker=f"redis://127.0.0.1:{free_port()}/0")
    down.conf.broker_connection_timeout = 2

    @down.task(bind=True, base=tasks.CaptrainTask)
    def long_task(self):
        return None

    long_task.push_request(id="progress-test", hostname="w@h")
    try:
        with caplog.at_level(logging.WARNING, logger=tasks.log.name):
            long_task.send_progress(done=1, total=2)  # does not raise
            assert "progress event not sent" in caplog.text
            # Later events skip the broker for a while instead of each waiting for
            # its connection timeout.
            caplog.clear()
            start = time.monotonic()
            for done in range(2, 50):
                long_task.send_progress(done=done, total=50)
            assert time.monotonic() - start < 0.5 and not caplog.records
    finally:
        long_task.pop_request()


def test_flower_refuses_to_bind_beyond_loopback_without_auth(backend, monkeypatch):
    monkeypatch.delenv("CAPTRAIN_FLOWER_BASIC_AUTH", raising=False)
    result = runner.invoke(app, ["flower", "--address", "0.0.0.0"])
    assert result.exit_code == 3
    assert result.output.strip().startswith("error: Flower would be open to the network")
