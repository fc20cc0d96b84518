"""The model registry: every finished run is a numbered version of a name, with an
alias to move, an archive flag and its lineage; on SQLite and PostgreSQL, through
the CLI and real workers."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from captcha.image import ImageCaptcha
from conftest import ON_POSTGRES, ROOT, scratch_pg_database
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.plan import plan_train
from shared import registry
from shared.db import session_scope
from shared.lease import acquire_run
from shared.schema import Job, Model, ModelAlias, Run
from shared.spec import TrainSpec
from workers.device import Speedups
from workers.jobs.training import RunRecorder

runner = CliRunner()
IRIS_TEST = {"cv_acc": 0.95, "cv_std": 0.02, "folds": 5, "fold_acc": [0.95] * 5}


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _refused(args: list[str]) -> tuple[int, str]:
    """The exit code and the one line a refused command prints."""
    result = runner.invoke(app, args)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return result.exit_code, lines[0]


def _unique(prefix: str) -> str:
    # PostgreSQL keeps one database for the test session: names must not meet.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _finished(register: str | None = None, owner: str = "test:1") -> int:
    """Plan an Iris run and finish it with an untrained model, as a train job's
    recorder does, without a worker: a registered version in a fraction of a second.
    Returns the run id."""
    run_id, _ = plan_train(TrainSpec(dataset="iris", model="logreg", register=register))
    assert acquire_run(run_id, owner) == "acquired"
    with session_scope() as s:
        dataset_id = s.get(Run, run_id).dataset_id
    RunRecorder(run_id, owner, 0, 5).finish(dataset_id, torch.nn.Linear(4, 3),
                                            {"arch": "logreg"}, 5, IRIS_TEST)
    return run_id


def _version(run_id: int) -> tuple[str, int]:
    with session_scope() as s:
        m = s.execute(select(Model).where(Model.run_id == run_id)).scalar_one()
        return m.name, m.version


# --- real workers -----------------------------------------------------------------------

@pytest.mark.integration
def test_trainings_become_numbered_versions_with_lineage_and_predict_follows_an_alias(
        backend, start_worker, tmp_path):
    start_worker(backend, queues="cpu,gpu", concurrency=2)
    name, other = _unique("reg"), _unique("other")
    made = json.loads(_ok(["generate", "--name", name, "--count", "200", "--shard-size",
                           "100", "--seed", "4", "--wait", "--json"]))
    assert made["status"] == "done"
    iris = json.loads(_ok(["train", "--dataset", "iris", "--model", "logreg", "--register",
                           other, "--wait", "--json"]))["run"]
    runs = [json.loads(_ok(["train", "--dataset", name, "--epochs", "1", "--batch-size",
                            "32", "--seed", str(seed), "--wait", "--json"]))["run"]
            for seed in (0, 1)]

    # Two trainings of one dataset: versions 1 and 2 of its name; --register: another.
    listed = {(m["name"], m["version"]): m for m in json.loads(_ok(["models", "--json"]))}
    assert listed[(name, 1)]["run"] == runs[0]["id"]
    assert listed[(name, 2)]["run"] == runs[1]["id"]
    assert listed[(other, 1)]["run"] == iris["id"] and (other, 2) not in listed
    assert listed[(name, 1)]["seq_acc"] == runs[0]["test"]["seq_acc"]
    assert listed[(other, 1)]["cv_acc"] == iris["test"]["cv_acc"]
    assert json.loads(_ok(["run", str(runs[1]["id"]), "--json"]))["registered"] == f"{name}@2"

    # The lineage says what made version 1: the dataset's shards, spec, settings, code.
    shown = json.loads(_ok(["model", f"{name}@1", "--json"]))
    lin = shown["lineage"]
    layout = json.loads(_ok(["job", str(made["id"]), "--json"]))["shard_list"]
    assert lin["dataset"]["shards"] == [s["sha256"] for s in layout]  # in index order
    assert len(layout) == 4 and all(lin["dataset"]["shards"])
    assert lin["dataset"]["name"] == name and lin["dataset"]["kind"] == "captcha"
    assert lin["dataset"]["spec"]["count"] == 200 and lin["dataset"]["spec"]["seed"] == 4
    assert lin["train_spec"]["register"] == name and lin["train_spec"]["seed"] == 0
    assert lin["settings"]["database_url"] == backend["CAPTRAIN_DATABASE_URL"]
    assert lin["captrain_version"] == importlib.metadata.version("captrain")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True)
    assert lin["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert lin["torch_version"] == importlib.metadata.version("torch")
    assert lin["captcha_version"] == importlib.metadata.version("captcha")
    assert lin["device"] == "cpu"
    # What the worker chose for this CPU: bf16 and channels_last where it has AMX or
    # AVX512-BF16, the plain loop elsewhere.
    assert lin["speedups"] == dataclasses.asdict(Speedups.for_device(torch.device("cpu")))
    assert lin["test"]["seq_acc"] == shown["test"]["seq_acc"] == runs[0]["test"]["seq_acc"]
    assert lin["run"] == runs[0]["id"]
    iris_lin = json.loads(_ok(["model", f"{other}@1", "--json"]))["lineage"]
    assert iris_lin["dataset"]["kind"] == "iris" and iris_lin["dataset"]["shards"] == []
    assert iris_lin["test"]["cv_acc"] == iris["test"]["cv_acc"]
    assert iris_lin["train_spec"]["register"] == other

    # predict --model NAME@production reads with the version the alias names.
    images = []
    for i, text_ in enumerate(("0123", "9876", "5555")):
        images.append(str(tmp_path / f"plain-{i}.png"))
        ImageCaptcha(160, 60).write(text_, images[-1])

    def read(ref: str) -> tuple[set[str], list[tuple[str, float]]]:
        rows = json.loads(_ok(["predict", "--model", ref, "--json", *images]))
        return {r["model"] for r in rows}, [(r["text"], r["confidence"]) for r in rows]

    by_run = [read(str(r["id"]))[1] for r in runs]
    assert by_run[0] != by_run[1]  # two seeds, two models: the check below can fail
    for version in (1, 2):
        _ok(["models", "alias", f"{name}@{version}", "production"])
        assert read(f"{name}@production") == ({f"{name}@{version}"}, by_run[version - 1])
    assert read(name) == ({f"{name}@2"}, by_run[1])  # a bare name: the newest


# --- registering ------------------------------------------------------------------------

def test_planning_writes_the_model_name_into_the_stored_spec(backend):
    other = _unique("named")
    stored = []
    for extra in ([], ["--register", other]):
        out = json.loads(_ok(["train", "--dataset", "iris", "--model", "logreg", "--json",
                              *extra]))
        with session_scope() as s:
            stored.append(s.get(Job, out["job"]).spec["register"])
    assert stored == ["iris", other]


def test_a_model_name_that_is_not_a_plain_name_is_refused_before_any_row(backend):
    with session_scope() as s:
        jobs = s.execute(select(func.count()).select_from(Job)).scalar_one()
    code, line = _refused(["train", "--dataset", "iris", "--model", "logreg",
                           "--register", "bad/x"])
    assert code == 2 and "register: String should match pattern" in line
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == jobs


def test_a_finished_run_is_registered_once_however_often_finish_is_called(backend):
    name = _unique("once")
    run_id = _finished(name)
    with session_scope() as s:
        dataset_id = s.get(Run, run_id).dataset_id

    def state() -> tuple:
        with session_scope() as s:
            run = s.get(Run, run_id)
            rows = s.execute(select(Model.name, Model.version, Model.weights_sha256,
                                    Model.metrics, Model.created_at)
                             .where(Model.run_id == run_id)).all()
            return run.status, run.finished_at, rows

    before = state()
    # Other weights and metrics: a second finish must not store them.
    RunRecorder(run_id, "test:1", 0, 5).finish(dataset_id, torch.nn.Linear(4, 3),
                                               {"arch": "logreg"}, 5, {**IRIS_TEST,
                                                                       "cv_acc": 0.5})
    assert state() == before
    assert [r[:2] for r in before[2]] == [(name, 1)]
    assert _version(_finished(name)) == (name, 2)


def test_a_finisher_that_read_a_taken_version_takes_the_next_one(backend, monkeypatch):
    name = _unique("race")
    assert _version(_finished(name)) == (name, 1)
    real, asked = registry.next_version, []

    def stale(session, model_name):
        # The first answer is what a finisher read before another one committed.
        asked.append(model_name)
        return 1 if len(asked) == 1 else real(session, model_name)

    monkeypatch.setattr(registry, "next_version", stale)
    assert _version(_finished(name)) == (name, 2)
    assert asked == [name, name]  # refused by the unique key once, then retried


@ON_POSTGRES
def test_two_runs_finishing_at_once_on_postgres_get_versions_1_and_2(backend, monkeypatch):
    name = _unique("at-once")
    plans = []
    for i in range(2):
        run_id, _ = plan_train(TrainSpec(dataset="iris", model="logreg", register=name))
        assert acquire_run(run_id, f"test:{i}") == "acquired"
        plans.append(run_id)
    real, both_read = registry.next_version, threading.Barrier(2, timeout=30)
    first = threading.local()

    calls = []

    def together(session, model_name):
        version = real(session, model_name)
        calls.append(version)
        if not getattr(first, "done", False):  # both read before either inserts
            first.done = True
            both_read.wait()
        return version

    monkeypatch.setattr(registry, "next_version", together)
    errors: list[BaseException] = []

    with session_scope() as s:
        iris_id = s.get(Run, plans[0]).dataset_id

    def finish(i: int) -> None:
        try:
            RunRecorder(plans[i], f"test:{i}", 0, 5).finish(
                iris_id, torch.nn.Linear(4, 3), {"arch": "logreg"}, 5, IRIS_TEST)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(_version(r) for r in plans) == [(name, 1), (name, 2)]
    assert sorted(calls) == [1, 1, 2]  # both read 1; the unique key sent one back


# --- aliases, archive, references -------------------------------------------------------

def test_an_alias_moves_in_one_row_and_refuses_names_that_read_as_versions(backend):
    name = _unique("alias")
    runs = [_finished(name) for _ in range(2)]
    for version in (1, 2):
        _ok(["models", "alias", f"{name}@{version}", "production"])
        shown = json.loads(_ok(["model", f"{name}@production", "--json"]))
        assert (shown["version"], shown["aliases"]) == (version, ["production"])
    _ok(["models", "alias", str(runs[0]), "staging"])  # a run id names a version too
    with session_scope() as s:
        rows = s.execute(select(ModelAlias.alias, Model.version).join(
            Model, Model.id == ModelAlias.model_id).where(ModelAlias.name == name)
            .order_by(ModelAlias.alias)).all()
    assert [tuple(r) for r in rows] == [("production", 2), ("staging", 1)]
    for alias in ("latest", "12", "a/b"):
        code, line = _refused(["models", "alias", f"{name}@1", alias])
        assert code == 2 and "must be a plain name" in line
    code, line = _refused(["models", "alias", name, "production"])
    assert code == 2 and f"{name}@VERSION or a run id" in line


def test_an_archived_version_is_passed_over_by_its_bare_name_and_latest(backend):
    name = _unique("arch")
    runs = [_finished(name) for _ in range(2)]
    _ok(["models", "alias", f"{name}@2", "production"])
    code, line = _refused(["models", "archive", f"{name}@2"])
    assert code == 7 and "production" in line  # an alias names it: refused
    assert json.loads(_ok(["model", name, "--json"]))["archived"] is False
    _ok(["models", "alias", f"{name}@1", "production"])
    _ok(["models", "archive", f"{name}@2"])

    def ref(r: str) -> int:
        return json.loads(_ok(["model", r, "--json"]))["version"]

    assert ref(name) == ref("latest") == 1
    assert ref(f"{name}@2") == ref(str(runs[1])) == 2  # read when named exactly
    listed = {m["version"]: m for m in json.loads(_ok(["models", "--json"]))
              if m["name"] == name}
    assert listed[2]["archived"] is True and listed[1]["archived"] is False
    code, line = _refused(["models", "alias", f"{name}@2", "production"])
    assert code == 7 and "archived" in line

    _ok(["models", "alias", f"{name}@1", "production"])
    code, line = _refused(["models", "archive", f"{name}@1"])
    assert code == 7  # production still names it
    with session_scope() as s:
        s.execute(ModelAlias.__table__.delete().where(ModelAlias.name == name))
    _ok(["models", "archive", f"{name}@1"])
    code, line = _refused(["model", name])
    assert code == 4 and "every version" in line
    _ok(["models", "unarchive", f"{name}@1"])
    _ok(["models", "archive", f"{name}@2", "--undo"])
    assert ref(name) == 2


@pytest.mark.parametrize("command", ["model", "predict"])
@pytest.mark.parametrize(
    "ref,code,message",
    [
        ("x@", 2, "a version or an alias goes after '@'"),
        ("@1", 2, "is not NAME, NAME@VERSION, NAME@ALIAS, a run id or latest"),
        ("{name}@0", 2, "versions count from 1"),
        ("{name}@a@b", 2, "must be a plain name"),
        ("{name}@prod", 4, "has no alias 'prod'"),
        ("{name}@7", 4, "has no version 7"),
        ("no-such-model", 4, "no trained model named 'no-such-model'"),
        ("99999999999", 4, "no trained model for run 99999999999"),
    ],
)
def test_a_bad_model_reference_prints_one_error_line_with_its_exit_code(
        backend, tmp_path, command, ref, code, message):
    name = _unique("refs")
    _finished(name)
    ref, message = ref.format(name=name), message.format(name=name)
    args = (["model", ref] if command == "model"
            else ["predict", "--model", ref, str(tmp_path / "any.png")])
    got, line = _refused(args)
    assert got == code and message in line, line


def test_the_model_tables_stay_readable_at_80_columns(backend):
    name = _unique("a-rather-long-model-name")  # 33 characters
    run_id = _finished(name)
    _ok(["models", "alias", f"{name}@1", "production"])
    for args in (["models"], ["model", name], ["model", str(run_id)]):
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, result.output
        assert max(len(ln) for ln in result.output.splitlines()) <= 80, result.output
        assert name in result.output and "production" in result.output, result.output
    assert "cross-validated accuracy 0.9500" in result.output


# --- migration 0007 ---------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of its own, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    with scratch_pg_database("captrain_mig") as url:
        yield url


def test_migration_0007_numbers_existing_models_by_dataset_name_and_downgrades(empty_db):
    from alembic import command

    from shared import migrate

    engine = create_engine(empty_db)
    # (model id, dataset, created): "b" out of id order, "a" tied on time (id decides).
    made = [(1, "b", "2026-01-03"), (2, "a", "2026-01-02"), (3, "b", "2026-01-01"),
            (4, "a", "2026-01-02"), (5, "a", "2026-01-01")]
    try:
        migrate.upgrade(engine, "0006")
        with engine.begin() as conn:
            for ds in ("a", "b"):
                conn.execute(text(
                    "INSERT INTO datasets (name, kind, status, charset, length, width, "
                    "height, count, meta, created_at) VALUES (:n, 'captcha', 'ready', "
                    "'0123456789', 4, 160, 60, 10, '{}', CURRENT_TIMESTAMP)"), {"n": ds})
            conn.execute(text("INSERT INTO artifacts (sha256, size, chunks, media_type, "
                              "created_at) VALUES (:sha, 0, 0, 'x', CURRENT_TIMESTAMP)"),
                         {"sha": "0" * 64})
            for model_id, ds, created in made:
                ds_id = 1 if ds == "a" else 2
                conn.execute(text(
                    "INSERT INTO jobs (kind, status, spec, settings, created_at, attempts, "
                    "dataset_id) VALUES ('train', 'done', :spec, '{}', CURRENT_TIMESTAMP, "
                    "0, :ds)"), {"spec": json.dumps({"dataset": ds, "seed": model_id}),
                                 "ds": ds_id})
                conn.execute(text(
                    "INSERT INTO runs (job_id, dataset_id, status, model, device, "
                    "epochs_done, attempts, created_at) VALUES (:id, :ds, 'done', "
                    "'multihead', 'cpu', 1, 0, CURRENT_TIMESTAMP)"),
                    {"id": model_id, "ds": ds_id})
                conn.execute(text(
                    "INSERT INTO models (id, run_id, dataset_id, weights_sha256, config, "
                    "metrics, created_at) VALUES (:id, :id, :ds, :sha, '{}', :m, :t)"),
                    {"id": model_id, "ds": ds_id, "sha": "0" * 64, "t": f"{created} 00:00:00",
                     "m": json.dumps({"seq_acc": model_id / 10})})
        migrate.upgrade(engine, "0007")
        assert migrate.current_revision(engine) == "0007"
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, name, version, archived, lineage "
                                     "FROM models ORDER BY id")).all()
        assert [(r[0], r[1], r[2], bool(r[3])) for r in rows] == [
            (1, "b", 2, False), (2, "a", 2, False), (3, "b", 1, False), (4, "a", 3, False),
            (5, "a", 1, False)]
        lineage = {r[0]: json.loads(r[4]) if isinstance(r[4], str) else r[4] for r in rows}
        assert lineage[4]["train_spec"] == {"dataset": "a", "seed": 4}
        assert lineage[4]["test"] == {"seq_acc": 0.4} and lineage[4]["device"] == "cpu"
        assert lineage[4]["dataset"]["shards"] is None  # not known truly any more
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE models SET version = 1 WHERE id = 4"))
        command.downgrade(migrate.alembic_config(engine), "0006")
        assert {"name", "version", "archived", "lineage"}.isdisjoint(
            c["name"] for c in inspect(engine).get_columns("models"))
        assert "model_aliases" not in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(text("models"))).scalar() == 5
    finally:
        engine.dispose()

