"""Operating explore and report jobs like every other job: reconcile re-sends them,
retry re-runs them, cancel makes their task a no-op, a poison message ends failed,
and an artifact an analysis file names is never deleted."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ON_POSTGRES, scratch_pg_database, wait_for
from sqlalchemy import create_engine, func, inspect, select, text, update
from typer.testing import CliRunner

from scheduler.analysis import fetch, plan_explore
from scheduler.cli import app
from shared.db import session_scope
from shared.dispatch import send_job
from shared.schema import Analysis, AnalysisFile, Artifact, ArtifactChunk, Job, Shard
from shared.settings import get_settings

runner = CliRunner()
IRIS_FILES = ["covariance.csv", "pairplot.png", "sepal-scatter.png", "stats.csv"]


def _ok(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _job(job_id: int) -> tuple[str, int, str | None]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        return job.status, job.attempts, job.error


def _analysis_files(job_id: int) -> list[str]:
    with session_scope() as s:
        return sorted(s.execute(
            select(AnalysisFile.name).join(Analysis, Analysis.id == AnalysisFile.analysis_id)
            .where(Analysis.job_id == job_id)).scalars())


def _queued(env: dict[str, str]) -> int:
    """Messages waiting in the cpu queue (kombu's Redis list of that name)."""
    return int(redis.Redis.from_url(env["CAPTRAIN_BROKER_URL"]).llen("cpu"))


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


# --- reconcile ------------------------------------------------------------------------

@pytest.mark.integration
@ON_POSTGRES
def test_reconcile_resends_explore_jobs_whose_messages_were_lost(backend, start_worker):
    pending = plan_explore("iris")
    send_job(pending)
    lost = plan_explore("iris")
    with session_scope() as s:
        # As if a worker had taken it and died with its host: its message is gone.
        s.execute(update(Job).where(Job.id == lost).values(status="running", attempts=1))
    assert _queued(backend) == 1
    redis.Redis.from_url(backend["CAPTRAIN_BROKER_URL"]).flushdb()  # every message gone
    assert _queued(backend) == 0

    sent = _ok("reconcile")
    assert sent == {"shards": 0, "runs": 0, "analyses": 2, "steps": 0, "queued": 0,
                    "held": 0, "suspect": 0}
    assert _queued(backend) == 2
    start_worker(backend, queues="cpu", concurrency=1)
    wait_for(lambda: _job(pending)[0] == _job(lost)[0] == "done", 120, what="both done")
    for job_id in (pending, lost):
        assert _analysis_files(job_id) == IRIS_FILES
        result = fetch(job_id)
        assert (result.kind, result.subject, result.summary["n"]) == ("explore", "iris", 150)
    assert _job(pending)[1] == 1 and _job(lost)[1] == 2  # one attempt each on top

    # Idempotent: done jobs are not sent again, and a job whose analysis is stored is
    # complete even if its row still says running.
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == lost).values(status="running"))
    assert _ok("reconcile")["analyses"] == 0
    assert _job(lost)[0] == "done" and _queued(backend) == 0
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(Analysis)).scalar_one() == 2
    print(f"\nreconcile after FLUSHDB: re-sent {sent['analyses']} explore tasks; both done "
          f"with {len(IRIS_FILES)} files each; a second reconcile re-sent none")


# --- cancel and retry -------------------------------------------------------------

@pytest.mark.integration
def test_a_cancelled_explore_job_is_a_noop_for_its_worker_and_retry_runs_it(
        sqlite_env, start_worker):
    job_id = plan_explore("iris")
    send_job(job_id)
    assert _ok("cancel", str(job_id))["cancelled"] is True
    worker = start_worker(sqlite_env, queues="cpu", concurrency=1)
    wait_for(lambda: "captrain.explore[" in worker.log.read_text()
             and " succeeded in " in worker.log.read_text(), 60,
             what="the queued message to run")
    assert _queued(sqlite_env) == 0
    assert _job(job_id) == ("cancelled", 0, None)  # not even counted as an attempt
    assert _analysis_files(job_id) == []

    again = _ok("retry", str(job_id), "--wait")
    assert again["status"] == "done" and again["kind"] == "explore"
    assert _analysis_files(job_id) == IRIS_FILES
    assert _ok("cancel", str(job_id))["cancelled"] is False  # already ended


