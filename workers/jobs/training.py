"""The train job: take the run's lease, train through ``workers.loop.fit`` with a
recorder that persists each epoch, and store the model.

A redelivered message resumes from the run's last checkpoint through the same code
path. Iris (a table, not shards) trains by cross-validation in seconds instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import registry, sweeps
from shared.artifacts import delete_if_unreferenced, put_bytes, read_verified
from shared.db import session_scope
from shared.dispatch import send_job
from shared.errors import Pruned, StateError, StopRequested
from shared.kinds import kind_of
from shared.lease import acquire_run, heartbeat, release_run
from shared.metrics import upsert_metrics
from shared.schema import DONE, READY, Dataset, Model, Run, Shard, utcnow
from shared.settings import get_settings
from shared.spec import TrainSpec
from shared.state import ENDED, finish_run, get_job, get_run, prune_run, start_run
from workers.loop import Hooks
from workers.shutdown import stop_requested

if TYPE_CHECKING:
    from workers.loader import ShardLoader
    from workers.models import ModelConfig

log = logging.getLogger(__name__)

HELD = {"held": True}  # train_run's answer when another live process holds the run
MODEL_MEDIA_TYPE = "application/vnd.captrain.model+safetensors"


class EpochProgress(Protocol):
    def __call__(self, epoch: int, done: int, total: int, metrics: dict[str, Any]) -> None:
        ...


def train_run(run_id: int, worker: str, progress: EpochProgress | None = None,
              count_attempt: bool = True) -> dict[str, Any] | None:
    """Train run ``run_id``, resuming from its last checkpoint; store the model.

    Returns the test metrics, None if the run was already done, or ``HELD`` if
    another live process holds the run's lease. ``progress``, if given, is called as
    ``progress(epoch, done_items, total_items, val_metrics)``. ``count_attempt`` is
    whether this delivery counts against the run's attempts; a warm shutdown's stop
    gives its attempt back (the run checkpointed: nothing failed).
    """
    owner = f"{socket.gethostname()}:{os.getpid()}"
    lease = acquire_run(run_id, owner, count_attempt)
    if lease != "acquired":
        log.warning("run %s: not training here (%s)", run_id, lease)
        return HELD if lease == "held" else None
    try:
        return _train_leased(run_id, owner, worker, progress)
    except Pruned as exc:
        with session_scope() as s:
            prune_run(s, run_id)
            # A pruned trial is never resumed: its checkpoint is dead weight.
            run = get_run(s, run_id)
            sha, run.checkpoint_sha256 = run.checkpoint_sha256, None
            s.flush()
            if sha is not None:
                delete_if_unreferenced(s, sha)
        release_run(run_id, owner)
        log.info("run %s: %s", run_id, exc)
        return {"pruned": str(exc)}
    except StopRequested:
        release_run(run_id, owner, give_back_attempt=count_attempt)
        raise
    except BaseException:
        # Let a redelivery (on this host or another) take over without waiting for
        # the lease to go stale. A SIGKILL skips this; staleness covers it.
        release_run(run_id, owner)
        raise


class RunRecorder(Hooks):
    """The train job's hooks into ``fit``: each epoch's metrics and checkpoint go to
    SQL under the run's lease, heartbeats renew it, and ``finish`` stores the model."""

    interrupts = (SoftTimeLimitExceeded,)

    def __init__(self, run_id: int, owner: str, train_items: int, epochs: int,
                 progress: EpochProgress | None = None, trial: bool = False) -> None:
        self.run_id, self.owner = run_id, owner
        self.train_items, self.epochs, self.progress = train_items, epochs, progress
        self.trial = trial  # a sweep's trial: its pruner may stop it at an epoch's end
        self.beat_every = get_settings().heartbeat_seconds
        self.last_beat = time.monotonic()

    def should_stop(self) -> bool:
        return stop_requested()

    def on_batch(self, n: int) -> None:
        if time.monotonic() - self.last_beat > self.beat_every:
            with session_scope() as s:
                heartbeat(s, self.run_id, self.owner)
            self.last_beat = time.monotonic()

    def on_epoch(self, epoch: int, train: dict[str, float], val: dict[str, Any],
                 checkpoint: dict[str, Any]) -> None:
        with session_scope() as s:
            upsert_metrics(s, self.run_id, epoch, "train", train)
            upsert_metrics(s, self.run_id, epoch, "val", val)
            self._store_checkpoint(s, checkpoint).epochs_done = epoch
        if self.progress is not None:
            self.progress(epoch, epoch * self.train_items, self.epochs * self.train_items, val)
        if self.trial and epoch < self.epochs:
            from workers.jobs.sweeps import should_prune  # Optuna, for trials only

            if should_prune(self.run_id, epoch):
                raise Pruned(f"pruned after epoch {epoch} of {self.epochs}")

    def on_interrupt(self, checkpoint: dict[str, Any]) -> None:
        # Mid-epoch: keep the position so that the next delivery resumes right here.
        with session_scope() as s:
            self._store_checkpoint(s, checkpoint)
        log.warning("run %s: checkpoint at epoch %d batch %d before stopping", self.run_id,
                    checkpoint["epoch"] + 1, checkpoint["batch"])

    def _store_checkpoint(self, s: Session, ckpt: dict[str, Any]) -> Run:
        """Renew the lease, store ``ckpt`` and point the run at it, inside ``s``. One
        checkpoint per run is kept, the one a resume needs: the previous one is
        deleted unless something else references the same bytes."""
        from workers import checkpoint

        heartbeat(s, self.run_id, self.owner)
        sha = put_bytes(s, checkpoint.dumps(ckpt), checkpoint.MEDIA_TYPE)
        run = get_run(s, self.run_id)
        previous, run.checkpoint_sha256 = run.checkpoint_sha256, sha
        s.flush()
        if previous is not None and previous != sha:
            delete_if_unreferenced(s, previous)
        return run

    def finish(self, dataset_id: int, model: Any, config: dict[str, Any], epoch: int,
               test: dict[str, Any], resumed_from: int | None = None) -> None:
        """Store the model's weights (safetensors), config and test metrics as the next
        version of the run's model name, with its lineage, and mark the run and its
        job done, in one transaction. A run already registered is left as it is."""
        import safetensors.torch

        weights = safetensors.torch.save(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            metadata={"config": json.dumps(config)},
        )
        env = registry.environment()  # runs git: before the transaction holds locks
        with session_scope() as s:
            if s.execute(select(Model.id).where(Model.run_id == self.run_id)).first():
                return  # finished before: its version, metrics and status stand
            heartbeat(s, self.run_id, self.owner)
            run = get_run(s, self.run_id)
            spec = TrainSpec(**get_job(s, run.job_id).spec)
            dataset = s.get(Dataset, dataset_id)
            assert dataset is not None  # a foreign key
            sha = put_bytes(s, weights, MODEL_MEDIA_TYPE)
            upsert_metrics(s, self.run_id, epoch, "test", test)
            # Specs stored before the registry name no model: the dataset's name.
            registry.register(
                s, run_id=self.run_id, name=spec.register or dataset.name,
                dataset_id=dataset_id, weights_sha256=sha, config=config, metrics=test,
                lineage=registry.lineage(s, self.run_id, test, env), created_at=utcnow())
            finish_run(s, self.run_id, resumed_from)


