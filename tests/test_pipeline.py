"""End to end with real celery worker processes: generate -> shard -> train -> predict,
on Redis with PostgreSQL and with SQLite."""

from __future__ import annotations

import json
import os

import pytest
from captcha.image import ImageCaptcha
from conftest import ROOT, Worker
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import Shard

pytestmark = pytest.mark.integration
runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _shard_hashes(job_id: int) -> list[tuple[int, str]]:
    with session_scope() as s:
        return [tuple(r) for r in s.execute(
            select(Shard.index, Shard.sha256).where(Shard.job_id == job_id)
            .order_by(Shard.index)).all()]


def test_generate_train_and_predict_through_real_workers(backend, start_worker, tmp_path):
    worker = start_worker(backend, queues="cpu,gpu", concurrency=2)
    live = json.loads(_ok(["workers", "--json", "--timeout", "3"]))
    mine = [w for w in live if w["worker"].startswith(worker.name.split("@")[0])]
    assert mine and set(mine[0]["queues"].split(",")) == {"cpu", "gpu"}
    out = _ok(["generate", "--name", "tiny", "--count", "240", "--shard-size", "40",
               "--seed", "3", "--wait", "--json"])
    job = json.loads(out)
    assert job["status"] == "done" and job["shards_done"] == job["shards"] == 7
    _ok(["datasets", "--json"])

    out = _ok(["train", "--dataset", "tiny", "--epochs", "2", "--batch-size", "32",
               "--wait", "--json"])
    run_id = json.loads(out)["run"]["id"]
    run = json.loads(_ok(["run", str(run_id), "--json"]))
    assert run["status"] == "done" and run["epochs_done"] == 2
    assert [e["epoch"] for e in run["per_epoch"]] == [1, 2]
    for key in ("train_loss", "val_loss", "val_char_acc", "val_seq_acc"):
        assert key in run["per_epoch"][0]
    assert 0 <= run["test"]["seq_acc"] <= 1 and len(run["test"]["per_position"]) == 4

    # Images drawn by the plain captcha package, not by captrain's shards.
    imgs = []
    for i, text in enumerate(("0123", "9876")):
        path = tmp_path / f"plain-{i}.png"
        ImageCaptcha(160, 60).write(text, str(path))
        imgs.append(str(path))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image")
    result = runner.invoke(app, ["predict", "--model", str(run_id), "--json", *imgs,
                                 str(text_file)])
    assert result.exit_code != 0  # one file was bad...
    rows = json.loads(result.stdout)
    read = [r for r in rows if "text" in r]
    assert [r["file"] for r in read] == imgs  # ...and the others still printed
    assert all(len(r["text"]) == 4 and r["text"].isdigit() for r in read)
    assert "not a readable image" in rows[2]["error"]
    for ref in ("tiny", "latest"):
        assert runner.invoke(app, ["predict", "--model", ref, imgs[0]]).exit_code == 0


def test_import_shard_and_train_on_a_folder_of_labelled_images(backend, start_worker,
                                                                 tmp_path):
    folder = tmp_path / "captchas"
    folder.mkdir()
    gen = ImageCaptcha(160, 60)
    for i in range(60):
        gen.write(f"{i * 37 % 10000:04d}", str(folder / f"{i * 37 % 10000:04d}.png"))
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    out = json.loads(_ok(["import", str(folder), "--name", "folder", "--shard-size", "25",
                          "--json"]))
    assert out["count"] == 60
    no = runner.invoke(app, ["train", "--dataset", "folder"])
    assert no.exit_code != 0 and "captrain shard" in no.output

    start_worker(backend, queues="cpu,gpu", concurrency=2)
    job = json.loads(_ok(["shard", "--dataset", "folder", "--split", "0.6,0.2,0.2",
                          "--shard-size", "10", "--seed", "9", "--wait", "--json"]))
    assert job["status"] == "done" and job["shards"] == 8  # 36+12+12 in shards of 10
    detail = json.loads(_ok(["job", str(job["id"]), "--json"]))
    assert sum(s["count"] for s in detail["shard_list"]) == 60
    assert {s["split"] for s in detail["shard_list"]} == {"train", "val", "test"}
    run = json.loads(_ok(["train", "--dataset", "folder", "--epochs", "1", "--wait",
                          "--json"]))
    assert run["status"] == "done"


def test_a_corrupt_image_in_an_import_folder_imports_nothing(backend, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    ImageCaptcha(160, 60).write("1234", str(folder / "1234.png"))
    (folder / "5678.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = runner.invoke(app, ["import", str(folder), "--name", "bad"])
    assert result.exit_code != 0 and "5678.png" in result.output
    names = [d["name"] for d in json.loads(_ok(["datasets", "--json"]))]
    assert "bad" not in names


def test_one_and_two_workers_make_identical_shards(tmp_path, redis_url, monkeypatch):
    from conftest import _use

    hashes = []
    for n_workers in (1, 2):
        env = {
            "CAPTRAIN_HOME": str(tmp_path / f"home{n_workers}"),
            "CAPTRAIN_BROKER_URL": redis_url,
            "CAPTRAIN_DATABASE_URL": f"sqlite:///{tmp_path / f'db{n_workers}.sqlite'}",
        }
        _use(env, monkeypatch)
        workers = [Worker(env, tmp_path / f"w{n_workers}-{i}.log", "cpu", 1)
                   for i in range(n_workers)]
        try:
            out = json.loads(_ok(["generate", "--name", "same", "--count", "120",
                                  "--shard-size", "12", "--seed", "77", "--wait",
                                  "--json"]))
        finally:
            for w in workers:
                w.stop()
        hashes.append(_shard_hashes(out["id"]))
        if n_workers == 2:
            job = json.loads(_ok(["job", str(out["id"]), "--json"]))
            makers = {s["worker"] for s in job["shard_list"]}
            print(f"2 workers made shards: {sorted(makers)}")
    print(f"1 worker: {len(hashes[0])} shards; 2 workers: {len(hashes[1])} shards; "
          f"equal={hashes[0] == hashes[1]}")
    assert len(hashes[0]) == 10 and all(sha for _, sha in hashes[0])
    assert hashes[0] == hashes[1]


def test_the_embedded_default_runs_the_quick_demo_with_no_settings(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    env["HOME"] = str(tmp_path)  # the default data dir lives under it
    env["XDG_DATA_HOME"] = str(tmp_path / "share")
    try:
        r = subprocess.run([sys.executable, "-m", "scheduler.cli", "demo", "--quick"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "whole-sequence test accuracy" in r.stdout
        assert (tmp_path / "share" / "captrain" / "captrain.db").exists()
    finally:
        subprocess.run([sys.executable, "-m", "scheduler.cli", "down"], cwd=ROOT, env=env,
                       capture_output=True, timeout=60)
