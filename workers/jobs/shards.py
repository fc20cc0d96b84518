"""Shard jobs: render a generate job's shard, or cut a split job's shard out of an
imported dataset's source shards; store it and mark it done.

A shard's bytes are a function of its row alone (seed, split, start, count), so any
worker, on any retry, stores the same artifact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from shared import shardfmt
from shared.artifacts import put_bytes, read_verified
from shared.db import session_scope
from shared.errors import StateError
from shared.schema import Dataset, Job, Shard
from shared.spec import GenerateSpec, SplitSpec
from shared.state import complete_if_done, finish_shard, get_job, get_shard, start_shard

Progress = Callable[[int, int], None]


def _load(job_id: int, index: int) -> tuple[Job, Shard, Dataset]:
    with session_scope() as s:
        job = get_job(s, job_id)
        shard = get_shard(s, job_id, index)
        dataset = s.get(Dataset, shard.dataset_id)
        assert dataset is not None  # a foreign key
        return job, shard, dataset


def _store(job_id: int, index: int, data: bytes, worker: str) -> str:
    with session_scope() as s:
        sha = put_bytes(s, data, shardfmt.MEDIA_TYPE)
        finish_shard(s, job_id, index, sha, worker)
    complete_if_done(job_id)
    return sha


def _started(job_id: int, index: int, worker: str, count_attempt: bool) -> bool:
    if start_shard(job_id, index, worker, count_attempt):
        return True
    # Done already (perhaps by a run killed before it could finish the job):
    # completion is idempotent, so check it again.
    complete_if_done(job_id)
    return False


def generate_shard(job_id: int, index: int, worker: str, count_attempt: bool = True,
                   progress: Progress | None = None) -> str | None:
    """Render shard ``index`` of a generate job and store it. Returns its sha256, or
    None if there was nothing to do (already done, or the job ended).
    ``count_attempt``: whether this delivery counts against the shard's attempts
    (``workers.tasks.CaptrainTask.new_attempt``). ``progress``, if given, is called as
    ``progress(items_done, shard_count)`` while it renders."""
    from workers.synth import render_audio_items, render_items  # worker-only deps

    if not _started(job_id, index, worker, count_attempt):
        return None
    job, shard, _ = _load(job_id, index)
    spec = GenerateSpec(**job.spec)
    if spec.kind == "audio":
        items = render_audio_items(shard.seed, shard.start, shard.count, spec.charset,
                                   spec.length, progress=progress, min_length=spec.min_length)
    else:
        items = render_items(
            shard.seed, shard.start, shard.count, spec.charset, spec.length, spec.width,
            spec.height, progress=progress, min_length=spec.min_length,
            image_format=spec.image_format,
        )
    return _store(job_id, index, shardfmt.pack(items, generated_meta(spec, shard)), worker)


def generated_meta(spec: GenerateSpec, shard: Shard) -> dict[str, Any]:
    """The manifest fields of a generated shard: enough to re-render it exactly."""
    meta = {
        "split": shard.split, "start": shard.start, "kind": spec.kind,
        "charset": spec.charset, "length": spec.length, "min_length": spec.min_length,
        "width": spec.width, "height": spec.height, "seed": shard.seed,
    }
    if spec.kind == "image":
        meta["image_format"] = spec.image_format
    return meta


def split_permutation(n: int, seed: int) -> list[int]:
    """The seeded order of ``n`` source items that a split job cuts into splits."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_shard(job_id: int, index: int, worker: str, count_attempt: bool = True,
                progress: Progress | None = None) -> str | None:
    """Build output shard ``index`` of a split job from the dataset's source shards.
    ``count_attempt`` is as for :func:`generate_shard`. ``progress``, if given, is
    called as ``progress(items_found, shard_count)`` after each source shard read."""
    if not _started(job_id, index, worker, count_attempt):
        return None
    job, shard, dataset = _load(job_id, index)
    spec = SplitSpec(**job.spec)
    with session_scope() as s:
        sources = s.execute(
            select(Shard.start, Shard.count, Shard.sha256)
            .where(Shard.job_id == spec.source_job_id).order_by(Shard.index)
        ).all()
    total = sum(c for _, c, _ in sources)
    counts = spec.split.counts(total)
    offset = {"train": 0, "val": counts["train"], "test": counts["train"] + counts["val"]}
    begin = offset[shard.split] + shard.start
    perm = split_permutation(total, spec.seed)[begin : begin + shard.count]
    picked = _pick(sources, {src: pos for pos, src in enumerate(perm)}, shard, progress)
    if any(p is None for p in picked):
        raise StateError(f"source shards of job {spec.source_job_id} do not hold "
                         f"{total} items")
    meta = {
        "split": shard.split, "start": shard.start,
        "charset": dataset.charset, "length": dataset.length,
        "width": dataset.width, "height": dataset.height, "seed": spec.seed,
    }
    return _store(job_id, index, shardfmt.pack([p for p in picked if p], meta), worker)


def _pick(sources: Any, wanted: dict[int, int], shard: Shard, progress: Progress | None
          ) -> list[shardfmt.Item | None]:
    """The source items at ``wanted``'s keys, placed at its values, renumbered from
    the shard's start; reading only the source shards that hold some."""
    picked: list[shardfmt.Item | None] = [None] * shard.count
    for start, count, sha in sources:
        if sha is None or not any(start <= i < start + count for i in wanted):
            continue
        with session_scope() as s:
            data = read_verified(s, sha)
        for it in shardfmt.unpack(data)[1]:
            pos = wanted.get(it.index)
            if pos is not None:
                picked[pos] = shardfmt.Item(shard.start + pos, it.label, it.data, it.ext)
        if progress is not None:
            progress(sum(p is not None for p in picked), shard.count)
    return picked
