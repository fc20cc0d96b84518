"""Accuracy presets: the dataset and training configs behind the accuracy targets.

``captrain train --preset digits4`` fills in the model, epochs, learning rate, batch
size, augmentation and scale; an option given on the command line still wins. The
generate side (count, length, charset, size) is what the preset was measured with:
``bench/accuracy.py`` generates it, trains with the preset and reads a held-out set
drawn by the plain ``captcha`` package. BENCHMARKS.md says what each one reached
and on what machine, or that it has not been measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import SpecError


@dataclass(frozen=True)
class Preset:
    name: str
    target: float  # whole-sequence accuracy it is meant to reach
    # generate
    count: int
    length: int
    charset: str
    # train
    model: str
    epochs: int
    lr: float
    batch_size: int
    augment: str
    scale: float
    width: int = 160
    height: int = 60
    shard_size: int = 1000

    def generate_values(self) -> dict[str, Any]:
        """GenerateSpec fields (all but the name and seed)."""
        return {"count": self.count, "length": self.length, "charset": self.charset,
                "width": self.width, "height": self.height, "shard_size": self.shard_size}

    def train_values(self) -> dict[str, Any]:
        """TrainSpec fields (all but the dataset), ``preset`` included."""
        return {"model": self.model, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "augment": self.augment,
                "scale": self.scale, "preset": self.name}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # 4 digits at 160x60, read at 80x30 by the multi-head CNN (figures: BENCHMARKS.md).
    Preset("digits4", 0.995, count=100_000, length=4, charset="digits",
           model="multihead", epochs=10, lr=3e-3, batch_size=64, augment="none",
           scale=0.5),
    # 4 of 36 characters: CTC over a bidirectional GRU, as captcha_break's, at 120x45
    # so that letters keep their strokes (figures: BENCHMARKS.md).
    Preset("digits-upper4", 0.996, count=300_000, length=4, charset="digits-upper",
           model="crnn", epochs=30, lr=2e-3, batch_size=128, augment="light",
           scale=0.75),
)}


def get(name: str) -> Preset:
    """The preset called ``name``. Raises SpecError naming the ones there are."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SpecError(f"no preset {name!r}: choose from {', '.join(PRESETS)}") from None


def apply(name: str, values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``values`` with preset ``name`` filled in, except the keys in ``given`` (options
    the user typed). Raises SpecError for an unknown preset."""
    return {**values, **{k: v for k, v in get(name).train_values().items()
                         if k not in given}}
