"""What each task does, as plain functions over ids: load rows, do the work, store.

Tasks in ``workers.tasks`` are thin wrappers over these; tests call these directly.
Every function may run twice for the same ids (late acks), so each one checks the
SQL state first and writes with idempotent upserts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections import defaultdict
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import shardfmt
from shared.artifacts import delete_if_unreferenced, put_bytes, read_verified
from shared.db import insert_for, session_scope
from shared.errors import NotFound, StateError
from shared.records import (
    HEARTBEAT_SECONDS,
    acquire_run,
    complete_if_done,
    finish_shard,
    get_shard,
    heartbeat,
    release_run,
    start_shard,
    upsert_metrics,
)
from shared.schema import DONE, READY, RUNNING, Dataset, Job, Model, Run, Shard, utcnow
from shared.spec import GenerateSpec, SplitSpec, TrainSpec
from workers.shutdown import stop_requested

log = logging.getLogger(__name__)


def _load_shard_context(job_id: int, index: int) -> tuple[Job, Shard, Dataset]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        shard = get_shard(s, job_id, index)
        dataset = s.get(Dataset, shard.dataset_id)
        assert dataset is not None
        return job, shard, dataset


def _store_shard(job_id: int, index: int, data: bytes, worker: str) -> str:
    with session_scope() as s:
        sha = put_bytes(s, data, shardfmt.MEDIA_TYPE)
        finish_shard(s, job_id, index, sha, worker)
    complete_if_done(job_id)
    return sha


def generate_shard(job_id: int, index: int, worker: str, retry: int = 0) -> str | None:
    """Render shard ``index`` of a generate job and store it. Returns its sha256, or
    None if there was nothing to do (already done, or the job ended)."""
    from workers.synth import render_items  # captcha is a worker-only dependency

    if not start_shard(job_id, index, worker, count_attempt=retry == 0):
        # Done already (perhaps by a run killed before it could finish the job):
        # completion is idempotent, so check it again.
        complete_if_done(job_id)
        return None
    job, shard, _ = _load_shard_context(job_id, index)
    spec = GenerateSpec(**job.spec)
    items = render_items(
        shard.seed, shard.start, shard.count, spec.charset, spec.length, spec.width, spec.height
    )
    meta = {
        "split": shard.split, "start": shard.start,
        "charset": spec.charset, "length": spec.length,
        "width": spec.width, "height": spec.height, "seed": shard.seed,
    }
    return _store_shard(job_id, index, shardfmt.pack(items, meta), worker)


def split_permutation(n: int, seed: int) -> list[int]:
    """The seeded order of ``n`` source items that a split job cuts into splits."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_shard(job_id: int, index: int, worker: str, retry: int = 0) -> str | None:
    """Build output shard ``index`` of a split job from the dataset's source shards."""
    if not start_shard(job_id, index, worker, count_attempt=retry == 0):
        complete_if_done(job_id)
        return None
    job, shard, dataset = _load_shard_context(job_id, index)
    spec = SplitSpec(**job.spec)
    source_job = spec.source_job_id
    with session_scope() as s:
        sources = s.execute(
            select(Shard.start, Shard.count, Shard.sha256)
            .where(Shard.job_id == source_job)
            .order_by(Shard.index)
        ).all()
    total = sum(c for _, c, _ in sources)
    counts = spec.split.counts(total)
    offset = {"train": 0, "val": counts["train"], "test": counts["train"] + counts["val"]}
    perm = split_permutation(total, spec.seed)
    begin = offset[shard.split] + shard.start
    wanted = {src: pos for pos, src in enumerate(perm[begin : begin + shard.count])}
    picked: list[shardfmt.Item | None] = [None] * shard.count
    for start, count, sha in sources:
        if sha is None or not any(start <= i < start + count for i in wanted):
            continue
        with session_scope() as s:
            data = read_verified(s, sha)
        _, items = shardfmt.unpack(data)
        for it in items:
            pos = wanted.get(it.index)
            if pos is not None:
                picked[pos] = shardfmt.Item(shard.start + pos, it.label, it.data, it.ext)
    if any(p is None for p in picked):
        raise StateError(f"source shards of job {source_job} do not hold {total} items")
    meta = {
        "split": shard.split, "start": shard.start,
        "charset": dataset.charset, "length": dataset.length,
        "width": dataset.width, "height": dataset.height, "seed": spec.seed,
    }
    return _store_shard(job_id, index, shardfmt.pack([p for p in picked if p], meta), worker)


def _shards_by_split(dataset: Dataset) -> dict[str, list[tuple[str, int]]]:
    with session_scope() as s:
        rows = s.execute(
            select(Shard.split, Shard.sha256, Shard.count)
            .where(Shard.job_id == dataset.layout_job_id, Shard.status == DONE)
            .order_by(Shard.index)
        ).all()
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split, sha, count in rows:
        assert sha is not None  # done shards always carry their artifact
        out[split].append((sha, count))
    return out


HELD = {"held": True}  # train_run's answer when another live process holds the run


