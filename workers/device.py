"""Where training and prediction run, and what they turn on beyond the plain loop.

``pick_device`` chooses cuda, then mps, then cpu. ``Speedups.for_device`` says what a
loop turns on there, per machine: bf16 autocast with channels_last memory on CUDA
and on CPUs with bf16 arithmetic in hardware (AMX or AVX512-BF16), where it is
several times faster than fp32; ``cudnn.benchmark`` on CUDA; ``torch.compile`` when
asked. A CPU without bf16 instructions emulates it, several times slower than fp32,
so there it runs the plain fp32 loop.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shared.errors import ConfigError
from workers.codecs import normalize
from workers.models import ModelConfig


@dataclass(frozen=True)
class Speedups:
    """What the loop turns on beyond the plain path; recorded with each epoch's train
    metrics (as 0/1) and in the worker's log."""

    bf16: bool = False  # autocast to bfloat16: the forward pass (the loss stays fp32)
    channels_last: bool = False  # NHWC memory for the model and its inputs
    cudnn_benchmark: bool = False  # cuDNN picks the fastest kernels per input shape
    compiled: bool = False  # torch.compile of the model

    @classmethod
    def for_device(cls, device: torch.device, compile: bool = False,
                   precision: str = "auto") -> Speedups:
        """The speedups for ``device``. ``precision`` ``auto`` takes bf16 where the
        hardware computes it (CUDA, or a CPU with AMX or AVX512-BF16); ``fp32`` and
        ``bf16`` force it (bf16 on a CPU without it is emulated: slow, but it runs).
        MPS runs fp32. ``compile`` adds ``torch.compile`` on any device."""
        cuda = device.type == "cuda"
        if device.type == "mps" or precision == "fp32":
            bf16 = False
        elif precision == "bf16":
            bf16 = True
        else:
            bf16 = cuda or (device.type == "cpu" and cpu_has_bf16())
        return cls(bf16=bf16, channels_last=cuda or bf16, cudnn_benchmark=cuda,
                   compiled=compile)

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
# /proc/cpuinfo flags of bf16 arithmetic in hardware: AMX tiles, or AVX512 BF16.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16), read from
    the kernel's CPU flags; False where they cannot be read (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and BF16_FLAGS & set(line.split())
               for line in text.splitlines())


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
