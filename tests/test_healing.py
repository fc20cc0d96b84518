"""Self-healing: a dead worker's work re-runs by itself, with no command by hand, and
a reconcile never copies work that waits in a queue."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import ON_POSTGRES, _reset_process_caches, wait_for
from rich.console import Console
from sqlalchemy import select

# The CLI-with---json and shard-listing helpers of the fault tests, shared.
from test_faults import _clean_hashes, _ok, _shards

from scheduler import watch
from shared.db import session_scope
from shared.schema import Recovery

pytestmark = pytest.mark.integration


def _notes(job_id: int) -> list[str]:
    with session_scope() as s:
        return list(s.execute(select(Recovery.message).where(Recovery.job_id == job_id)
                              .order_by(Recovery.id)).scalars())


def _heals_after_a_worker_dies(env: dict[str, str], start_worker) -> None:
    """Two cpu workers; one is killed with its whole process group mid-job; a fresh
    one starts. The job completes with no command by hand, within 2 minutes of the
    fresh worker's start, with the hashes of an undisturbed render."""
    first = start_worker(env, queues="cpu", concurrency=1)
    start_worker(env, queues="cpu", concurrency=1)
    job = _ok(["generate", "--name", "heal", "--count", "3000", "--shard-size", "100",
               "--seed", "11"])["job"]
    wait_for(lambda: any(sh.status == "running" and sh.worker and
                         sh.worker.startswith(first.name.split("@")[0])
                         for sh in _shards(job)), 120, interval=0.05,
             what="a shard rendering on the worker to kill")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the whole worker, as if its host died
    first.proc.wait()
    said = io.StringIO()
    watcher = threading.Thread(target=watch.wait, args=(job, Console(file=said, width=200)),
                               kwargs={"interval": 0.5, "stall_s": 5}, daemon=True)
    watcher.start()
    start_worker(env, queues="cpu", concurrency=1)
    fresh = time.monotonic()
    wait_for(lambda: all(sh.status == "done" for sh in _shards(job)), 120,
             what="every shard done with no command by hand")
    took = time.monotonic() - fresh
    watcher.join(30)
    notes = _notes(job)
    print(f"\nhealed {took:.0f} s after the fresh worker started; notes: {notes}")
    # `captrain watch` said why it stalled and what was re-sent.
    assert f"job {job}: shard" in said.getvalue() and "re-sent" in said.getvalue(), \
        said.getvalue()
    assert _ok(["job", str(job)])["status"] == "done"
    assert any("was held by" in n and "re-sent" in n for n in notes), notes
    assert [sh.sha256 for sh in _shards(job)] == _clean_hashes(job)


@ON_POSTGRES
def test_a_dead_workers_shard_reruns_by_itself_on_redis_and_postgresql(backend,
                                                                      start_worker):
    _heals_after_a_worker_dies(backend, start_worker)


