"""Flower, for real: a Flower process and a worker, checked through Flower's REST API."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, free_port, wait_for
from typer.testing import CliRunner

from scheduler.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()
AUTH = "admin:flower-pw"


def _get(url: str, auth: str | None = AUTH) -> tuple[int, object]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def test_flower_shows_the_worker_and_the_jobs_tasks(backend, start_worker, tmp_path):
    worker = start_worker(backend, queues="cpu,gpu", concurrency=1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    env.update(backend, CAPTRAIN_FLOWER_BASIC_AUTH=AUTH)
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "flower", "--port",
                                 str(port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/api/workers", None)[0] == 401, 60,
                 what="Flower answering (and refusing an anonymous caller)")
        result = runner.invoke(app, ["generate", "--name", "flower", "--count", "60",
                                     "--shard-size", "20", "--wait", "--json"])
        assert result.exit_code == 0, result.output

        def worker_listed():
            code, body = _get(f"{base}/api/workers?refresh=1")
            return code == 200 and any(w.startswith(worker.name.split("@")[0])
                                       for w in (body or {}))

        wait_for(worker_listed, 30, what="worker in /api/workers")

        def shard_tasks():
            code, body = _get(f"{base}/api/tasks")
            return [t for t in (body or {}).values()
                    if t.get("name") == "captrain.generate_shard"] if code == 200 else []

        tasks = wait_for(lambda: len(shard_tasks()) >= 5 and shard_tasks(), 30,
                         what="the job's tasks in /api/tasks")
        assert {t["state"] for t in tasks} == {"SUCCESS"}
        assert all(t["args"].startswith("job ") and " shard " in t["args"] for t in tasks)
        print(f"\nFlower: worker listed, {len(tasks)} generate_shard tasks in /api/tasks")
    finally:
        proc.terminate()
        proc.wait(20)


def test_flower_refuses_to_bind_beyond_loopback_without_auth(backend, monkeypatch):
    monkeypatch.delenv("CAPTRAIN_FLOWER_BASIC_AUTH", raising=False)
    result = runner.invoke(app, ["flower", "--address", "0.0.0.0"])
    assert result.exit_code == 3
    assert result.output.strip().startswith("error: Flower would be open to the network")
