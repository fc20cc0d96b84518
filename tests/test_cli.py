"""The CLI through its runner: bad input gets one line, a non-zero exit, no rows."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import DONE, FAILED, READY, RUNNING, Dataset, Job, Run, Shard

runner = CliRunner()


def _row_counts() -> tuple[int, int, int, int]:
    with session_scope() as s:
        return tuple(s.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (Job, Dataset, Shard, Run))


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--name", "bad", "--count", "0"], "count: Input should be greater"),
        (["generate", "--name", "bad", "--count", "100", "--length", "0"],
         "length: Input should be greater"),
        (["generate", "--name", "bad", "--count", "100", "--charset", ""], "charset is empty"),
        (["generate", "--name", "bad", "--count", "100", "--shard-size", "-1"],
         "shard_size: Input should be greater"),
        (["generate", "--name", "bad/../x", "--count", "100", "--shard-size", "10"],
         "name: String should match pattern"),
        (["generate", "--name", "bad", "--count", "100", "--shard-size", "10", "--split", "1,1"],
         "needs three fractions"),
        (["generate", "--name", "bad", "--count", "100", "--image-format", "gif"],
         "image_format: Input should be 'pgm' or 'png'"),
        (["train", "--dataset", "no-such-name"], "no dataset named 'no-such-name'"),
        # Spec bounds are checked before the dataset is looked up.
        (["train", "--dataset", "x", "--epochs", "0"],
         "epochs: Input should be greater than or equal to 1"),
        (["train", "--dataset", "x", "--time-limit", "99999999"],
         "time_limit: Input should be less than or equal to 2592000"),
        (["job", "99999999999999999999"], "is not a positive number"),
        (["job", "²"], "is not a positive number"),
        (["job", "987654"], "no job 987654"),
        (["run", "987654"], "no run 987654"),
        (["job", "abc"], "is not a positive number"),
        (["run", "1.5"], "is not a positive number"),
        (["job", "1' OR '1'='1"], "is not a positive number"),
        (["shard", "--dataset", "no-such-name"], "no dataset named 'no-such-name'"),
    ],
)
def test_bad_input_prints_one_error_line_exits_non_zero_and_writes_nothing(
        backend, args, message):
    before = _row_counts()
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0], result.output
    assert "Traceback" not in result.output
    assert _row_counts() == before


def test_a_time_limit_must_stay_below_the_visibility_timeout(backend, monkeypatch):
    # Iris is built in, so the dataset is ready and the rule under test is reached.
    monkeypatch.setenv("CAPTRAIN_VISIBILITY_TIMEOUT", "3600")
    from shared.settings import get_settings

    get_settings.cache_clear()
    before = _row_counts()
    args = ["train", "--dataset", "iris", "--model", "logreg", "--time-limit"]
    refused = runner.invoke(app, [*args, "3600"])
    lines = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert lines[0] == ("error: time limit 3600 s must stay below "
                        "CAPTRAIN_VISIBILITY_TIMEOUT (3600 s)"), refused.output
    assert _row_counts() == before
    accepted = runner.invoke(app, [*args, "3000"])
    assert accepted.exit_code == 0, accepted.output


@pytest.mark.parametrize(
    "generate,train,message",
    [
        # 160x30 at the default scale 0.5: 15 px high, below four 2x2 pools.
        (["--height", "30"], [], "needs an input of at least 16x16 px"),
        (["--height", "30"], ["--model", "crnn"], "needs an input of at least 4x16 px"),
        # 60 px wide at scale 0.5: 7 CTC steps for 6 characters, which may need 11.
        (["--length", "6", "--width", "60"], ["--model", "crnn"], "in 7 time steps"),
        (["--min-length", "3", "--length", "5"], [], "reads a fixed length"),
    ],
)
def test_a_model_that_cannot_read_the_dataset_is_refused_before_any_row(
        backend, generate, train, message):
    name = f"odd-{uuid.uuid4().hex[:8]}"  # PostgreSQL keeps one database per session
    made = runner.invoke(app, ["generate", "--name", name, "--count", "100",
                               "--shard-size", "100", *generate])
    assert made.exit_code == 0, made.output
    before = _row_counts()
    result = runner.invoke(app, ["train", "--dataset", name, *train])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error:") and message in lines[0], result.output
    assert _row_counts() == before


def test_a_large_enough_scale_passes_the_size_check(backend):
    name = f"low-{uuid.uuid4().hex[:8]}"
    assert runner.invoke(app, ["generate", "--name", name, "--count", "100",
                               "--shard-size", "100", "--height", "30"]).exit_code == 0
    result = runner.invoke(app, ["train", "--dataset", name, "--scale", "0.6"])
    assert "not ready" in result.output  # past the size check: 96x18 px fits


def test_predict_without_any_model_says_so(backend, tmp_path):
    f = tmp_path / "a.png"
    f.write_text("not an image")
    result = runner.invoke(app, ["predict", "--model", "nothing-here", str(f)])
    assert result.exit_code == 4
    assert "no trained model" in result.output


def test_generate_records_job_dataset_and_shards_in_one_go(backend):
    result = runner.invoke(app, ["generate", "--name", "rec", "--count", "100",
                                 "--shard-size", "30", "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["job"]
    with session_scope() as s:
        shards = s.execute(select(Shard).where(Shard.job_id == job_id)
                           .order_by(Shard.index)).scalars().all()
        assert [(sh.split, sh.start, sh.count) for sh in shards] == [
            ("train", 0, 30), ("train", 30, 30), ("train", 60, 20),
            ("val", 0, 10), ("test", 0, 10)]
        assert len({sh.seed for sh in shards}) == 5
        ds = s.execute(select(Dataset).where(Dataset.name == "rec")).scalar_one()
        assert ds.status == "pending" and ds.layout_job_id == job_id
    again = runner.invoke(app, ["generate", "--name", "rec", "--count", "100",
                                "--shard-size", "30"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_info_redacts_the_broker_password(backend, monkeypatch):
    monkeypatch.setenv("CAPTRAIN_BROKER_URL", "redis://:topsecret@127.0.0.1:6379/3")
    from shared.settings import get_settings

    get_settings.cache_clear()
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    assert "topsecret" not in result.output and ":***@" in result.output


def test_a_malformed_setting_is_one_error_line(backend, monkeypatch):
    monkeypatch.setenv("CAPTRAIN_VISIBILITY_TIMEOUT", "forever")
    from shared.settings import get_settings

    get_settings.cache_clear()
    result = runner.invoke(app, ["jobs"])
    assert result.exit_code == 3
    assert result.output.strip().startswith("error: invalid CAPTRAIN_VISIBILITY_TIMEOUT")


def test_status_tables_stay_readable_at_80_columns(backend):
    # Key cells stay whole at 80 columns, not "runni…" or "digits-…"; long text folds.
    name = f"digits-{uuid.uuid4().hex[:10]}"  # 17 characters
    for n in (name, f"{name}-b", f"{name}-c"):
        made = runner.invoke(app, ["generate", "--name", n, "--count", "100",
                                   "--shard-size", "50"])
        assert made.exit_code == 0, made.output
    with session_scope() as s:
        ds = s.execute(select(Dataset).where(Dataset.name == name)).scalar_one()
        ds.status = READY
        s.get(Job, ds.layout_job_id).status = DONE
        failed = s.execute(select(Dataset).where(Dataset.name == f"{name}-c")).scalar_one()
        s.get(Job, failed.layout_job_id).status = FAILED
        s.get(Job, failed.layout_job_id).error = (
            "shard 1: the worker was lost twice while rendering it; see its log for why")
    trained = runner.invoke(app, ["train", "--dataset", name, "--epochs", "12"])
    assert trained.exit_code == 0, trained.output
    with session_scope() as s:
        run = s.execute(select(Run).order_by(Run.id.desc())).scalars().first()
        run.status, run.epochs_done, run.device = RUNNING, 3, "cpu"
        s.get(Job, run.job_id).status = RUNNING
        run_id, job_id = run.id, run.job_id

    shown = {}
    for args in (["jobs"], ["runs"], ["datasets"], ["run", str(run_id)],
                 ["job", str(job_id)]):
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, result.output
        assert max(len(ln) for ln in result.output.splitlines()) <= 80, result.output
        assert name in result.output, result.output
        shown[args[0]] = result.output
    for word in ("running", "pending", "done", "failed"):
        assert word in shown["jobs"], shown["jobs"]
    assert "running" in shown["runs"] and "3/12" in shown["runs"], shown["runs"]
    assert "ready" in shown["datasets"] and "pending" in shown["datasets"]
    for view in ("run", "job"):
        assert "running" in shown[view] and "epochs_done" in shown[view], shown[view]


@pytest.mark.parametrize("running_before", [False, True])
def test_the_demo_stops_the_embedded_redis_only_if_it_started_it(
        tmp_path, monkeypatch, running_before):
    from rich.console import Console

    from scheduler import demo
    from shared import embedded
    from shared.settings import get_settings

    for key in ("CAPTRAIN_BROKER_URL", "CAPTRAIN_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CAPTRAIN_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    settings = get_settings()
    try:
        if running_before:
            embedded.start(settings)
        with demo._local_services(Console(quiet=True)):
            assert embedded.is_running(settings)
        assert embedded.is_running(settings) == running_before
    finally:
        embedded.stop(settings)
        get_settings.cache_clear()