def test_a_dead_workers_shard_reruns_by_itself_on_the_embedded_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_worker):
    from shared import embedded
    from shared.settings import get_settings

    for k in [k for k in os.environ if k.startswith("CAPTRAIN_")]:
        monkeypatch.delenv(k)
    # A worker counts as dead after 6 s here, not 30: the PostgreSQL test above heals
    # with the defaults; this one shows the embedded default heals the same way.
    env = {"CAPTRAIN_HOME": str(tmp_path / "home"), "CAPTRAIN_KEEPER_INTERVAL": "2",
           "CAPTRAIN_WORKER_DEAD_SECONDS": "6"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _reset_process_caches()
    try:
        _heals_after_a_worker_dies(env, start_worker)
    finally:
        embedded.stop(get_settings())
        _reset_process_caches()


@ON_POSTGRES
def test_reconciles_over_a_backlog_add_no_copy(backend):
    job = _ok(["generate", "--name", "backlog", "--count", "1200", "--shard-size", "10"])
    queue = redis.Redis.from_url(backend["CAPTRAIN_BROKER_URL"])
    assert queue.llen("cpu") == 120  # no worker: every message waits
    for _ in range(3):
        sent = _ok(["reconcile"])
        assert (sent["shards"], sent["queued"]) == (0, 120), sent
    assert queue.llen("cpu") == 120
    assert _ok(["job", str(job["job"])])["status"] == "pending"


@ON_POSTGRES
def test_watch_says_when_no_live_worker_serves_the_queue(backend, start_worker):
    job = _ok(["generate", "--name", "idle", "--count", "200", "--shard-size", "100"])["job"]
    said = io.StringIO()
    watcher = threading.Thread(target=watch.wait, args=(job, Console(file=said, width=200)),
                               kwargs={"interval": 0.2, "stall_s": 1}, daemon=True)
    watcher.start()
    wait_for(lambda: "no live worker serves the cpu queue" in said.getvalue(), 30,
             what="watch to say why nothing moves")
    start_worker(backend, queues="cpu", concurrency=1)
    watcher.join(120)
    assert not watcher.is_alive() and _ok(["job", str(job)])["status"] == "done"


@ON_POSTGRES
def test_a_job_committed_but_not_yet_sent_is_not_copied_by_a_reconcile(backend):
    """The reconciler reads SQL before the broker: a pass between a job's commit and
    its messages' publishing sees the work and no message. It is only suspect then;
    once the messages are out, the next pass leaves them alone."""
    from scheduler.plan import plan_generate
    from shared.dispatch import send_job
    from shared.reconcile import Reconciler
    from shared.spec import GenerateSpec

    job_id, _ = plan_generate(GenerateSpec(name="unsent", count=100, length=4,
                                           charset="digits", shard_size=10))
    queue = redis.Redis.from_url(backend["CAPTRAIN_BROKER_URL"])
    reconciler = Reconciler(confirm_s=0.5)
    reconciler.run_pass()
    assert len(_suspects(reconciler, job_id)) == 10 and _waiting(queue, job_id) == 0
    assert send_job(job_id) == 10
    time.sleep(0.6)
    reconciler.run_pass()
    assert _suspects(reconciler, job_id) == [] and _waiting(queue, job_id) == 10
    assert _notes(job_id) == []


def _suspects(reconciler, job_id: int) -> list[str]:
    return [k for k in reconciler.suspects if f"[{job_id}, " in k]


def _waiting(queue: redis.Redis, job_id: int) -> int:
    """Messages of job ``job_id`` in the cpu queue (other tests' jobs share it)."""
    import json

    return sum(json.loads(m)["headers"]["argsrepr"].startswith(f"job {job_id} ")
               for m in queue.lrange("cpu", 0, -1))


@ON_POSTGRES
def test_work_lost_in_two_passes_is_re_sent_once(backend):
    """A job whose messages the broker lost (FLUSHDB): the first pass suspects them,
    the second re-sends each once, and a third finds them queued."""
    from shared.reconcile import Reconciler

    job = _ok(["generate", "--name", "lost-twice", "--count", "100", "--shard-size", "10"])["job"]
    queue = redis.Redis.from_url(backend["CAPTRAIN_BROKER_URL"])
    queue.flushdb()
    reconciler = Reconciler(confirm_s=0.2)
    reconciler.run_pass()
    assert len(_suspects(reconciler, job)) == 10 and _waiting(queue, job) == 0
    time.sleep(0.3)
    reconciler.run_pass()
    assert _suspects(reconciler, job) == [] and _waiting(queue, job) == 10
    assert len(_notes(job)) == 10
    reconciler.run_pass()
    assert _waiting(queue, job) == 10 and len(_notes(job)) == 10


def test_a_message_received_before_its_sender_marks_it_queued_leaves_no_queued_marker(
        redis_url, monkeypatch: pytest.MonkeyPatch):
    """A worker can receive a message before its sender's next line runs: the sender's
    'published' must not then mark it queued, or the marker would outlive the message
    and hide its loss if that worker died."""
    from shared import inflight

    monkeypatch.setenv("CAPTRAIN_BROKER_URL", redis_url)
    _reset_process_caches()
    inflight._clients.clear()
    work = inflight.key("captrain.generate_shard", (999, 0))
    inflight.mark_sending([work])
    inflight.received(work, inflight.holder_tag("w1@host", "t1", 0))
    inflight.mark_published([work])
    assert inflight.state([work]) == (set(), {work: "w1@host|t1|0"})
    other = inflight.key("captrain.generate_shard", (999, 1))
    inflight.mark_sending([other])
    assert inflight.state([other]) == ({other}, {})  # being sent counts as waiting
    inflight.mark_published([other])
    assert inflight.state([other]) == ({other}, {})
    inflight.forget([work, other])
    _reset_process_caches()