def _start(run_id: int, worker: str) -> tuple[TrainSpec, Dataset, Any, dict | None]:
    """Mark the leased run running; returns its spec, dataset, device and the
    checkpoint to resume from. Raises StateError for a dataset that is not ready."""
    from workers import checkpoint
    from workers.device import pick_device

    with session_scope() as s:
        run = get_run(s, run_id)
        spec = TrainSpec(**get_job(s, run.job_id).spec)
        dataset = s.get(Dataset, run.dataset_id)
        assert dataset is not None  # a foreign key
        if dataset.status != READY:
            raise StateError(f"dataset {dataset.name} is {dataset.status}, not ready")
        device = pick_device(spec.device)
        start_run(s, run, worker, str(device))
        ckpt = run.checkpoint_sha256
        resume = checkpoint.loads(read_verified(s, ckpt)) if ckpt is not None else None
        return spec, dataset, device, resume


def _train_leased(run_id: int, owner: str, worker: str, progress: EpochProgress | None
                  ) -> dict[str, Any] | None:
    from workers.codecs import model_config
    from workers.loop import fit

    spec, dataset, device, resume = _start(run_id, worker)
    if kind_of(dataset.kind).modality == "table":
        return train_tabular(run_id, owner, spec, dataset.id)
    cfg = model_config(dataset, spec)
    splits = _shards_by_split(dataset)
    loaders = {name: _loader(name, splits[name], cfg, spec, device, dataset)
               for name in ("train", "val", "test")}
    train_items = sum(c for _, c in splits["train"])
    recorder = RunRecorder(run_id, owner, train_items, spec.epochs, progress,
                           trial=spec.sweep is not None)
    try:
        result = fit(cfg, train=loaders["train"], val=loaders["val"], test=loaders["test"],
                     epochs=spec.epochs, lr=spec.lr, seed=spec.seed, device=device,
                     resume=resume, hooks=recorder, compile=spec.compile,
                     precision=spec.precision)
    finally:
        loaders["train"].close()  # its DataLoader processes, if any
    recorder.finish(dataset.id, result.model, cfg.to_dict(), spec.epochs, result.test,
                    result.resumed_from)
    return result.test


