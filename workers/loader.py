"""From shard artifacts to model-ready batches, and the transforms that training and
prediction share (captcha images, digits, audio clips).

Shards stream from the artifact store one at a time. Decoded shards are kept in a
byte-bounded cache, so a dataset that fits is decoded once per run and a larger one
is re-streamed each epoch with flat memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from shared.errors import ArtifactError, InputError
from shared.images import load_rgb_bytes
from shared.shardfmt import unpack
from workers.audio import N_FFT, log_mel, read_wav
from workers.augment import FILL, Augment
from workers.models import PAD, ModelConfig


def encode_label(label: str, charset: str, length: int, min_length: int = 0) -> list[int]:
    """Map ``label`` to class indices, padded with PAD up to ``length``.

    ``min_length`` 0 means the label must be exactly ``length`` long. Raises ValueError
    for a wrong length or a character outside the charset.
    """
    shortest = min_length or length
    if not shortest <= len(label) <= length:
        want = f"{length}" if shortest == length else f"{shortest} to {length}"
        raise ValueError(f"label {label!r} is not {want} characters long")
    try:
        return [charset.index(c) for c in label] + [PAD] * (length - len(label))
    except ValueError as exc:
        raise ValueError(f"label {label!r} has a character outside the charset") from exc


def decode_label(indices: Sequence[int], charset: str) -> str:
    return "".join(charset[i] for i in indices if i != PAD)


# A binary 8-bit PGM header: "P5", width, height, maxval, one whitespace byte.
_PGM_HEADER = re.compile(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s")


def to_grey(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 RGB -> (1, H, W) uint8 grey, exactly as Pillow's ``convert("L")``:
    ITU-R 601-2 luma in 16-bit fixed point, rounded.

    Integer arithmetic gives the same bytes on every machine, and a grey image read
    back as RGB keeps its values, so a captcha stored grey by the generator and the
    same captcha read in colour give one model input.
    """
    r, g, b = rgb.to(torch.int32).unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)


def pil_grey(im: Image.Image) -> torch.Tensor:
    """A Pillow image -> (1, H, W) uint8 grey: Pillow's luma of its RGB, the same
    integers as :func:`to_grey`."""
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.uint8).copy())[None]


def to_model_input(image: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(3, H, W) uint8 RGB or (1, H, W) grey of any size -> (1, h, w) uint8 grey at
    the model's input size.

    The one transform that both training and prediction apply to captcha images.
    """
    grey = to_grey(image) if image.shape[-3] == 3 else image
    return TF.resize(grey, [cfg.in_height, cfg.in_width], antialias=True)


def read_pgm(data: bytes, name: str = "image") -> torch.Tensor:
    """Binary 8-bit PGM bytes (what the generator stores) -> (1, H, W) uint8.

    Raises InputError for bytes that are not one, or hold too few or too many pixels.
    """
    m = _PGM_HEADER.match(data)
    if m is None:
        raise InputError(f"{name}: not a binary PGM image")
    w, h, maxval = (int(v) for v in m.groups())
    if maxval != 255:
        raise InputError(f"{name}: PGM maxval {maxval}; only 8-bit (255) is read")
    body = len(data) - m.end()
    if w < 1 or h < 1 or body != w * h:
        raise InputError(f"{name}: PGM of {w}x{h} holds {body} pixel bytes")
    return torch.frombuffer(bytearray(data[m.end():]), dtype=torch.uint8).view(1, h, w)


def wav_to_model_input(data: bytes, cfg: ModelConfig, name: str = "clip") -> torch.Tensor:
    """WAV bytes -> (1, n_mels, frames) uint8 log-mel. Raises InputError."""
    samples, rate = read_wav(data, name)
    return log_mel(samples, rate, cfg.sample_rate, cfg.n_mels, cfg.hop, cfg.in_width,
                   cfg.n_fft or N_FFT)


def normalize(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """uint8 (B, 1, h, w) -> float, normalized as the model expects."""
    return (x.float() / 255.0 - cfg.mean) / cfg.std


def decode_item(data: bytes, cfg: ModelConfig, ext: str = "png") -> torch.Tensor:
    """One stored item (PGM/PNG/JPEG image or WAV clip, by ``ext``) -> (1, h, w)
    uint8 model input.

    Raises InputError for bytes that do not decode.
    """
    if cfg.modality == "audio":
        return wav_to_model_input(data, cfg)
    return to_model_input(_grey_item(data, ext), cfg)


def _grey_item(data: bytes, ext: str) -> torch.Tensor:
    """A stored image -> (1, H, W) uint8 grey at its own size.

    PNG and JPEG decode exactly as prediction reads a user's file
    (:func:`shared.images.load_rgb_bytes`: alpha on white, EXIF rotation, wide grey
    stretched), so that an imported dataset trains on what ``predict`` will see.
    """
    if ext == "pgm":
        return read_pgm(data)
    return pil_grey(load_rgb_bytes(data))


def _to_input_size(greys: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """(1, H, W) greys of any sizes -> (N, 1, h, w), resized one batch per size: the
    same pixels as one resize per image, at a fifth of the time for a shard."""
    size = [cfg.in_height, cfg.in_width]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(greys):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    if len(by_shape) == 1:
        return TF.resize(torch.stack(greys), size, antialias=True)
    out = torch.empty(len(greys), 1, *size, dtype=torch.uint8)
    for idx in by_shape.values():
        out[idx] = TF.resize(torch.stack([greys[i] for i in idx]), size, antialias=True)
    return out


def decode_shard(data: bytes, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a shard into (N, 1, h, w) uint8 inputs and (N, L) int64 labels.

    Raises ArtifactError for a malformed shard, an undecodable item or a bad label.
    """
    _, items = unpack(data)
    inputs, labels = [], []
    for it in items:
        try:
            if cfg.modality == "audio":
                inputs.append(wav_to_model_input(it.data, cfg))
            else:
                inputs.append(_grey_item(it.data, it.ext))  # resized together below
            labels.append(encode_label(it.label, cfg.charset, cfg.length, cfg.min_length))
        except (RuntimeError, ValueError, InputError) as exc:
            raise ArtifactError(f"shard item {it.index} cannot be used: {exc}") from exc
    if not inputs:
        return (torch.empty(0, 1, cfg.in_height, cfg.in_width, dtype=torch.uint8),
                torch.empty(0, cfg.length, dtype=torch.int64))
    x = torch.stack(inputs) if cfg.modality == "audio" else _to_input_size(inputs, cfg)
    return x, torch.tensor(labels, dtype=torch.int64)


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
    a CUDA device.
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

    def __post_init__(self) -> None:
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached = 0
        # MNIST-style inputs are white on black; captchas dark on a light background.
        self._augment = Augment(self.augment, self.cfg.modality,
                                fill=0 if self.cfg.preprocess == "mnist" else FILL)
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
