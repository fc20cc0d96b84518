"""From shard artifacts to model-ready batches, and the transforms that training and
prediction share (captcha images, digits, audio clips).

Shards stream from the artifact store one at a time. Decoded shards are kept in a
byte-bounded cache, so a dataset that fits is decoded once per run and a larger one
is re-streamed each epoch with flat memory.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from shared.errors import ArtifactError, InputError
from shared.shardfmt import unpack
from workers.audio import log_mel, read_wav
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


def to_model_input(rgb: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(3, H, W) uint8 RGB of any size -> (1, h, w) uint8 grey at the model's input size.

    The one transform that both training and prediction apply to captcha images.
    """
    grey = TF.rgb_to_grayscale(rgb)
    return TF.resize(grey, [cfg.in_height, cfg.in_width], antialias=True)


def wav_to_model_input(data: bytes, cfg: ModelConfig, name: str = "clip") -> torch.Tensor:
    """WAV bytes -> (1, n_mels, frames) uint8 log-mel. Raises InputError."""
    samples, rate = read_wav(data, name)
    return log_mel(samples, rate, cfg.sample_rate, cfg.n_mels, cfg.hop, cfg.in_width)


def normalize(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """uint8 (B, 1, h, w) -> float, normalized as the model expects."""
    return (x.float() / 255.0 - cfg.mean) / cfg.std


def decode_item(data: bytes, cfg: ModelConfig) -> torch.Tensor:
    """One stored item (PNG/JPEG image or WAV clip) -> (1, h, w) uint8 model input.

    Raises RuntimeError or InputError for bytes that do not decode.
    """
    if cfg.modality == "audio":
        return wav_to_model_input(data, cfg)
    rgb = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                       mode=ImageReadMode.RGB)
    return to_model_input(rgb, cfg)


def decode_shard(data: bytes, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a shard into (N, 1, h, w) uint8 inputs and (N, L) int64 labels.

    Raises ArtifactError for a malformed shard, an undecodable item or a bad label.
    """
    _, items = unpack(data)
    inputs, labels = [], []
    for it in items:
        try:
            inputs.append(decode_item(it.data, cfg))
            labels.append(encode_label(it.label, cfg.charset, cfg.length, cfg.min_length))
        except (RuntimeError, ValueError, InputError) as exc:
            raise ArtifactError(f"shard item {it.index} cannot be used: {exc}") from exc
    if not inputs:
        return (torch.empty(0, 1, cfg.in_height, cfg.in_width, dtype=torch.uint8),
                torch.empty(0, cfg.length, dtype=torch.int64))
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64)


@dataclass
class ShardLoader:
    """Batches over a list of shard artifacts.

    ``fetch(sha256)`` returns a shard's verified bytes. Each epoch visits the shards
    in a seeded order and shuffles items within groups of ``mix`` shards, so the order
    is a function of (seed, epoch) and a resumed run sees the same batches.
    """

    shards: list[str]
    fetch: Callable[[str], bytes]
    cfg: ModelConfig
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    mix: int = 8
    cache_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached = 0

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

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) batches for ``epoch``."""
        order = list(self.shards)
        epoch_seed = (self.seed * 1_000_003 + epoch) % 2**63  # torch takes 64 bits
        gen = torch.Generator().manual_seed(epoch_seed)
        if self.shuffle:
            random.Random(epoch_seed).shuffle(order)
        for g in range(0, len(order), self.mix):
            parts = [self._load(sha) for sha in order[g : g + self.mix]]
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            idx = torch.randperm(len(x), generator=gen) if self.shuffle else torch.arange(len(x))
            for b in range(0, len(idx), self.batch_size):
                sel = idx[b : b + self.batch_size]
                yield x[sel], y[sel]