@ON_POSTGRES
@pytest.mark.integration
def test_a_report_failed_on_a_corrupt_test_shard_is_retried_once_it_is_repaired(
        backend, start_worker, tmp_path):
    start_worker(backend, queues="cpu,gpu", concurrency=1)
    gen = _ok("generate", "--name", "tiny-rep", "--count", "80", "--shard-size", "40",
              "--seed", "5", "--wait")
    run = _ok("train", "--dataset", "tiny-rep", "--epochs", "1", "--batch-size", "32",
              "--wait")["run"]
    with session_scope() as s:
        sha = s.execute(select(Shard.sha256).where(Shard.job_id == gen["id"],
                                                   Shard.split == "test")).scalar_one()
        chunk = s.get(ArtifactChunk, (sha, 0))
        good = bytes(chunk.data)
        chunk.data = good[:-1] + bytes([good[-1] ^ 0xFF])  # one flipped bit pattern

    failed = runner.invoke(app, ["report", str(run["id"]), "--out", str(tmp_path / "never")])
    assert failed.exit_code == 1, failed.output
    assert "failed its sha256 check" in failed.output and not (tmp_path / "never").exists()
    with session_scope() as s:
        job_id = s.execute(select(Job.id).where(Job.kind == "report")).scalar_one()
    assert _job(job_id)[0] == "failed" and _analysis_files(job_id) == []

    with session_scope() as s:
        s.get(ArtifactChunk, (sha, 0)).data = good  # the shard is repaired
    again = _ok("retry", str(job_id), "--wait")
    assert again["status"] == "done" and again["error"] is None
    assert _analysis_files(job_id) == ["confusion.png", "curves.png", "grid.png",
                                       "index.html", "summary.json"]
    summary = fetch(job_id).summary
    assert summary["evaluated"] == summary["test_items"] == 8
    assert summary["seq_acc"] == pytest.approx(run["test"]["seq_acc"], abs=1e-9)
    print(f"\nreport retried after repairing shard {sha[:12]}: {summary['evaluated']} "
          f"items, seq_acc {summary['seq_acc']:.4f}")


# --- attempts ---------------------------------------------------------------------

@ON_POSTGRES
@pytest.mark.integration
def test_an_explore_job_whose_worker_is_killed_each_time_fails_after_bounded_attempts(
        backend, start_worker):
    MAX_ATTEMPTS = get_settings().max_attempts

    job_id = plan_explore("iris")
    send_job(job_id)
    engine = create_engine(backend["CAPTRAIN_DATABASE_URL"])
    holder = engine.connect()
    try:
        # Every attempt hangs on storing its analysis (it marked its attempt first),
        # and is killed there: a message that kills its worker each time.
        holder.execute(text("LOCK TABLE analyses IN EXCLUSIVE MODE"))
        worker = start_worker(backend, queues="cpu", concurrency=1)
        for n in range(1, MAX_ATTEMPTS + 1):
            wait_for(lambda n=n: _job(job_id)[:2] == ("running", n), 60,
                     what=f"attempt {n}")
            for child in _children(worker.proc.pid):
                os.kill(child, signal.SIGKILL)
        # reject_on_worker_lost puts the message back each time; the next delivery
        # finds the attempts used up.
        wait_for(lambda: _job(job_id)[0] == "failed", 60, what="failed job")
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
    status, attempts, error = _job(job_id)
    print(f"\npoison explore: {status} after {attempts} attempts: {error}")
    assert attempts == MAX_ATTEMPTS and _analysis_files(job_id) == []
    assert error is not None and f"gave up after {MAX_ATTEMPTS} attempts" in error

    # Retry starts the count again, and the job finishes now that nothing kills it.
    again = _ok("retry", str(job_id), "--wait")
    assert again["status"] == "done" and _analysis_files(job_id) == IRIS_FILES
    assert _job(job_id)[1] == 1


