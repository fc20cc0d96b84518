"""Where training and prediction run, and what they turn on beyond the plain loop.

``pick_device`` chooses cuda, then mps, then cpu. ``Speedups`` says what a loop
turns on there: on CUDA bf16 autocast, channels_last memory, ``cudnn.benchmark``
and optionally ``torch.compile``; other devices run the plain fp32 loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shared.errors import ConfigError
from workers.codecs import normalize
from workers.models import ModelConfig


@dataclass(frozen=True)
class Speedups:
    """What the loop turns on beyond the plain path; recorded with each epoch's train
    metrics (as 0/1) and in the worker's log."""

    bf16: bool = False  # autocast to bfloat16 (CUDA): forward and loss
    channels_last: bool = False  # NHWC memory for the model and its inputs
    cudnn_benchmark: bool = False  # cuDNN picks the fastest kernels per input shape
    compiled: bool = False  # torch.compile of the model

    @classmethod
    def for_device(cls, device: torch.device, compile: bool = False) -> Speedups:
        """All of them on CUDA; on any other device only ``compile``, if asked."""
        cuda = device.type == "cuda"
        return cls(bf16=cuda, channels_last=cuda, cudnn_benchmark=cuda, compiled=compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, x: torch.Tensor, device: torch.device, cfg: ModelConfig) -> torch.Tensor:
        """uint8 batch -> normalized float on ``device``: the copy moves bytes, not floats."""
        x = normalize(x.to(device, non_blocking=True), cfg)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


PLAIN = Speedups()


def pick_device(want: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for ``auto``; raises ConfigError if ``want`` is absent."""
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but this worker has no CUDA GPU")
    if want == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but this worker has no MPS device")
    return torch.device(want)
