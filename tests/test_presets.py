"""Accuracy presets through the CLI: what they fill in, and what the user's options keep."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler import presets
from scheduler.cli import app
from shared.db import session_scope
from shared.schema import READY, Dataset, Job
from shared.spec import GenerateSpec, TrainSpec, validate

runner = CliRunner()


def _ready_dataset(name: str) -> None:
    """A dataset row marked ready: planning a train job needs no shards."""
    from scheduler.plan import plan_generate

    plan_generate(validate(GenerateSpec, name=name, count=100, length=4, charset="digits",
                           shard_size=50))
    with session_scope() as s:
        s.execute(select(Dataset).where(Dataset.name == name)).scalar_one().status = READY


def _train_spec(args: list[str]) -> dict:
    result = runner.invoke(app, ["train", *args, "--json"])
    assert result.exit_code == 0, result.output
    with session_scope() as s:
        job = s.execute(select(Job).where(Job.kind == "train").order_by(Job.id.desc())
                        ).scalars().first()
        assert job is not None
        return dict(job.spec)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_makes_valid_generate_and_train_specs(name):
    p = presets.get(name)
    g = validate(GenerateSpec, name="x", **p.generate_values())
    t = validate(TrainSpec, dataset="x", **p.train_values())
    assert (g.width, g.height, g.length) == (160, 60, 4)
    assert t.preset == name and t.augment == p.augment and t.scale == p.scale


def test_a_preset_fills_in_the_training_config_and_is_recorded(sqlite_env):
    _ready_dataset("p4")
    spec = _train_spec(["--dataset", "p4", "--preset", "digits4"])
    p = presets.get("digits4")
    assert {k: spec[k] for k in p.train_values()} == p.train_values()
    assert spec["preset"] == "digits4"


def test_options_on_the_command_line_win_over_the_preset(sqlite_env):
    _ready_dataset("p4b")
    spec = _train_spec(["--dataset", "p4b", "--preset", "digits4", "--epochs", "2",
                        "--augment", "strong", "--loader-workers", "0"])
    p = presets.get("digits4")
    assert (spec["epochs"], spec["augment"], spec["loader_workers"]) == (2, "strong", 0)
    assert (spec["model"], spec["lr"], spec["scale"]) == (p.model, p.lr, p.scale)


def test_without_a_preset_the_defaults_stand(sqlite_env):
    _ready_dataset("p4c")
    spec = _train_spec(["--dataset", "p4c", "--compile"])
    assert (spec["augment"], spec["compile"], spec["preset"]) == ("none", True, None)
    assert spec["epochs"] == TrainSpec.model_fields["epochs"].default


@pytest.mark.parametrize("args", [["--preset", "digits9"], ["--augment", "heavy"],
                                  ["--loader-workers", "-1"]])
def test_a_bad_preset_or_option_is_one_error_line(sqlite_env, args):
    _ready_dataset("p4d")
    result = runner.invoke(app, ["train", "--dataset", "p4d", *args])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    with session_scope() as s:
        assert s.execute(select(Job).where(Job.kind == "train")).first() is None


def test_the_json_answer_names_the_run(sqlite_env):
    _ready_dataset("p4e")
    result = runner.invoke(app, ["train", "--dataset", "p4e", "--preset", "digits-upper4",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "pending"
