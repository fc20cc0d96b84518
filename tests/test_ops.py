"""Operating jobs: cancel stops work at its next boundary, retry finishes what is left."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ON_POSTGRES, wait_for
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import Model, Run, Shard

pytestmark = pytest.mark.integration
runner = CliRunner()


def _ok(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _done(job_id: int) -> int:
    with session_scope() as s:
        return len(s.execute(select(Shard.id).where(Shard.job_id == job_id,
                                                    Shard.status == "done")).all())


@ON_POSTGRES
def test_cancel_stops_a_generation_and_retry_finishes_it(backend, start_worker):
    start_worker(backend, queues="cpu", concurrency=1)
    job_id = _ok("generate", "--name", "cancel-gen", "--count", "2000", "--shard-size",
                 "100", "--seed", "4")["job"]
    wait_for(lambda: _done(job_id) >= 2, 120, what="two shards")
    assert _ok("cancel", str(job_id))["cancelled"] is True
    time.sleep(1.5)  # the shard in flight may finish: that is its boundary
    settled = _done(job_id)
    time.sleep(3)
    after = _done(job_id)
    detail = _ok("job", str(job_id))
    print(f"\ncancel: {after} of {detail['shards']} shards done, none after the boundary")
    assert detail["status"] == "cancelled" and after == settled < detail["shards"]
    assert {d["name"]: d["status"] for d in _ok("datasets")}["cancel-gen"] == "cancelled"

    again = _ok("retry", str(job_id), "--wait")
    assert again["status"] == "done" and again["shards_done"] == again["shards"]
    assert _ok("cancel", str(job_id))["cancelled"] is False  # already ended


@ON_POSTGRES
def test_cancel_stops_training_at_its_next_checkpoint(backend, start_worker):
    worker = start_worker(backend, queues="cpu,gpu", concurrency=1)
    gen = _ok("generate", "--name", "cancel-train", "--count", "1000", "--shard-size",
              "250", "--wait")
    assert gen["status"] == "done"
    job_id = _ok("train", "--dataset", "cancel-train", "--epochs", "20")["job"]
    with session_scope() as s:
        run_id = s.execute(select(Run.id).where(Run.job_id == job_id)).scalar_one()

    def epochs() -> int:
        with session_scope() as s:
            return s.get(Run, run_id).epochs_done

    wait_for(lambda: epochs() >= 1, 120, what="one epoch")
    _ok("cancel", str(job_id))
    # The trainer notices at its next checkpoint, stops there and says so.
    wait_for(lambda: f"run {run_id} was cancelled" in worker.log.read_text(), 60,
             what="the trainer to stop")
    stopped_at = epochs()
    time.sleep(3)
    assert epochs() == stopped_at < 20
    run = _ok("run", str(run_id))
    with session_scope() as s:
        model = s.execute(select(Model).where(Model.run_id == run_id)).scalar_one_or_none()
    print(f"\ncancel: training stopped after epoch {stopped_at} of 20")
    assert run["status"] == "cancelled" and model is None

    bad = runner.invoke(app, ["retry", str(gen["id"])])
    assert bad.exit_code == 7 and "only failed or cancelled" in bad.output