def test_attempts_are_counted_per_delivery_not_per_celery_retry(backend):
    from shared.errors import StateError
    from shared.state import start_job

    MAX_ATTEMPTS = get_settings().max_attempts

    job_id = plan_explore("iris")
    for n in range(1, MAX_ATTEMPTS + 1):
        assert start_job(job_id, "explore") == {"dataset": "iris"}
        assert _job(job_id)[:2] == ("running", n)
    # A retry after a transient error is the same attempt going on.
    assert start_job(job_id, "explore", count_attempt=False) == {"dataset": "iris"}
    assert _job(job_id)[1] == MAX_ATTEMPTS
    assert start_job(job_id, "explore") is None
    status, attempts, error = _job(job_id)
    assert (status, attempts) == ("failed", MAX_ATTEMPTS)
    assert error == (f"explore gave up after {MAX_ATTEMPTS} attempts: none of them "
                     "finished (each worker was killed or lost mid-task)")
    assert start_job(job_id, "explore") is None and _job(job_id)[1] == MAX_ATTEMPTS
    with pytest.raises(StateError, match="is a explore job, not report"):
        start_job(job_id, "report")

    cancelled = plan_explore("iris")
    assert _ok("cancel", str(cancelled))["cancelled"] is True
    assert start_job(cancelled, "explore") is None and _job(cancelled)[:2] == ("cancelled", 0)


# --- artifacts --------------------------------------------------------------------

def test_an_artifact_named_by_an_analysis_file_is_never_deleted(backend):
    from shared.artifacts import delete_if_unreferenced, put_bytes, referencing_columns
    from workers.jobs.analyses import run_explore

    assert {f"{c.table.name}.{c.name}" for c in referencing_columns()} == {
        "shards.sha256", "runs.checkpoint_sha256", "models.weights_sha256",
        "analysis_files.sha256"}
    job_id = plan_explore("iris")
    assert run_explore(job_id) is not None
    before = fetch(job_id).files
    with session_scope() as s:
        # The PostgreSQL database is shared by the session's tests: this job's files.
        shas = list(s.execute(
            select(AnalysisFile.sha256).join(Analysis, Analysis.id == AnalysisFile.analysis_id)
            .where(Analysis.job_id == job_id)).scalars())
    assert len(shas) == len(IRIS_FILES)
    for sha in shas:
        with session_scope() as s:
            assert delete_if_unreferenced(s, sha) is False
    assert fetch(job_id).files == before  # every byte still there, hash-checked

    with session_scope() as s:
        loose = put_bytes(s, uuid.uuid4().bytes, "application/octet-stream")
    with session_scope() as s:
        assert delete_if_unreferenced(s, loose) is True
    with session_scope() as s:
        assert s.get(Artifact, loose) is None
        assert s.execute(select(func.count()).select_from(ArtifactChunk)
                         .where(ArtifactChunk.sha256 == loose)).scalar_one() == 0


# --- migrations 0004, 0005 and 0006 ----------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of its own, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    with scratch_pg_database("captrain_mig") as url:
        yield url


def test_migration_0004_gives_existing_jobs_zero_attempts_and_downgrades(empty_db):
    from alembic import command

    from shared import migrate

    engine = create_engine(empty_db)
    try:
        migrate.upgrade(engine, "0003")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (kind, status, spec, settings, created_at) VALUES "
                "('report', 'failed', '{}', '{}', CURRENT_TIMESTAMP)"))
        migrate.upgrade(engine, "0004")
        assert migrate.current_revision(engine) == "0004"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind, attempts FROM jobs")).all() == [
                ("report", 0)]
        command.downgrade(migrate.alembic_config(engine), "0003")
        assert "attempts" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind FROM jobs")).scalars().all() == ["report"]
    finally:
        engine.dispose()


