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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from shared.spec import GenerateSpec, SplitSpec, TrainSpec, image_input_size
from workers.shutdown import StopRequested, stop_requested

if TYPE_CHECKING:
    from workers.models import ModelConfig

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


def generate_shard(job_id: int, index: int, worker: str, count_attempt: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> str | None:
    """Render shard ``index`` of a generate job and store it. Returns its sha256, or
    None if there was nothing to do (already done, or the job ended).
    ``count_attempt``: whether this delivery counts against the shard's attempts
    (``workers.tasks.new_attempt``). ``progress``, if given, is called as
    ``progress(items_done, shard_count)`` while it renders."""
    from workers.synth import render_audio_items, render_items  # worker-only deps

    if not start_shard(job_id, index, worker, count_attempt):
        # Done already (perhaps by a run killed before it could finish the job):
        # completion is idempotent, so check it again.
        complete_if_done(job_id)
        return None
    job, shard, _ = _load_shard_context(job_id, index)
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
    return _store_shard(job_id, index, shardfmt.pack(items, generated_meta(spec, shard)),
                        worker)


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
                progress: Callable[[int, int], None] | None = None) -> str | None:
    """Build output shard ``index`` of a split job from the dataset's source shards.
    ``count_attempt`` is as for :func:`generate_shard`. ``progress``, if given, is
    called as ``progress(items_found, shard_count)`` after each source shard read."""
    if not start_shard(job_id, index, worker, count_attempt):
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
        if progress is not None:
            progress(sum(p is not None for p in picked), shard.count)
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


AUDIO_MELS = 32  # mel bands: the spectrogram's height
# Samples per frame: 40 ms at 8 kHz. A spoken digit still spans 10-20 frames, and a
# 17 s clip is 423 frames, which keeps a CPU epoch of audio affordable.
AUDIO_HOP = 320
# The trunk's width. The crnn reads audio with its 1d trunk (mel bands as channels),
# which affords 64; the 2d trunk of the fixed-length models is held to 16, since a
# clip is 5x an 80x30 captcha's pixels.
AUDIO_CHANNELS = {"1d": 64, "2d": 16}
AUDIO_TIME_POOL = 8  # crnn: 320 ms per CTC step, 52 steps for 4 digits


def model_config(dataset: Dataset, spec: TrainSpec) -> ModelConfig:
    """The model's input and output shape for ``dataset``, by its kind."""
    from workers.audio import clip_frames
    from workers.models import CTC_ARCHS, ModelConfig

    common: dict[str, Any] = {
        "charset": dataset.charset, "length": dataset.length, "arch": spec.model,
        "min_length": dataset.meta.get("min_length") or 0,
        "augment": getattr(spec, "augment", "none"),
    }
    if dataset.kind == "audio":
        rate = int(dataset.meta.get("sample_rate", 8000))
        trunk = "1d" if spec.model in CTC_ARCHS else "2d"
        return ModelConfig(
            **common, in_height=AUDIO_MELS,
            in_width=clip_frames(dataset.length, rate, AUDIO_HOP),
            image_height=0, image_width=0, modality="audio", sample_rate=rate,
            n_mels=AUDIO_MELS, hop=AUDIO_HOP, n_fft=2 * AUDIO_HOP,
            channels=AUDIO_CHANNELS[trunk], time_pool=AUDIO_TIME_POOL, trunk=trunk,
        )
    in_height, in_width = image_input_size(dataset.kind, dataset.height, dataset.width,
                                           spec.scale)
    return ModelConfig(
        **common, in_height=in_height, in_width=in_width,
        image_height=dataset.height, image_width=dataset.width,
        preprocess="mnist" if dataset.kind == "mnist" else "resize",
    )


HELD = {"held": True}  # train_run's answer when another live process holds the run
# Decoded-shard caches of a training run, bytes: the train and val splits are read
# every epoch; the test split once, so caching it would only hold memory. Together
# they bound what a run keeps beyond the group of shards it is training on: 256 MiB
# holds the digits4 preset's 80k training images at 80x30 (186 MiB), and keeps a
# 200k-image run under 1.5 GB of RSS (BENCHMARKS.md).
TRAIN_CACHE_BYTES = 192 * 2**20
VAL_CACHE_BYTES = 64 * 2**20