def train_run(run_id: int, worker: str, progress: Any = None) -> dict[str, Any] | None:
    """Train run ``run_id``, resuming from its last checkpoint; store the model.

    Returns the test metrics, or None if the run was already done. ``progress``, if
    given, is called as ``progress(epoch, done_items, total_items, metrics)``.
    Returns ``HELD`` if another live process holds the run's lease.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}"
    lease = acquire_run(run_id, owner)
    if lease != "acquired":
        log.warning("run %s: not training here (%s)", run_id, lease)
        return HELD if lease == "held" else None
    try:
        return _train_leased(run_id, owner, worker, progress)
    except BaseException:
        # Let a redelivery (on this host or another) take over without waiting for
        # the lease to go stale. A SIGKILL skips this; staleness covers it.
        release_run(run_id, owner)
        raise


def _train_leased(run_id: int, owner: str, worker: str, progress: Any) -> dict[str, Any] | None:
    import safetensors.torch

    from workers import checkpoint
    from workers.data import ShardLoader
    from workers.models import ModelConfig
    from workers.train import fit, pick_device

    with session_scope() as s:
        run = s.get(Run, run_id)
        assert run is not None
        job = s.get(Job, run.job_id)
        dataset = s.get(Dataset, run.dataset_id)
        assert job is not None and dataset is not None
        if dataset.status != READY:
            raise StateError(f"dataset {dataset.name} is {dataset.status}, not ready")
        spec = TrainSpec(**job.spec)
        device = pick_device(spec.device)
        run.status = job.status = RUNNING
        run.worker, run.device = worker, str(device)
        ckpt_sha = run.checkpoint_sha256
        resume = checkpoint.loads(read_verified(s, ckpt_sha)) if ckpt_sha is not None else None

    cfg = ModelConfig(
        charset=dataset.charset, length=dataset.length,
        in_height=max(8, round(dataset.height * spec.scale)),
        in_width=max(8, round(dataset.width * spec.scale)),
        image_height=dataset.height, image_width=dataset.width, arch=spec.model,
    )
    splits = _shards_by_split(dataset)
    for name in ("train", "val", "test"):
        if not splits.get(name):
            raise StateError(f"dataset {dataset.name} has no {name} shards")

    def fetch(sha: str) -> bytes:
        with session_scope() as s:
            return read_verified(s, sha)

    def loader(split: str, shuffle: bool) -> ShardLoader:
        return ShardLoader([sha for sha, _ in splits[split]], fetch, cfg, spec.batch_size,
                           shuffle=shuffle, seed=spec.seed)

    train_count = sum(c for _, c in splits["train"])

    def store_checkpoint(s: Session, ckpt: dict) -> Run:
        """Renew the lease, store ``ckpt`` and point the run at it, inside ``s``.

        One checkpoint per run is kept, the one a resume needs: the previous one is
        deleted unless something else references the same bytes.
        """
        heartbeat(s, run_id, owner)
        sha = put_bytes(s, checkpoint.dumps(ckpt), checkpoint.MEDIA_TYPE)
        r = s.get(Run, run_id)
        assert r is not None
        previous, r.checkpoint_sha256 = r.checkpoint_sha256, sha
        s.flush()
        if previous is not None and previous != sha:
            delete_if_unreferenced(s, previous)
        return r

    def on_epoch(epoch: int, tr: dict[str, float], va: dict[str, Any], ckpt: dict) -> None:
        with session_scope() as s:
            upsert_metrics(s, run_id, epoch, "train", tr)
            upsert_metrics(s, run_id, epoch, "val", va)
            store_checkpoint(s, ckpt).epochs_done = epoch
        if progress is not None:
            progress(epoch, epoch * train_count, spec.epochs * train_count, va)

    def on_interrupt(ckpt: dict) -> None:
        # Mid-epoch: keep the position so that the next delivery resumes right here.
        with session_scope() as s:
            store_checkpoint(s, ckpt)
        log.warning("run %s: checkpoint at epoch %d batch %d before stopping", run_id,
                    ckpt["epoch"] + 1, ckpt["batch"])

    last_beat = time.monotonic()

    def on_batch(_n: int) -> None:
        nonlocal last_beat
        if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
            with session_scope() as s:
                heartbeat(s, run_id, owner)
            last_beat = time.monotonic()

    result = fit(
        cfg, train=loader("train", True), val=loader("val", False), test=loader("test", False),
        train_count=train_count, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
        seed=spec.seed, device=device, resume=resume, on_epoch=on_epoch, on_batch=on_batch,
        should_stop=stop_requested, on_interrupt=on_interrupt,
        interrupts=(SoftTimeLimitExceeded,),
    )
    weights = safetensors.torch.save(
        {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
        metadata={"config": json.dumps(cfg.to_dict())},
    )
    with session_scope() as s:
        heartbeat(s, run_id, owner)
        sha = put_bytes(s, weights, "application/vnd.captrain.model+safetensors")
        upsert_metrics(s, run_id, spec.epochs, "test", result.test)
        s.execute(
            insert_for(s)(Model)
            .values(run_id=run_id, dataset_id=dataset.id, weights_sha256=sha,
                    config=cfg.to_dict(), metrics=result.test, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["run_id"])
        )
        r = s.get(Run, run_id)
        j = s.get(Job, job.id)
        assert r is not None and j is not None
        if result.resumed_from is not None and r.resumed_from is None:
            r.resumed_from = result.resumed_from
        r.status = j.status = DONE
        r.finished_at = j.finished_at = utcnow()
    return result.test
