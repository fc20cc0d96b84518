"""Hyperparameter sweeps: the search-space grammar, pruning decisions over real rows,
and a whole sweep on real workers (2 trials at once on two gpu-queue processes) that
survives the SIGKILL of a trial's worker, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import wait_for
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.errors import SpecError
from shared.schema import Job, Metric, Run, Trial
from shared.space import parse_dimension, parse_space

runner = CliRunner()

SPACE = ["lr=loguniform(1e-3,1e-2)", "batch_size=choice(16,32)", "channels=int(8,16)",
         "model=choice(multihead,crnn)"]


def _ok(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the space ------------------------------------------------------------------------

def test_each_kind_of_dimension_parses_to_its_bounds_or_choices():
    assert parse_dimension("lr=loguniform(1e-4, 1e-2)").args == (1e-4, 1e-2)
    assert parse_dimension("batch_size=choice(32,64,128)").args == (32, 64, 128)
    assert parse_dimension("channels=int(16,64)").args == (16, 64)
    assert parse_dimension("model=choice(multihead,crnn)").args == ("multihead", "crnn")
    assert parse_dimension("scale=uniform(0.4,0.6)").kind == "uniform"
    assert parse_dimension("channels=int(8,10)").grid() == [8, 9, 10]


@pytest.mark.parametrize(("text", "message"), [
    ("lr", "is not NAME=KIND(ARGS)"),
    ("lr=loguniform(1e-2)", "needs two numbers"),
    ("lr=loguniform(0,1e-2)", "needs a low above 0"),
    ("lr=uniform(0.1,0.01)", "must be below high"),
    ("lr=gauss(1,2)", "unknown kind gauss()"),
    ("seed=int(1,5)", "seed cannot be searched"),
    ("model=uniform(1,2)", "model takes choice()"),
    ("channels=int(1.5,8)", "int() needs whole numbers"),
    ("batch_size=choice(32,32)", "repeats a value"),
    ("model=choice(multihead,resnet9000)", "the value 'resnet9000' is not valid"),
    ("batch_size=int(0,64)", "the value 0 is not valid"),
])
def test_a_bad_dimension_is_one_clear_error(text, message):
    with pytest.raises(SpecError) as err:
        parse_space([text], {"dataset": "d"})
    assert message in str(err.value), str(err.value)


def test_a_dimension_cannot_be_both_searched_and_fixed_nor_named_twice():
    with pytest.raises(SpecError, match="both searched"):
        parse_space(["lr=uniform(0.001,0.01)"], {"dataset": "d", "lr": 0.003})
    with pytest.raises(SpecError, match="names lr twice"):
        parse_space(["lr=uniform(0.001,0.01)", "lr=choice(0.1)"], {"dataset": "d"})
    with pytest.raises(SpecError, match="grid needs choice"):
        parse_space(["lr=uniform(0.001,0.01)"], {"dataset": "d"}, grid=True)


@pytest.mark.parametrize(("extra", "message"), [
    (["--space", "lr=gauss(1,2)"], "unknown kind"),
    ([], "at least one --space"),
    (["--space", "lr=uniform(0.001,0.01)", "--trials", "0"], "trials"),
    (["--space", "lr=uniform(0.001,0.01)", "--metric", "test_seq_acc"], "metric"),
    (["--space", "model=choice(multihead,logreg)"], "does not fit dataset"),
    (["--space", "lr=uniform(0.001,0.01)", "--sampler", "grid"], "grid needs choice"),
])
def test_a_bad_sweep_is_one_error_line_exit_2_and_writes_no_row(sqlite_env, extra, message):
    _ok(["generate", "--name", "sw", "--count", "40", "--shard-size", "20"])
    before = _counts()
    result = runner.invoke(app, ["sweep", "--dataset", "sw", *extra])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error:") and message in lines[0], result.output
    assert _counts() == before


def test_report_needs_a_run_or_a_sweep_and_refuses_other_jobs(sqlite_env, tmp_path):
    made = _ok(["generate", "--name", "rp", "--count", "40", "--shard-size", "20"])["job"]
    before = _counts()
    out = str(tmp_path / "r")
    for args, code, message in [
            ([], 2, "report on a RUN or on --sweep ID"),
            (["1", "--sweep", "1"], 2, "report on a RUN or on --sweep ID"),
            (["--sweep", str(made)], 7, f"job {made} is a generate job, not a sweep"),
            (["--sweep", "987654"], 4, "no job 987654")]:
        result = runner.invoke(app, ["report", *args, "--out", out])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == code and len(lines) == 1, result.output
        assert lines[0].startswith("error:") and message in lines[0], result.output
    assert _counts() == before


def _counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return (s.execute(select(func.count()).select_from(Job)).scalar_one(),
                s.execute(select(func.count()).select_from(Run)).scalar_one(),
                s.execute(select(func.count()).select_from(Trial)).scalar_one())


# --- pruning over real rows -------------------------------------------------------------

def test_the_median_pruner_stops_a_trial_below_the_median_of_ended_ones(sqlite_env):
    """Three trials written as a step writes them; two end with val seq_acc 0.8 and 0.9
    at epoch 2; a third reaching 0.1 at epoch 2 is pruned, one reaching 0.95 is not."""
    from shared.state import finish_run, prune_run
    from workers.jobs.sweeps import should_prune, step

    _make_ready_dataset()
    job_id = _plan(trials=4, parallel=4, pruner="median", metric="val_seq_acc")
    train_jobs = step(job_id)
    assert len(train_jobs) == 4
    runs = _runs(train_jobs)
    with session_scope() as s:
        for run_id, values in zip(runs, ([0.5, 0.8], [0.6, 0.9], [0.4, 0.1], [0.6, 0.95]),
                                  strict=True):
            for epoch, v in enumerate(values, start=1):
                s.add(Metric(run_id=run_id, epoch=epoch, split="val", name="seq_acc",
                             value=v))
        finish_run(s, runs[0], None)
        finish_run(s, runs[1], None)
    assert should_prune(runs[2], 2) is True
    assert should_prune(runs[3], 2) is False
    assert should_prune(runs[2], 1) is False  # the warm-up epoch
    with session_scope() as s:
        prune_run(s, runs[2])
    with session_scope() as s:
        assert s.get(Run, runs[2]).status == "pruned"
        assert s.get(Job, train_jobs[2]).status == "pruned"


def test_steps_fill_free_slots_draw_the_same_params_again_and_never_exceed_trials(
        sqlite_env):
    from workers.jobs.sweeps import step

    _make_ready_dataset()
    job_id = _plan(trials=3, parallel=2)
    first = step(job_id)
    assert len(first) == 2 and step(job_id) == []  # both slots taken
    with session_scope() as s:
        params = [t.params for t in s.execute(select(Trial).order_by(Trial.number)).scalars()]
        specs = [s.get(Job, j).spec for j in first]
    assert all(1e-3 <= p["lr"] <= 1e-2 and p["batch_size"] in (16, 32) for p in params)
    assert [sp["trial"] for sp in specs] == [0, 1] and specs[0]["sweep"] == job_id
    assert all(sp["register"] == f"sweepme-sweep{job_id}" for sp in specs)
    # The same sweep planned again draws the same first trials (seeded per number).
    again = _plan(trials=3, parallel=2)
    step(again)
    with session_scope() as s:
        redrawn = [t.params for t in s.execute(select(Trial).where(
            Trial.sweep_job_id == again).order_by(Trial.number)).scalars()]
    assert redrawn == params


def _make_ready_dataset() -> None:
    from scheduler.plan import plan_generate
    from shared.schema import Dataset, Shard
    from shared.spec import GenerateSpec

    job_id, _ = plan_generate(GenerateSpec(name="sweepme", count=40, length=4,
                                           charset="digits", shard_size=20))
    with session_scope() as s:  # as if rendered: these tests train nothing
        for sh in s.execute(select(Shard).where(Shard.job_id == job_id)).scalars():
            sh.status = "done"
        ds = s.execute(select(Dataset).where(Dataset.name == "sweepme")).scalar_one()
        ds.status, ds.layout_job_id = "ready", job_id
        s.get(Job, job_id).status = "done"


def _plan(trials: int, parallel: int, pruner: str = "median",
          metric: str = "val_seq_acc") -> int:
    from scheduler.plan import plan_sweep

    return plan_sweep(dataset="sweepme", trials=trials, parallel=parallel, metric=metric,
                      space=["lr=loguniform(1e-3,1e-2)", "batch_size=choice(16,32)"],
                      pruner=pruner, sampler="tpe", seed=5, register=None,
                      base={"epochs": 2})


def _runs(train_jobs: list[int]) -> list[int]:
    with session_scope() as s:
        return [s.execute(select(Run.id).where(Run.job_id == j)).scalar_one()
                for j in train_jobs]


# --- a whole sweep on real workers ------------------------------------------------------

FAST = {"CAPTRAIN_KEEPER_INTERVAL": "1", "CAPTRAIN_WORKER_DEAD_SECONDS": "5",
        "OMP_NUM_THREADS": "1"}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_sweep_runs_its_trials_two_at_a_time_and_survives_a_killed_trial_worker(
        backend, start_worker, tmp_path):
    env = {**backend, **FAST}
    cpu = start_worker(env, queues="cpu", concurrency=1)
    gpu = [start_worker(env, queues="gpu", concurrency=1) for _ in range(2)]
    _ok(["generate", "--name", "sw", "--count", "300", "--shard-size", "100",
         "--wait"])
    sweep = _ok(["sweep", "--dataset", "sw", "--trials", "6", "--parallel", "2",
                 "--epochs", "3", "--pruner", "median", "--seed", "3",
                 "--metric", "val_loss",
                 *[a for dim in SPACE for a in ("--space", dim)]])["sweep"]
    # Kill the worker of a trial that is training, its whole process group.
    victim_run = wait_for(lambda: _training_on(gpu[0]), 180, interval=0.1,
                          what="a trial training on the first gpu worker")
    os.killpg(gpu[0].proc.pid, signal.SIGKILL)
    gpu[0].proc.wait()
    workers = [cpu, *gpu, start_worker(env, queues="gpu", concurrency=1)]
    shown = wait_for(lambda: (d := _ok(["sweep", "show", str(sweep)]))["status"] == "done"
                     and d, 420, interval=1, what="the sweep done")
    trials = shown["trials"]
    print(f"\nsweep {sweep}: " + "; ".join(
        f"#{t['number']} {t['state']} {t['value']} {t['params']}" for t in trials)
        + f"; best {shown['best']}; killed run {victim_run}")
    assert [t["number"] for t in trials] == list(range(6))
    assert all(t["state"] in ("complete", "pruned", "failed") for t in trials), trials
    assert any(t["state"] == "complete" for t in trials)
    # Each trial that trained has its own time, from its run's start to its end.
    assert all(t["seconds"] > 0 for t in trials if t["state"] != "failed"), trials
    assert shown["best"] is not None and shown["best"]["run"] in [t["run"] for t in trials]
    victim = next(t for t in trials if t["run"] == victim_run)
    assert victim["state"] in ("complete", "pruned"), victim["error"]  # resumed, not lost
    # Never more than two trials planned and unfinished at once; each epoch's metric once.
    with session_scope() as s:
        spans = s.execute(select(Run.created_at, Run.finished_at).join(
            Trial, Trial.run_id == Run.id).where(Trial.sweep_job_id == sweep)).all()
        dup = s.execute(select(Metric.run_id, Metric.epoch, func.count())
                        .where(Metric.split == "val", Metric.name == "seq_acc")
                        .group_by(Metric.run_id, Metric.epoch)
                        .having(func.count() > 1)).all()
        kept = s.execute(select(Run.checkpoint_sha256).join(Trial, Trial.run_id == Run.id)
                         .where(Trial.sweep_job_id == sweep, Run.status == "pruned")).all()
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2, spans
    assert dup == [] and all(sha is None for (sha,) in kept)  # pruned: no checkpoint
    # Parallel trials and steps met no lock: no worker logged one.
    logs = "".join(w.log.read_text(errors="replace") for w in workers)
    assert "database is locked" not in logs and "deadlock detected" not in logs
    best = _ok(["model", f"sw-sweep{sweep}@best"])
    assert best["run"] == shown["best"]["run"]
    # `captrain report --sweep` draws Optuna's history and importances on a cpu worker.
    report = _ok(["report", "--sweep", str(sweep), "--out", str(tmp_path / "report")])
    assert {"history.png", "trials.csv", "index.html", "summary.json"} <= set(
        report["files"]), report
    complete = sum(t["state"] == "complete" for t in trials)
    assert ("importances.png" in report["files"]) == (complete >= 2), report["notes"]
    assert (tmp_path / "report" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (tmp_path / "report" / "trials.csv").read_text().splitlines()
    assert len(csv_rows) == 7 and csv_rows[0].startswith("number,state,value")


def test_reconcile_and_retry_re_drive_a_sweep_whose_step_was_lost(sqlite_env):
    """No worker runs: the sweep's first step waits in the queue. The broker loses it
    (FLUSHDB): a reconcile sends it again. A failed sweep: retry sends a step."""
    import redis

    from shared.dispatch import send_job
    from shared.reconcile import Reconciler
    from shared.state import fail_job

    _make_ready_dataset()
    job_id = _plan(trials=2, parallel=1)
    send_job(job_id)
    queue = redis.Redis.from_url(sqlite_env["CAPTRAIN_BROKER_URL"])
    assert _steps(queue, job_id) == 1
    queue.flushdb()
    reconciler = Reconciler(confirm_s=0)
    assert reconciler.run_pass()["steps"] == 1 and _steps(queue, job_id) == 1
    assert reconciler.run_pass()["queued"] == 1 and _steps(queue, job_id) == 1
    fail_job(job_id, "a test failed it")
    queue.flushdb()
    again = _ok(["retry", str(job_id)])
    assert again["status"] == "pending" and _steps(queue, job_id) == 1


def _steps(queue, job_id: int) -> int:
    return sum(json.loads(m)["headers"]["argsrepr"] == f"sweep {job_id} step"
               for m in queue.lrange("cpu", 0, -1))


def test_a_trials_message_names_its_sweep_and_number_for_flower(sqlite_env):
    from shared.dispatch import _signature, outstanding

    _make_ready_dataset()
    job_id = _plan(trials=2, parallel=1)
    from workers.jobs.sweeps import step

    [train_job] = step(job_id)
    work = outstanding(train_job)
    [(name, args)] = work.messages()
    sig = _signature(name, args, work.time_limit, work.label)
    assert sig.options["argsrepr"] == f"sweep {job_id} trial 0 run {args[0]} (job {train_job})"
    assert outstanding(job_id).messages() == []  # its one slot is taken: no step due
    fresh = _plan(trials=2, parallel=1)
    step_sig = _signature(*outstanding(fresh).messages()[0], 0)
    assert step_sig.options["argsrepr"] == f"sweep {fresh} step"


def _training_on(worker) -> int | None:
    name = worker.name.split("@")[0]
    with session_scope() as s:
        return s.execute(select(Run.id).where(Run.status == "running",
                                              Run.worker.like(f"{name}@%"),
                                              Run.epochs_done >= 1)).scalars().first()
