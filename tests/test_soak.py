"""The chaos soak, short: a minute and a half of jobs on three real workers under
seeded faults, then everything done, nothing lost, doubled or stuck.

Runs ``bench/soak.py`` as a subprocess, as a user runs it: it starts its own
redis-server on a free port and its own PostgreSQL database, and kills, flushes and
restarts only those and the workers it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, system_redis_server

pytestmark = pytest.mark.integration

SEED = 7  # the fault draws; what they hit also depends on timing (11-13 faults here)


def test_a_short_chaos_soak_loses_doubles_and_strands_nothing(pg_url):
    system_redis_server()  # skips (fails under CI) without one
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    env["CT_TEST_POSTGRES"] = pg_url  # the soak makes a database of its own beside it
    proc = subprocess.run(
        [sys.executable, "bench/soak.py", "--minutes", "1.5", "--seed", str(SEED),
         "--settle", "240", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["lost"], result["duplicates"], result["stuck"], result["corrupt"]) == \
        (0, 0, 0, 0), result
    assert result["failed"] == 0, result["failed_errors"]
    assert result["jobs_by_status"] == {"done": result["jobs"]} and result["jobs"] >= 3
    assert result["faults"] >= 6 and len(result["faults_by_kind"]) >= 2, result
    assert result["recovery_max_s"] is not None
    assert proc.returncode == 0