def after_trial(run_id: int) -> None:
    """If run ``run_id`` is a sweep's trial and has ended, send its sweep's next step
    (should this be lost, the reconciler sends it: the sweep then has a free slot).
    Never raises: the trial's own outcome is what its task reports."""
    try:
        with session_scope() as s:
            sweep = sweeps.sweep_of_run(s, run_id)
            ended = sweep is not None and get_run(s, run_id).status in ENDED
        if ended and sweep is not None:
            send_job(sweep)
    except Exception as exc:
        log.warning("run %s: its sweep's next step not sent (the reconciler will): %s",
                    run_id, exc)


def _shards_by_split(dataset: Dataset) -> dict[str, list[tuple[str, int]]]:
    """(sha256, items) of each done shard of the dataset's layout, by split. Raises
    StateError when a split has none."""
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
    for name in ("train", "val", "test"):
        if not out.get(name):
            raise StateError(f"dataset {dataset.name} has no {name} shards")
    return out


def _fetch(sha: str) -> bytes:
    with session_scope() as s:
        return read_verified(s, sha)


def _loader(split: str, shards: list[tuple[str, int]], cfg: ModelConfig, spec: TrainSpec,
            device: Any, dataset: Dataset) -> ShardLoader:
    """The loader of one split. Only the train split is shuffled and augmented, and
    gets loader processes; the test split is read once, so it is not cached."""
    from workers.loader import ShardLoader, loader_workers

    train = split == "train"
    settings = get_settings()
    cache_mib = {"train": settings.train_cache_mib, "val": settings.val_cache_mib}.get(split, 0)
    return ShardLoader([sha for sha, _ in shards], _fetch, cfg, spec.batch_size,
                       shuffle=train, seed=spec.seed, augment=cfg.augment if train else "none",
                       workers=loader_workers(spec.loader_workers, device) if train else 0,
                       pin_memory=train and device.type == "cuda", cache_bytes=cache_mib * 2**20,
                       fill=kind_of(dataset.kind).fill, items=sum(c for _, c in shards))


def train_tabular(run_id: int, owner: str, spec: TrainSpec, dataset_id: int
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
    RunRecorder(run_id, owner, 0, cv["k"]).finish(dataset_id, model, config, cv["k"], test)
    return test