def _insert_generate(conn, spec: dict) -> None:
    conn.execute(text("INSERT INTO jobs (kind, status, spec, settings, created_at, attempts) "
                      "VALUES ('generate', 'done', :spec, '{}', CURRENT_TIMESTAMP, 0)"),
                 {"spec": json.dumps(spec)})


def test_migration_0005_marks_earlier_image_jobs_png_and_downgrades_only_without_pgm(
        empty_db):
    from alembic import command

    from shared import migrate
    from shared.spec import GenerateSpec

    before = {"name": "old", "count": 20, "length": 4, "charset": "0123456789",
              "shard_size": 10}
    engine = create_engine(empty_db)
    try:
        migrate.upgrade(engine, "0004")
        with engine.begin() as conn:
            _insert_generate(conn, {**before, "kind": "image"})
            _insert_generate(conn, {**before, "name": "voice", "kind": "audio"})
        migrate.upgrade(engine, "0005")
        assert migrate.current_revision(engine) == "0005"

        def specs() -> dict:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT spec FROM jobs")).scalars().all()
            parsed = [json.loads(r) if isinstance(r, str) else r for r in rows]  # SQLite: text
            return {spec["name"]: spec for spec in parsed}

        upgraded = specs()
        assert GenerateSpec(**upgraded["old"]).image_format == "png"  # as it was rendered
        assert "image_format" not in upgraded["voice"]
        with engine.begin() as conn:
            _insert_generate(conn, GenerateSpec(**{**before, "name": "new"}).model_dump())
        with pytest.raises(RuntimeError, match="store grey PGM images"):
            command.downgrade(migrate.alembic_config(engine), "0004")
        assert migrate.current_revision(engine) == "0005"  # refused, nothing changed
        assert {name: spec for name, spec in specs().items() if name != "new"} == upgraded
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id = (SELECT MAX(id) FROM jobs)"))
        command.downgrade(migrate.alembic_config(engine), "0004")
        assert migrate.current_revision(engine) == "0004"
        assert all("image_format" not in s for s in specs().values())
    finally:
        engine.dispose()


def test_migration_0006_names_each_jobs_dataset_from_its_shards_or_run_and_downgrades(
        empty_db):
    from alembic import command

    from shared import migrate

    engine = create_engine(empty_db)
    now = "CURRENT_TIMESTAMP"
    try:
        migrate.upgrade(engine, "0005")
        with engine.begin() as conn:
            for kind in ("generate", "train", "explore"):
                conn.execute(text(
                    "INSERT INTO jobs (kind, status, spec, settings, created_at, attempts) "
                    f"VALUES (:kind, 'done', '{{}}', '{{}}', {now}, 0)"), {"kind": kind})
            for name in ("a", "b"):  # a and b: ids 1 and 2
                conn.execute(text(
                    "INSERT INTO datasets (name, kind, status, charset, length, width, "
                    f"height, count, meta, created_at) VALUES (:n, 'captcha', 'ready', "
                    f"'0123456789', 4, 160, 60, 10, '{{}}', {now})"), {"n": name})
            conn.execute(text("INSERT INTO shards (job_id, dataset_id, \"index\", split, "
                              "seed, start, count, status, attempts) "
                              "VALUES (1, 2, 0, 'train', 0, 0, 10, 'done', 0)"))
            conn.execute(text("INSERT INTO runs (job_id, dataset_id, status, model, "
                              f"epochs_done, attempts, created_at) "
                              f"VALUES (2, 1, 'done', 'multihead', 1, 0, {now})"))
        migrate.upgrade(engine, "0006")
        assert migrate.current_revision(engine) == "0006"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind, dataset_id FROM jobs ORDER BY id")).all() \
                == [("generate", 2), ("train", 1), ("explore", None)]
        command.downgrade(migrate.alembic_config(engine), "0005")
        assert "dataset_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM jobs")).scalar() == 3
    finally:
        engine.dispose()
