"""Sweeps as SQL: a sweep is a job (kind ``sweep``) whose trials are train jobs, one
``trials`` row each with the parameters its sampler drew.

Everything about a sweep is read from these rows and the runs' metrics, never from a
process that drives it: a trial's state is its run's status, its value the run's
last validation metric, its intermediate values the run's per-epoch validation
metrics. ``workers.jobs.sweeps`` asks Optuna for the next trials from the same rows,
so a sweep goes on from SQL after any crash, like every other job.

Optuna- and torch-free: the scheduler shows sweeps with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.errors import StateError
from shared.schema import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    PRUNED,
    RUNNING,
    Job,
    Metric,
    Model,
    Run,
    Trial,
)
from shared.settings import get_settings
from shared.spec import SweepSpec, TrainSpec
from shared.state import ENDED, get_job, new_train_job

# A trial's state, from its run's status (the names Optuna and `sweep show` use).
TRIAL_STATE = {PENDING: "running", RUNNING: "running", DONE: "complete", PRUNED: "pruned",
               FAILED: "failed", CANCELLED: "failed"}
FINAL = ("complete", "pruned", "failed")
BEST_ALIAS = "best"  # the registry alias of a finished sweep's best trial


@dataclass
class TrialView:
    """One trial as SQL holds it."""

    number: int
    state: str  # running | complete | pruned | failed
    params: dict[str, Any]
    distributions: dict[str, Any]
    system_attrs: dict[str, Any]
    run: int
    job: int
    error: str | None = None
    # Per-epoch values of the sweep's metric; a complete trial's value is its last.
    intermediate: dict[int, float] = field(default_factory=dict)
    seconds: float | None = None  # the run's own time, from its start to its end

    @property
    def value(self) -> float | None:
        """The complete trial's metric at its last epoch; a pruned one's last reported
        value (as Optuna records a pruned trial); None otherwise."""
        if self.state in ("complete", "pruned") and self.intermediate:
            return self.intermediate[max(self.intermediate)]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "value": self.value,
                "params": self.params, "run": self.run, "job": self.job,
                "epochs": len(self.intermediate), "seconds": self.seconds,
                "error": self.error}


def metric_key(metric: str) -> tuple[str, str]:
    """(split, name) of a sweep metric such as ``val_seq_acc``."""
    split, _, name = metric.partition("_")
    return split, name


def maximize(metric: str) -> bool:
    """Whether a larger ``metric`` is better (accuracies; not a loss)."""
    return not metric.endswith("loss")


def trials(session: Session, sweep_job_id: int) -> list[TrialView]:
    """The trials of sweep job ``sweep_job_id``, by number, with their states and the
    sweep metric's per-epoch values."""
    spec = SweepSpec(**get_job(session, sweep_job_id).spec)
    split, name = metric_key(spec.metric)
    rows = session.execute(
        select(Trial, Run.status, Run.error, Run.started_at, Run.finished_at)
        .join(Run, Run.id == Trial.run_id)
        .where(Trial.sweep_job_id == sweep_job_id).order_by(Trial.number)).all()
    out = [TrialView(t.number, TRIAL_STATE[status], dict(t.params), dict(t.distributions),
                     dict(t.system_attrs), t.run_id, t.job_id, error,
                     seconds=(end - start).total_seconds() if start and end else None)
           for t, status, error, start, end in rows]
    by_run = {t.run: t for t in out}
    if by_run:
        for run_id, epoch, value in session.execute(
                select(Metric.run_id, Metric.epoch, Metric.value)
                .where(Metric.run_id.in_(by_run), Metric.split == split,
                       Metric.name == name)):
            by_run[run_id].intermediate[epoch] = value
    return out


def best(spec: SweepSpec, views: list[TrialView]) -> TrialView | None:
    """The complete trial with the best value (the lowest number among equals)."""
    done = [t for t in views if t.state == "complete" and t.value is not None]
    if not done:
        return None
    sign = -1 if maximize(spec.metric) else 1
    return min(done, key=lambda t: (sign * (t.value or 0.0), t.number))


def needs_step(session: Session, job: Job) -> bool:
    """Whether sweep job ``job`` has work for a step: a free slot and trials left to
    ask for, or every trial ended and the sweep to finish."""
    if job.status in ENDED:
        return False
    spec = SweepSpec(**job.spec)
    planned, active = session.execute(
        select(func.count(), func.count().filter(Run.status.in_([PENDING, RUNNING])))
        .select_from(Trial).join(Run, Run.id == Trial.run_id)
        .where(Trial.sweep_job_id == job.id)).one()
    if planned >= spec.trials:
        return active == 0
    return active < spec.parallel


def lock(session: Session, sweep_job_id: int) -> Job:
    """The sweep's job row, locked for this transaction: a write first, so that two
    steps at once run one after the other on PostgreSQL (a row lock) and on SQLite
    (the write lock, taken before anything is read, so no step reads a stale
    snapshot and then fails to write). Raises NotFound."""
    session.execute(update(Job).where(Job.id == sweep_job_id).values(attempts=Job.attempts))
    return get_job(session, sweep_job_id)


