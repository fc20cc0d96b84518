"""The SQL schema: the system of record for jobs, datasets, runs and artifacts.

Redis only carries ids; everything needed to drive a job to completion again lives
in these tables. Unique keys make every task's write an idempotent upsert:
a shard is keyed by (job_id, index), a metric by (run_id, epoch, split, name), an
artifact by its sha256, a model version by (name, version), an alias by (name, alias).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Named constraints so that Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp in UTC, timezone-aware in Python on every database. SQLite stores it
    without an offset and gives it back naive: comparing that with an aware time
    (in Python, as the ORM does to keep a session in step with an UPDATE ... WHERE
    heartbeat_at < :stale) would raise. Same DDL as ``DateTime(timezone=True)``."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: Any
                             ) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None \
            else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# Status values. Plain strings, so that a status is readable in psql and in --json.
PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
PRUNED = "pruned"  # a sweep's trial that its pruner stopped at an epoch's end
READY = "ready"
SPLITS = ("train", "val", "test")


class Job(Base):
    """One user request: generate, import, split, train, explore, report or sweep."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Resolved settings at submission, passwords redacted: a result is traceable
    # to what produced it.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # The dataset the job builds (generate, import, split) or reads (train, report).
    # use_alter: datasets.layout_job_id points back here, and a cycle of foreign keys
    # has no creation order without it.
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", use_alter=True), index=True, default=None)
    # Deliveries of the task of a job that is one task (explore, report), counted so
    # that a message that kills its worker each time ends failed; jobs made of shards
    # or a run count on those rows instead.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    shards: Mapped[list[Shard]] = relationship(back_populates="job", order_by="Shard.index")


class Dataset(Base):
    """A named, sharded dataset. ``layout_job_id`` is the job whose shards it reads."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # captcha | imported | mnist | audio | iris
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    charset: Mapped[str] = mapped_column(Text)
    length: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    layout_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    # What the kind needs beyond the columns: for audio, the sample rate.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Shard(Base):
    """One unit of work and of data: ``count`` items of one split."""

    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_shards_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))  # train | val | test | source
    seed: Mapped[int] = mapped_column(BigInteger)
    start: Mapped[int] = mapped_column(Integer, default=0)  # first item, within its split
    count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256"), default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    job: Mapped[Job] = relationship(back_populates="shards")


class Run(Base):
    """One training run; its job row carries status and spec."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    model: Mapped[str] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(32), default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("artifacts.sha256"), default=None
    )
    resumed_from: Mapped[int | None] = mapped_column(Integer, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When training first began (a sweep's trial time is finished_at - started_at).
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # The lease: which process ("host:pid") trains this run, and when it last said so.
    # A second delivery of the train message finds a live lease and stands down.
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class Metric(Base):
    """One number of one epoch: loss, char_acc or seq_acc of a split."""

    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "epoch", "split", "name", name="uq_metrics_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Float)


class Model(Base):
    """A trained model: safetensors weights plus the JSON config that reads images.

    Each is one version of a named model (shared.registry): (name, version) is
    unique, and versions of a name count from 1 in the order runs finished.
    """

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    # An archived version is read only when named by version or run id.
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    weights_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    # What produced it: dataset and shard hashes, spec, settings, versions, device.
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelAlias(Base):
    """A movable name (``production``) for one version of a model: one row per
    (model name, alias), so moving the alias is an upsert of that row."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Analysis(Base):
    """What an explore or report job found: a JSON summary plus named files."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # explore | report
    subject: Mapped[str] = mapped_column(String(64))  # a dataset name or "run <id>"
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    files: Mapped[list[AnalysisFile]] = relationship(order_by="AnalysisFile.name")


class AnalysisFile(Base):
    """One named file of an analysis (a PNG plot, an HTML page), stored as an artifact."""

    __tablename__ = "analysis_files"

    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))


class Artifact(Base):
    """A content-addressed blob; its bytes live in ``artifact_chunks``."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunks: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ArtifactChunk(Base):
    __tablename__ = "artifact_chunks"

    sha256: Mapped[str] = mapped_column(
        ForeignKey("artifacts.sha256", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


Index("ix_runs_status", Run.status)


class WorkerBeat(Base):
    """A worker's last sign of life: its main process writes it every few seconds
    (``workers.keeper``). Work a worker held whose beat has gone stale is lost."""

    __tablename__ = "worker_beats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery hostname
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(String(255))  # comma-separated
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Recovery(Base):
    """One thing the reconciler did for a job, in words that ``captrain watch``
    shows: "shard 17 was held by w1@host, gone for 45 s; re-sent"."""

    __tablename__ = "recoveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    message: Mapped[str] = mapped_column(Text)


class Trial(Base):
    """One trial of a sweep: its train job and run, and what the sampler drew for it.
    Its state and values are its run's status and metrics (``shared.sweeps``)."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("sweep_job_id", "number", name="uq_trials_sweep_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 0, 1, ... in the order asked
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Optuna's JSON of each parameter's distribution, and what its sampler and pruner
    # recorded on the trial (a grid point, successive halving's rungs).
    distributions: Mapped[dict[str, Any]] = mapped_column(JSON)
    system_attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
