"""The scheduler side runs on a laptop without torch (or captcha, or safetensors)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# Setting a module to None in sys.modules makes any import of it raise ImportError,
# exactly as if the package were not installed.
BLOCK = (
    "import sys\n"
    "for m in ('torch', 'torchvision', 'captcha', 'safetensors', 'numpy'):\n"
    "    sys.modules[m] = None\n"
)


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_blocker_really_blocks_torch():
    r = _run("import torch")
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_scheduler_cli_imports_without_torch():
    r = _run("import scheduler.cli, scheduler.plan, shared.dispatch, scheduler.status\n"
             "import shared.celery_app, shared.artifacts, shared.images\nprint('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_a_generate_job_is_submitted_without_torch(sqlite_env):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    env.update(sqlite_env)
    r = _run(
        "from typer.testing import CliRunner\n"
        "from scheduler.cli import app\n"
        "res = CliRunner().invoke(app, ['generate', '--name', 'nt', '--count', '20',"
        " '--shard-size', '10', '--json'])\n"
        "print(res.output); sys.exit(res.exit_code)",
        env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"status": "pending"' in r.stdout
