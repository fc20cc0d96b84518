"""From shard artifacts to model-ready batches (``ShardLoader``).

Shards stream from the artifact store one at a time and decode through
``workers.codecs``. Decoded shards are kept in a byte-bounded cache, so a dataset
that fits is decoded once per run and a larger one is re-streamed each epoch with
flat memory.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.kinds import CAPTCHA_FILL
from workers.augment import Augment
from workers.codecs import decode_shard
from workers.models import ModelConfig


def loader_workers(want: int | None, device: torch.device) -> int:
    """DataLoader processes for a train loader: ``want``, or by default 0 off CUDA
    (the plain in-process path) and on CUDA one per core but one, at most 8."""
    if want is not None:
        return want
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@contextmanager
def _children_allowed() -> Iterator[None]:
    """Let this process start DataLoader workers even if it is a daemon.

    A Celery prefork pool process is daemonic, and multiprocessing refuses children to
    daemons, because a daemon killed at exit cannot join them. The loader's workers
    are daemons that torch stops with their loader, and each one exits by itself
    when it sees its parent gone (torch's worker watchdog), so nothing is orphaned.
    The gpu queue needs the prefork pool: its soft time limit is a signal to the
    pool process.
    """
    proc = mp.current_process()
    was = proc._config.get("daemon")  # type: ignore[attr-defined]
    proc._config["daemon"] = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        proc._config["daemon"] = was  # type: ignore[attr-defined]


def _loader_worker_init(_worker_id: int) -> None:
    # A forked loader process must not use its parent's pooled database connections.
    from shared.db import dispose_all

    dispose_all()


class _GroupStream(IterableDataset):
    """The groups of one epoch of a ``ShardLoader``, split among DataLoader workers.

    Worker ``w`` of ``n`` makes groups ``w, w + n, w + 2n, ...`` of the epoch held in
    shared memory (set by the main process before each ``iter``). The DataLoader
    takes one item from each worker in turn, so the groups arrive in order and the
    batches are those of the in-process path, for any number of workers.
    """

    def __init__(self, loader: ShardLoader, epoch: torch.Tensor) -> None:
        self.loader = loader
        self.epoch = epoch  # (1,) int64 in shared memory
        self.cache_bytes = loader.cache_bytes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        me, n = (info.id, info.num_workers) if info is not None else (0, 1)
        # Each worker process keeps its own decoded-shard cache: they share the budget.
        self.loader.cache_bytes = self.cache_bytes // n
        epoch = int(self.epoch[0])
        for g, shas in enumerate(self.loader.groups(epoch)):
            if g % n == me:
                yield self.loader.group(epoch, g, shas)


@dataclass
class ShardLoader:
    """Batches over a list of shard artifacts.

    ``fetch(sha256)`` returns a shard's verified bytes. Each epoch visits the shards
    in a seeded order and shuffles items within groups of ``mix`` shards, so the order
    is a function of (seed, epoch) and a resumed run sees the same batches.

    ``augment`` names a ``workers.augment`` preset applied to each group (the train
    split's loader only), seeded by (seed, epoch, group). With ``workers`` > 0, groups
    are decoded and augmented in that many DataLoader processes, kept for the whole
    run (call ``close`` when done); the batches are the same as with 0.
    ``pin_memory`` puts each group in page-locked memory for non-blocking copies to
    a CUDA device. ``fill`` is the grey augmentation moves in at the edges (the
    dataset kind's, ``shared.kinds``).
    """

    shards: list[str]
    fetch: Callable[[str], bytes]
    cfg: ModelConfig
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    mix: int = 8
    cache_bytes: int = 512 * 1024 * 1024
    augment: str = "none"
    workers: int = 0
    pin_memory: bool = False
    fill: int = CAPTCHA_FILL
    items: int = 0  # items in all ``shards``: sizes ``steps_per_epoch``

    def __post_init__(self) -> None:
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached = 0
        self._augment = Augment(self.augment, self.cfg.modality, fill=self.fill)
        self._dl: DataLoader | None = None
        self._dl_epoch: torch.Tensor | None = None

    def _load(self, sha: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(sha)
        if hit is not None:
            self._cache.move_to_end(sha)
            return hit
        x, y = decode_shard(self.fetch(sha), self.cfg)
        size = x.numel() + y.numel() * 8
        if size <= self.cache_bytes:
            while self._cached + size > self.cache_bytes and self._cache:
                _, (ox, oy) = self._cache.popitem(last=False)
                self._cached -= ox.numel() + oy.numel() * 8
            self._cache[sha] = (x, y)
            self._cached += size
        return x, y

    def _epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % 2**63  # torch takes 64 bits

    def groups(self, epoch: int) -> list[list[str]]:
        """The shards of ``epoch`` in visiting order, cut into groups of ``mix``."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self._epoch_seed(epoch)).shuffle(order)
        return [order[g : g + self.mix] for g in range(0, len(order), self.mix)]

    def steps_per_epoch(self) -> int:
        """An upper bound of the batches one epoch yields: batches are cut within each
        group of shards, so every group may end on a partial batch (this sizes a
        learning-rate schedule, which must not run out of steps)."""
        groups = math.ceil(len(self.shards) / self.mix)
        return max(1, math.ceil(self.items / self.batch_size) + groups)

    def group(self, epoch: int, g: int, shas: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Group ``g`` of ``epoch`` decoded: (N, 1, h, w) uint8 inputs and (N, L) labels,
        shuffled and augmented, in batch order. A function of (seed, epoch, g)."""
        parts = [self._load(sha) for sha in shas]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        group_seed = (self._epoch_seed(epoch) * 1_000_003 + g) % 2**63
        if self.shuffle:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(group_seed))
            x, y = x[idx], y[idx]
        if self.augment != "none":
            x = self._augment(x, (group_seed + 1) % 2**63)
        return x, y

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) batches for ``epoch``."""
        if self.workers > 0 or self.pin_memory:
            groups: Iterable[tuple[torch.Tensor, torch.Tensor]] = self._from_workers(epoch)
        else:
            groups = (self.group(epoch, g, shas) for g, shas in enumerate(self.groups(epoch)))
        for x, y in groups:
            for b in range(0, len(x), self.batch_size):
                yield x[b : b + self.batch_size], y[b : b + self.batch_size]

    def _from_workers(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._dl is None:
            self._dl_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
            extra: dict[str, Any] = {}
            if self.workers > 0:
                # fork: the workers inherit ``fetch`` (a closure) instead of pickling it.
                fork = "fork" in mp.get_all_start_methods()
                extra = {"persistent_workers": True, "prefetch_factor": 2,
                         "worker_init_fn": _loader_worker_init,
                         "multiprocessing_context": "fork" if fork else None}
            # batch_size=None: each item is a whole group, batched by ``epoch``. A
            # generator of its own: the DataLoader draws a seed from it at every
            # ``iter``, which from the global RNG would change the model's dropout.
            self._dl = DataLoader(_GroupStream(self, self._dl_epoch), batch_size=None,
                                  num_workers=self.workers, pin_memory=self.pin_memory,
                                  generator=torch.Generator().manual_seed(self.seed),
                                  **extra)
        assert self._dl_epoch is not None
        self._dl_epoch[0] = epoch
        with _children_allowed():
            batches = iter(self._dl)  # starts the worker processes on the first epoch
        yield from batches

    def close(self) -> None:
        """Stop the DataLoader worker processes, if any; the loader stays usable."""
        if self._dl is not None:
            it = getattr(self._dl, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._dl = None
