from __future__ import annotations

import os
from typing import Any

import pytest

from shared.errors import ConfigError
from shared.settings import load_settings, redact_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("CAPTRAIN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("CAPTRAIN_HOME", str(tmp_path))


def test_no_settings_means_the_embedded_default(tmp_path):
    s = load_settings()
    assert s.embedded_broker
    assert s.effective_broker_url == f"redis+socket://{tmp_path}/redis.sock"
    assert s.effective_database_url == f"sqlite:///{tmp_path}/captrain.db"


def test_an_unknown_captrain_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("CAPTRAIN_BROKER_ULR", "redis://x")
    with pytest.raises(ConfigError, match="unknown setting CAPTRAIN_BROKER_ULR"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [("CAPTRAIN_BROKER_URL", "amqp://guest@localhost//"),
     ("CAPTRAIN_DATABASE_URL", "mysql://root@localhost/x"),
     ("CAPTRAIN_VISIBILITY_TIMEOUT", "soon"),
     ("CAPTRAIN_VISIBILITY_TIMEOUT", "5"),
     ("CAPTRAIN_ARTIFACT_CHUNK_BYTES", "-1"),
     ("CAPTRAIN_MAX_ATTEMPTS", "0"),
     ("CAPTRAIN_TRAIN_CACHE_MIB", "-1"),
     ("CAPTRAIN_PROGRESS_INTERVAL", "0"),
     ("CAPTRAIN_LOG_LEVEL", "LOUD")],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_a_heartbeat_that_would_let_a_live_lease_go_stale_is_refused(monkeypatch):
    monkeypatch.setenv("CAPTRAIN_HEARTBEAT_SECONDS", "100")
    with pytest.raises(ConfigError, match=r"^invalid settings: heartbeat_seconds must be at "
                                          r"most half of lease_stale_seconds"):
        load_settings()
    monkeypatch.setenv("CAPTRAIN_LEASE_STALE_SECONDS", "200")
    assert load_settings().heartbeat_seconds == 100


def test_every_tunable_has_a_help_text_with_its_unit():
    from shared.settings import Settings

    for name, field in Settings.model_fields.items():
        assert field.description, name
    for name in ("lease_stale_seconds", "heartbeat_seconds", "visibility_timeout",
                 "progress_interval"):
        assert "second" in (Settings.model_fields[name].description or "").lower(), name
    for name in ("train_cache_mib", "val_cache_mib"):
        assert "MiB" in (Settings.model_fields[name].description or ""), name


def test_plain_postgresql_urls_get_the_psycopg3_driver(monkeypatch):
    monkeypatch.setenv("CAPTRAIN_DATABASE_URL", "postgresql://u:p@db/captrain")
    assert load_settings().database_url == "postgresql+psycopg://u:p@db/captrain"


def test_passwords_are_redacted_everywhere_settings_are_shown(monkeypatch):
    monkeypatch.setenv("CAPTRAIN_BROKER_URL", "rediss://:s3cret@redis.example:6380/0")
    monkeypatch.setenv("CAPTRAIN_DATABASE_URL", "postgresql://bob:hunter2@db:5432/ct")
    shown = repr(load_settings().redacted())
    assert "s3cret" not in shown and "hunter2" not in shown
    assert "rediss://:***@redis.example:6380/0" in shown
    assert "bob:***@db:5432" in shown


def test_query_string_passwords_are_redacted_too():
    shown = redact_url("postgresql://u@db/ct?sslmode=require&password=hunter2")
    assert "hunter2" not in shown and "password=***" in shown and "sslmode=require" in shown


def test_postgres_scheme_is_accepted_and_gets_the_driver(monkeypatch):
    monkeypatch.setenv("CAPTRAIN_DATABASE_URL", "postgres://u@db/ct")
    assert load_settings().database_url == "postgresql+psycopg://u@db/ct"


def test_redact_leaves_urls_without_password_alone():
    for url in ("redis://127.0.0.1:6379/0", "sqlite:////tmp/x/captrain.db",
                "redis+socket:///tmp/x/redis.sock"):
        assert redact_url(url) == url


def _first_use(url: str, start: Any, out: Any) -> None:
    os.environ["CAPTRAIN_DATABASE_URL"] = url
    from shared import db

    start.wait()
    try:
        db.get_engine()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_starting_together_on_a_fresh_sqlite_database_all_get_its_schema(tmp_path):
    """A cpu and a gpu worker started at once on a new CAPTRAIN_HOME: each process's
    first use upgrades the embedded database; one creates the tables, none fails."""
    import multiprocessing as mp

    from sqlalchemy import create_engine

    from shared import migrate

    ctx = mp.get_context("spawn")
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_first_use, args=(url, start, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert results == ["ok"] * 3
    engine = create_engine(url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()
