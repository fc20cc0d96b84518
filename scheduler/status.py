"""Read-only views of SQL for the status commands, as JSON-able dicts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from shared import registry, sweeps
from shared.db import session_scope
from shared.schema import DONE, Dataset, Job, Metric, Model, Run, Shard
from shared.state import get_job, get_run


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else value


def _job_dict(job: Job, done: int, total: int) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "status": job.status,
        "name": job.spec.get("name") or job.spec.get("dataset"),
        "shards_done": done, "shards": total,
        "created": _iso(job.created_at), "finished": _iso(job.finished_at), "error": job.error,
    }


def list_jobs(limit: int = 50) -> list[dict[str, Any]]:
    with session_scope() as s:
        jobs = s.execute(select(Job).order_by(Job.id.desc()).limit(limit)).scalars().all()
        counts = dict(
            s.execute(
                select(Shard.job_id, func.count()).group_by(Shard.job_id)
            ).tuples().all()
        )
        done = dict(
            s.execute(
                select(Shard.job_id, func.count()).where(Shard.status == DONE)
                .group_by(Shard.job_id)
            ).tuples().all()
        )
        return [_job_dict(j, done.get(j.id, 0), counts.get(j.id, 0)) for j in jobs]


def job_detail(job_id: int) -> dict[str, Any]:
    """The job with its shards (and its run, for a train job). Raises NotFound."""
    with session_scope() as s:
        job = get_job(s, job_id)
        shards = [
            {"index": sh.index, "split": sh.split, "count": sh.count, "status": sh.status,
             "worker": sh.worker, "attempts": sh.attempts, "sha256": sh.sha256,
             "error": sh.error}
            for sh in job.shards
        ]
        out = _job_dict(job, sum(sh["status"] == DONE for sh in shards), len(shards))
        out.update(spec=job.spec, settings=job.settings, shard_list=shards)
        run_id = s.execute(select(Run.id).where(Run.job_id == job_id)).scalar_one_or_none()
    if run_id is not None:
        out["run"] = run_detail(run_id)
    return out


def list_runs(limit: int = 50) -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = s.execute(
            select(Run, Job, Dataset)
            .join(Job, Job.id == Run.job_id)
            .join(Dataset, Dataset.id == Run.dataset_id)
            .order_by(Run.id.desc()).limit(limit)
        ).all()
        tests = {
            (m.run_id, m.name): m.value
            for m in s.execute(select(Metric).where(Metric.split == "test")).scalars()
        }
        return [
            {"id": r.id, "job": j.id, "dataset": d.name, "model": r.model, "status": r.status,
             "epochs": f"{r.epochs_done}/{j.spec.get('epochs')}", "device": r.device,
             "test_seq_acc": tests.get((r.id, "seq_acc")),
             "test_char_acc": tests.get((r.id, "char_acc")), "created": _iso(r.created_at)}
            for r, j, d in rows
        ]


def run_detail(run_id: int) -> dict[str, Any]:
    """The run with its per-epoch metrics and its model. Raises NotFound."""
    with session_scope() as s:
        run = get_run(s, run_id)
        job = get_job(s, run.job_id)
        dataset = s.get(Dataset, run.dataset_id)
        assert dataset is not None  # a foreign key
        epochs: dict[int, dict[str, Any]] = {}
        for m in s.execute(
            select(Metric).where(Metric.run_id == run_id).order_by(Metric.epoch)
        ).scalars():
            epochs.setdefault(m.epoch, {"epoch": m.epoch})[f"{m.split}_{m.name}"] = m.value
        model = s.execute(select(Model).where(Model.run_id == run_id)).scalar_one_or_none()
        return {
            "id": run.id, "job": job.id, "dataset": dataset.name, "model": run.model,
            "status": run.status, "device": run.device, "worker": run.worker,
            "epochs_done": run.epochs_done, "epochs": job.spec.get("epochs"),
            "resumed_from": run.resumed_from, "error": run.error or job.error,
            "spec": job.spec, "settings": job.settings,
            "per_epoch": list(epochs.values()),
            "test": model.metrics if model else None,
            "weights_sha256": model.weights_sha256 if model else None,
            "registered": f"{model.name}@{model.version}" if model else None,
            "created": _iso(run.created_at), "finished": _iso(run.finished_at),
        }


def list_datasets() -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = s.execute(select(Dataset).order_by(Dataset.id.desc())).scalars().all()
        return [
            {"id": d.id, "name": d.name, "kind": d.kind, "status": d.status, "count": d.count,
             "length": d.length, "charset": d.charset, "size": f"{d.width}x{d.height}",
             "created": _iso(d.created_at)}
            for d in rows
        ]


def _model_dict(m: Model, aliases: list[str]) -> dict[str, Any]:
    t = m.metrics
    return {"name": m.name, "version": m.version, "ref": f"{m.name}@{m.version}",
            "aliases": aliases, "run": m.run_id, "seq_acc": t.get("seq_acc"),
            "char_acc": t.get("char_acc"), "cv_acc": t.get("cv_acc"),
            "archived": m.archived, "created": _iso(m.created_at)}


def list_models() -> list[dict[str, Any]]:
    """Every version of every model, by name, newest version first."""
    with session_scope() as s:
        held = registry.aliases(s)
        return [_model_dict(m, held.get(m.id, [])) for m in registry.versions(s)]


def model_detail(ref: str) -> dict[str, Any]:
    """The version ``ref`` names, with its test metrics, config and lineage. Raises
    SpecError for a malformed ref, NotFound."""
    with session_scope() as s:
        m = registry.resolve(s, ref)
        out = _model_dict(m, registry.aliases(s, [m.id]).get(m.id, []))
        dataset = s.get(Dataset, m.dataset_id)
        assert dataset is not None  # a foreign key
        out.update(dataset=dataset.name, test=m.metrics, weights_sha256=m.weights_sha256,
                   config=m.config, lineage=m.lineage)
        return out


def sweep_detail(job_id: int) -> dict[str, Any]:
    """A sweep's trials and best (``captrain sweep show``). Raises NotFound, or
    StateError for a job that is not a sweep."""
    with session_scope() as s:
        return sweeps.summary(s, job_id)


def list_sweeps() -> list[dict[str, Any]]:
    """Every sweep, newest first (``captrain sweeps``)."""
    with session_scope() as s:
        return sweeps.list_sweeps(s)