def model_name(spec: SweepSpec, sweep_job_id: int) -> str:
    """The registry name the sweep's trials register their models as."""
    return spec.register or f"{spec.dataset}-sweep{sweep_job_id}"[:64]


def trial_spec(spec: SweepSpec, sweep_job_id: int, number: int,
               params: dict[str, Any]) -> TrainSpec:
    """The train spec of trial ``number``: the sweep's fixed values, the drawn params."""
    return TrainSpec(**{**spec.base, **params, "dataset": spec.dataset,
                        "register": model_name(spec, sweep_job_id),
                        "sweep": sweep_job_id, "trial": number})


def add_trial(session: Session, job: Job, number: int, params: dict[str, Any],
              distributions: dict[str, Any], system_attrs: dict[str, Any]) -> int:
    """Write trial ``number`` of sweep job ``job``: its train job, run and trial rows.
    Returns the train job's id. A second trial of the same number fails the
    transaction on the unique key."""
    spec = SweepSpec(**job.spec)
    train = trial_spec(spec, job.id, number, params)
    assert job.dataset_id is not None  # a sweep names its dataset when planned
    run_id, job_id = new_train_job(session, train.model_dump(), get_settings().redacted(),
                                   job.dataset_id, train.model)
    session.add(Trial(sweep_job_id=job.id, number=number, job_id=job_id, run_id=run_id,
                      params=params, distributions=distributions,
                      system_attrs=system_attrs))
    session.flush()
    return job_id


def sweep_of_run(session: Session, run_id: int) -> int | None:
    """The sweep job that run ``run_id`` is a trial of, if any."""
    return session.execute(select(Trial.sweep_job_id).where(Trial.run_id == run_id)
                           ).scalar_one_or_none()


def trial_jobs(session: Session, sweep_job_id: int) -> list[int]:
    """The train job ids of the sweep's trials."""
    return list(session.execute(select(Trial.job_id).where(
        Trial.sweep_job_id == sweep_job_id)).scalars())


def best_model(session: Session, run_id: int) -> Model:
    """The registered model of run ``run_id``. Raises StateError if it has none."""
    model = session.execute(select(Model).where(Model.run_id == run_id)).scalar_one_or_none()
    if model is None:
        raise StateError(f"run {run_id} finished without a stored model")
    return model


def summary(session: Session, sweep_job_id: int,
            views: list[TrialView] | None = None) -> dict[str, Any]:
    """What ``captrain sweep show`` prints: the sweep, its trials (``views``, if read
    already) and its best. Raises NotFound, or StateError for a job not a sweep."""
    job = get_job(session, sweep_job_id)
    if job.kind != "sweep":
        raise StateError(f"job {sweep_job_id} is a {job.kind} job, not a sweep")
    spec = SweepSpec(**job.spec)
    views = trials(session, sweep_job_id) if views is None else views
    top = best(spec, views)
    registered = None
    if top is not None:
        m = session.execute(select(Model.name, Model.version).where(
            Model.run_id == top.run)).first()
        registered = f"{m[0]}@{m[1]}" if m else None
    counts = {s: sum(t.state == s for t in views) for s in ("running", *FINAL)}
    return {
        "sweep": job.id, "status": job.status, "error": job.error, "dataset": spec.dataset,
        "metric": spec.metric, "direction": "maximize" if maximize(spec.metric) else
        "minimize", "sampler": spec.sampler, "pruner": spec.pruner, "trials_wanted":
        spec.trials, "parallel": spec.parallel, "space": spec.space, "counts": counts,
        "created": job.created_at.isoformat() if job.created_at else None,
        "finished": job.finished_at.isoformat() if job.finished_at else None,
        "trials": [t.to_dict() for t in views],
        "best": None if top is None else {"value": top.value, "params": top.params,
                                          "run": top.run, "number": top.number,
                                          "model": registered},
    }


def list_sweeps(session: Session) -> list[dict[str, Any]]:
    """Every sweep, newest first, with its trial counts and best value."""
    out = []
    for job in session.execute(select(Job).where(Job.kind == "sweep")
                               .order_by(Job.id.desc())).scalars():
        spec = SweepSpec(**job.spec)
        views = trials(session, job.id)
        top = best(spec, views)
        out.append({"sweep": job.id, "status": job.status, "dataset": spec.dataset,
                    "metric": spec.metric, "trials": f"{sum(t.state in FINAL for t in views)}"
                    f"/{spec.trials}", "best": None if top is None else top.value,
                    "best_run": None if top is None else top.run,
                    "created": job.created_at.isoformat() if job.created_at else None})
    return out


def set_system_attrs(session: Session, run_id: int, attrs: dict[str, Any]) -> None:
    """Store what the sampler or pruner recorded on trial run ``run_id``."""
    session.execute(update(Trial).where(Trial.run_id == run_id)
                    .values(system_attrs=dict(attrs)))
