"""The CLI through its runner: bad input gets one line, a non-zero exit, no rows."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import Dataset, Job, Run, Shard

runner = CliRunner()


def _row_counts() -> tuple[int, int, int, int]:
    with session_scope() as s:
        return tuple(s.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (Job, Dataset, Shard, Run))


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--name", "bad", "--count", "0"],
        ["generate", "--name", "bad", "--count", "100", "--length", "0"],
        ["generate", "--name", "bad", "--count", "100", "--charset", ""],
        ["generate", "--name", "bad", "--count", "100", "--shard-size", "-1"],
        ["generate", "--name", "bad/../x", "--count", "100", "--shard-size", "10"],
        ["generate", "--name", "bad", "--count", "100", "--shard-size", "10", "--split", "1,1"],
        ["generate", "--name", "bad", "--count", "100", "--image-format", "gif"],
        ["train", "--dataset", "no-such-name"],
        ["train", "--dataset", "x", "--epochs", "0"],
        ["train", "--dataset", "x", "--time-limit", "999999"],
        ["job", "99999999999999999999"],
        ["job", "²"],
        ["job", "987654"],
        ["run", "987654"],
        ["job", "abc"],
        ["run", "1.5"],
        ["job", "1' OR '1'='1"],
        ["shard", "--dataset", "no-such-name"],
    ],
)
def test_bad_input_prints_one_error_line_exits_non_zero_and_writes_nothing(backend, args):
    before = _row_counts()
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert _row_counts() == before


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
    job_id = json.loads(result.output)["job"]
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
