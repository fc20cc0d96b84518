"""Engines and sessions over the configured database, and schema upgrades.

SQLite (the embedded default) runs in WAL mode with a busy timeout, so worker
processes and the CLI can write side by side. Every SQLAlchemy error that leaves
this module is a ``DatabaseUnavailable`` (retryable) or a ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ConfigError, DatabaseUnavailable
from shared.settings import Settings, get_settings, redact_url

_engines: dict[tuple[int, str], Engine] = {}
_checked: set[str] = set()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")  # ms: writers queue instead of failing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL keeps this crash-safe
    cur.close()


# What libpq and psycopg say of a connection that an interrupt (a soft time limit is a
# signal) left inside a command, when a query or the pool's pre-ping meets it: it can
# never run another command, so it is as dead as a dropped one.
_STUCK = ("another command is already in progress",
          "connection in transaction status ACTIVE")


def _stuck_is_dead(context: Any) -> None:
    """A ``handle_error`` hook: a connection stuck mid-command counts as disconnected,
    so that SQLAlchemy invalidates it (and the pre-ping replaces it) instead of
    handing it out again."""
    message = str(context.original_exception)
    if any(words in message for words in _STUCK):
        context.is_disconnect = True


def get_engine(settings: Settings | None = None) -> Engine:
    """Return this process's engine for the configured database, upgrading the
    embedded SQLite schema on first use.

    Raises ConfigError if the schema of a server database is behind the code.
    """
    settings = settings or get_settings()
    url = settings.effective_database_url
    # Keyed by pid: a forked Celery child must not share its parent's sockets.
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        if url.startswith("sqlite"):
            if settings.database_url is None:
                settings.home.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            event.listen(engine, "handle_error", _stuck_is_dead)
        _engines[key] = engine
        if url not in _checked:
            _check_schema(engine, auto_upgrade=url.startswith("sqlite"))
            _checked.add(url)
    return engine


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock on a file beside a SQLite database while its schema is
    upgraded: processes started together on a fresh one (a cpu and a gpu worker, say)
    would otherwise each create its tables, and all but one fail."""
    import fcntl

    path = engine.url.database
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_schema(engine: Engine, auto_upgrade: bool) -> None:
    from shared import migrate

    try:
        current = migrate.current_revision(engine)
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot reach database {redact_url(str(engine.url))}: {exc.orig}"
        ) from exc
    if current == migrate.head_revision():
        return
    if auto_upgrade:
        with _migration_lock(engine):
            # Again under the lock: another process may have upgraded it meanwhile.
            if migrate.current_revision(engine) != migrate.head_revision():
                migrate.upgrade(engine)
        return
    raise ConfigError(
        f"database schema is at {current or 'nothing'}, code expects "
        f"{migrate.head_revision()}: run `captrain db upgrade`"
    )


def dispose_all() -> None:
    """Close every pooled connection (after a fork, or at exit)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """Yield a session in a transaction that commits on success, rolls back on error.

    Raises DatabaseUnavailable when the connection fails or drops.
    """
    factory = sessionmaker(get_engine(settings), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except DBAPIError as exc:
        _roll_back(session)
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            raise DatabaseUnavailable(f"database connection failed: {exc.orig}") from exc
        raise
    except BaseException:
        _roll_back(session)
        raise
    finally:
        session.close()


def _roll_back(session: Session) -> None:
    """Roll ``session`` back, or drop its connection when it cannot even do that:
    interrupted inside a query (a soft time limit is a signal), the connection is
    mid-command. The caller's error then leaves as itself, not as this rollback's."""
    try:
        session.rollback()
    except Exception:
        session.invalidate()


def insert_for(session: Session) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_update/nothing``."""
    return postgresql.insert if session.bind and session.bind.dialect.name == "postgresql" else (
        sqlite.insert
    )