def train_run(run_id: int, worker: str, progress: Any = None,
              count_attempt: bool = True) -> dict[str, Any] | None:
    """Train run ``run_id``, resuming from its last checkpoint; store the model.

    Returns the test metrics, or None if the run was already done. ``progress``, if
    given, is called as ``progress(epoch, done_items, total_items, metrics)``.
    Returns ``HELD`` if another live process holds the run's lease.
    ``count_attempt`` is as for :func:`generate_shard`; a warm shutdown's stop gives
    its attempt back (the run checkpointed: nothing failed).
    """
    owner = f"{socket.gethostname()}:{os.getpid()}"
    lease = acquire_run(run_id, owner, count_attempt)
    if lease != "acquired":
        log.warning("run %s: not training here (%s)", run_id, lease)
        return HELD if lease == "held" else None
    try:
        return _train_leased(run_id, owner, worker, progress)
    except StopRequested:
        release_run(run_id, owner, give_back_attempt=count_attempt)
        raise
    except BaseException:
        # Let a redelivery (on this host or another) take over without waiting for
        # the lease to go stale. A SIGKILL skips this; staleness covers it.
        release_run(run_id, owner)
        raise


def _train_leased(run_id: int, owner: str, worker: str, progress: Any) -> dict[str, Any] | None:
    from workers import checkpoint
    from workers.data import ShardLoader, loader_workers
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

    if dataset.kind == "iris":
        return _train_tabular(run_id, owner, spec, dataset.id)
    cfg = model_config(dataset, spec)
    splits = _shards_by_split(dataset)
    for name in ("train", "val", "test"):
        if not splits.get(name):
            raise StateError(f"dataset {dataset.name} has no {name} shards")

    def fetch(sha: str) -> bytes:
        with session_scope() as s:
            return read_verified(s, sha)

    def loader(split: str) -> ShardLoader:
        # Only the train split is shuffled and augmented, and gets loader processes.
        train = split == "train"
        cache = {"train": TRAIN_CACHE_BYTES, "val": VAL_CACHE_BYTES}.get(split, 0)
        return ShardLoader([sha for sha, _ in splits[split]], fetch, cfg, spec.batch_size,
                           shuffle=train, seed=spec.seed, augment=cfg.augment if train else "none",
                           workers=loader_workers(spec.loader_workers, device) if train else 0,
                           pin_memory=train and device.type == "cuda", cache_bytes=cache)

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

    train = loader("train")
    try:
        result = fit(
            cfg, train=train, val=loader("val"), test=loader("test"),
            train_count=train_count, epochs=spec.epochs, batch_size=spec.batch_size,
            lr=spec.lr, seed=spec.seed, device=device, resume=resume, on_epoch=on_epoch,
            on_batch=on_batch, should_stop=stop_requested, on_interrupt=on_interrupt,
            interrupts=(SoftTimeLimitExceeded,), compile=spec.compile,
        )
    finally:
        train.close()  # its DataLoader processes, if any
    _finish_run(run_id, owner, dataset.id, result.model, cfg.to_dict(), spec.epochs,
                result.test, result.resumed_from)
    return result.test


def _finish_run(run_id: int, owner: str, dataset_id: int, model: Any, config: dict[str, Any],
                epoch: int, test: dict[str, Any], resumed_from: int | None = None) -> None:
    """Store the model's weights (safetensors) and config, the test metrics, and mark
    the run and its job done, in one transaction."""
    import safetensors.torch

    weights = safetensors.torch.save(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        metadata={"config": json.dumps(config)},
    )
    with session_scope() as s:
        heartbeat(s, run_id, owner)
        sha = put_bytes(s, weights, "application/vnd.captrain.model+safetensors")
        upsert_metrics(s, run_id, epoch, "test", test)
        s.execute(
            insert_for(s)(Model)
            .values(run_id=run_id, dataset_id=dataset_id, weights_sha256=sha,
                    config=config, metrics=test, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["run_id"])
        )
        r = s.get(Run, run_id)
        assert r is not None
        j = s.get(Job, r.job_id)
        assert j is not None
        if resumed_from is not None and r.resumed_from is None:
            r.resumed_from = resumed_from
        r.status = j.status = DONE
        r.finished_at = j.finished_at = utcnow()


def _train_tabular(run_id: int, owner: str, spec: TrainSpec, dataset_id: int
                   ) -> dict[str, Any]:
    """Iris: stratified 5-fold cross-validation, one val metric row per fold, then a
    final model on all rows. Seconds of work, so no checkpoints."""
    from workers import tabular

    table = tabular.load_iris()
    cv = tabular.cross_validate(spec.model, table, k=5, seed=spec.seed)
    with session_scope() as s:
        for i, acc in enumerate(cv["folds"], start=1):
            upsert_metrics(s, run_id, i, "val", {"acc": acc})
    model, mean, std = tabular.fit(spec.model, table.x, table.y, len(table.classes), spec.seed)
    config = {"arch": spec.model, "features": table.features, "classes": table.classes,
              "mean": mean.tolist(), "std": std.tolist()}
    test = {"cv_acc": cv["cv_acc"], "cv_std": cv["cv_std"], "folds": cv["k"],
            "fold_acc": cv["folds"]}
    _finish_run(run_id, owner, dataset_id, model, config, cv["k"], test)
    return test
