"""Analysis jobs: explore a dataset, report on a run; the SQL around the renderers.

``workers.explore`` and ``workers.report`` compute and draw; this module loads the
rows they need, and stores what they return as one ``analyses`` row (keyed by its
job) with its ``analysis_files`` rows pointing at content-addressed artifacts.

A message may be delivered twice (late acks), so each function reads the job first
and does nothing for a job that has ended, and the final write is an upsert on the
job's unique analysis: a second run leaves the same rows. Each delivery counts as an
attempt on the job row (``shared.state.start_job``): after ``max_attempts`` (a setting) that
never finished, the job is failed instead of being run again.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from shared import shardfmt
from shared.artifacts import put_bytes, read_verified
from shared.db import insert_for, session_scope
from shared.errors import StateError
from shared.lookup import finished_run
from shared.schema import DONE, Analysis, AnalysisFile, Metric, Shard, utcnow
from shared.state import finish_analysis, get_job, start_job

log = logging.getLogger(__name__)

MEDIA_TYPES = {".png": "image/png", ".html": "text/html", ".csv": "text/csv",
               ".json": "application/json"}
PREDICT_BATCH = 256  # items per forward pass: bounds memory on large test splits


def _media_type(name: str) -> str:
    return MEDIA_TYPES.get(name[name.rfind("."):], "application/octet-stream")


def store_analysis(job_id: int, kind: str, subject: str, summary: dict[str, Any],
                   files: dict[str, bytes]) -> int | None:
    """Store the files as artifacts and the analysis rows, and mark the job done, in
    one transaction. Returns the analysis id, or None if the job was cancelled or
    failed meanwhile (then nothing is stored)."""
    with session_scope() as s:
        if not finish_analysis(s, job_id):
            return None
        insert = insert_for(s)
        s.execute(insert(Analysis)
                  .values(job_id=job_id, kind=kind, subject=subject, summary=summary,
                          created_at=utcnow())
                  .on_conflict_do_nothing(index_elements=["job_id"]))
        analysis = s.execute(select(Analysis).where(Analysis.job_id == job_id)).scalar_one()
        analysis.summary = summary
        for name, data in sorted(files.items()):
            sha = put_bytes(s, data, _media_type(name))
            stmt = insert(AnalysisFile).values(analysis_id=analysis.id, name=name, sha256=sha)
            s.execute(stmt.on_conflict_do_update(index_elements=["analysis_id", "name"],
                                                 set_={"sha256": stmt.excluded.sha256}))
        return analysis.id


def run_explore(job_id: int, count_attempt: bool = True) -> int | None:
    """Explore the dataset named by explore job ``job_id``; store the result.

    ``count_attempt``: whether this delivery counts against the job's attempts
    (``workers.tasks.CaptrainTask.new_attempt``). Returns the analysis id, or None if the job had
    ended or used up its attempts. Raises NotFound for an unknown job, SpecError for
    a dataset that cannot be explored.
    """
    from workers.explore import explore  # matplotlib and scikit-learn load on demand

    spec = start_job(job_id, "explore", count_attempt)
    if spec is None:
        return None
    result = explore(str(spec["dataset"]))
    return store_analysis(job_id, "explore", str(spec["dataset"]), result.summary,
                          result.files)


def _test_items(layout_job_id: int | None, limit: int) -> tuple[list[shardfmt.Item], int]:
    """The first ``limit`` test items of a dataset, in shard order, and the size of
    its whole test split. Raises StateError when it has no test shards."""
    with session_scope() as s:
        shards = s.execute(
            select(Shard.sha256, Shard.count)
            .where(Shard.job_id == layout_job_id, Shard.split == "test",
                   Shard.status == DONE)
            .order_by(Shard.index)
        ).all()
    if not shards:
        raise StateError("the run's dataset has no finished test shards")
    items: list[shardfmt.Item] = []
    for sha, _count in shards:
        if len(items) >= limit:
            break
        assert sha is not None  # done shards always carry their artifact
        with session_scope() as s:
            data = read_verified(s, sha)
        _, it = shardfmt.unpack(data)
        items.extend(it)
    return items[:limit], sum(c for _, c in shards)


def run_report(job_id: int, count_attempt: bool = True) -> int | None:
    """Report on the run named by report job ``job_id``: curves from its metrics,
    predictions of its test items by its stored model; store the result.

    ``count_attempt`` is as for :func:`run_explore`. Returns the analysis id, or None if the
    job had ended or used up its attempts. Raises NotFound for an
    unknown job or run, StateError for a run that is not done or a dataset without
    test shards, ArtifactError for a stored shard or model that fails its check.
    """
    from workers.predict import Predictor  # torch loads on demand
    from workers.report import build_report

    spec = start_job(job_id, "report", count_attempt)
    if spec is None:
        return None
    if spec.get("sweep") is not None:
        return _sweep_report(job_id, int(spec["sweep"]))
    run_id, limit = int(spec["run"]), int(spec["limit"])
    with session_scope() as s:
        run, dataset = finished_run(s, run_id)
        name, kind, charset, layout = (dataset.name, dataset.kind, dataset.charset,
                                       dataset.layout_job_id)
        epochs = run.epochs_done
        metrics = [{"epoch": m.epoch, "split": m.split, "name": m.name, "value": m.value}
                   for m in s.execute(select(Metric).where(Metric.run_id == run_id)
                                      .order_by(Metric.epoch, Metric.split, Metric.name))
                   .scalars()]
    items, total = _test_items(layout, limit)
    predictor = Predictor.load(str(run_id))
    predictions: list[tuple[str, float]] = []
    for start in range(0, len(items), PREDICT_BATCH):
        predictions += predictor.read_items(items[start:start + PREDICT_BATCH])
    report = build_report(run_id=run_id, dataset=name, kind=kind, charset=charset,
                          epochs=epochs, metrics=metrics, items=items,
                          predictions=predictions, test_items=total)
    log.info("report of run %s: %d test items, seq_acc %.4f", run_id, len(items),
             report.summary["seq_acc"])
    return store_analysis(job_id, "report", f"run {run_id}", report.summary, report.files)


def _sweep_report(job_id: int, sweep_id: int) -> int | None:
    """Report job ``job_id`` on sweep ``sweep_id``: its study's plots and trials."""
    from shared import sweeps
    from shared.spec import SweepSpec
    from workers.jobs.sweeps import study
    from workers.sweep_report import build_sweep_report

    with session_scope() as s:
        spec = SweepSpec(**get_job(s, sweep_id).spec)
        views = sweeps.trials(s, sweep_id)
        summary = sweeps.summary(s, sweep_id, views)
    report = build_sweep_report(summary, study(spec, views, len(views)))
    return store_analysis(job_id, "report", f"sweep {sweep_id}", report.summary,
                          report.files)
