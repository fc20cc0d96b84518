"""Reading text from images and audio clips with a stored model.

Weights load from safetensors, after the artifact's sha256 checked out: loading a
model never unpickles and never runs code from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from shared.artifacts import read_verified
from shared.db import session_scope
from shared.errors import ArtifactError, CaptrainError, InputError
from shared.images import load_rgb
from shared.registry import resolve
from shared.shardfmt import Item
from shared.spec import TABULAR_MODELS
from workers.codecs import (
    decode_item,
    decode_label,
    pil_grey,
    to_model_input,
    wav_to_model_input,
)
from workers.device import Speedups
from workers.digits import mnist_input
from workers.models import ModelConfig, build_model, decode

MAX_CLIP_BYTES = 64 * 1024 * 1024
CPU = torch.device("cpu")


@dataclass
class Predictor:
    model: nn.Module
    cfg: ModelConfig
    run_id: int
    name: str | None = None  # the registry's name and version of the model
    version: int | None = None
    # What training turns on for this CPU (workers.device): bf16 where the hardware
    # computes it. bf16 reads as well as fp32 (tests/test_models.py); a borderline
    # image may read differently, so compare an fp32 export with --precision fp32.
    fast: Speedups = field(default_factory=lambda: Speedups.for_device(CPU))

    def __post_init__(self) -> None:
        if self.fast.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, ref: str, precision: str = "auto") -> Predictor:
        """Load the model version ``ref`` names: NAME, NAME@VERSION, NAME@ALIAS, a run
        id or ``latest`` (shared.registry), to read with ``precision`` (auto: bf16
        where this CPU computes it, as training does; fp32: the exact arithmetic of an
        ONNX export).

        Raises SpecError for a malformed ref, NotFound; InputError for a model that
        does not read images or audio (Iris); ArtifactError if the weights fail their
        hash check or do not load.
        """
        with session_scope() as s:
            row = resolve(s, ref)
            if row.config.get("arch") in TABULAR_MODELS:
                raise InputError(f"the model of run {row.run_id} classifies Iris rows; "
                                 "predict reads images and audio clips")
            blob = read_verified(s, row.weights_sha256)
            cfg = ModelConfig.from_dict(row.config)
            run_id, name, version = row.run_id, row.name, row.version
        model = build_model(cfg)
        try:
            model.load_state_dict(safetensors.torch.load(blob))
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise ArtifactError(f"model of run {run_id} does not load: {exc}") from exc
        model.eval()
        return cls(model, cfg, run_id, name, version,
                   Speedups.for_device(CPU, precision=precision))

    def _image_input(self, im: Image.Image, name: str) -> torch.Tensor:
        # A user's digit photo becomes a 28x28 MNIST digit first; then both kinds are
        # resized to the model's input as training resized its stored images.
        grey = (torch.from_numpy(mnist_input(im, name))[None] if self.cfg.preprocess == "mnist"
                else pil_grey(im))
        return to_model_input(grey, self.cfg)

    @torch.no_grad()
    def _read(self, x: torch.Tensor) -> list[tuple[str, float]]:
        with self.fast.autocast(CPU):
            logits = self.model(self.fast.inputs(x, CPU, self.cfg))
        idx, conf = decode(logits.float(), self.cfg)
        return [(decode_label(i.tolist(), self.cfg.charset), float(c))
                for i, c in zip(idx, conf, strict=True)]

    def read(self, images: list[Image.Image]) -> list[tuple[str, float]]:
        """Return (text, confidence) per image; confidence is the product of the chosen
        characters' probabilities. Raises InputError for a model that reads audio, or
        a digit image with no ink."""
        if self.cfg.modality != "image":
            raise InputError(f"the model of run {self.run_id} reads audio clips, not images")
        if not images:
            return []
        return self._read(torch.stack([self._image_input(im, "image") for im in images]))

    def read_clips(self, clips: list[bytes]) -> list[tuple[str, float]]:
        """Return (text, confidence) per WAV clip. Raises InputError for a model that
        reads images, or bytes that are not a PCM WAV."""
        if self.cfg.modality != "audio":
            raise InputError(f"the model of run {self.run_id} reads images, not audio clips")
        if not clips:
            return []
        return self._read(torch.stack([wav_to_model_input(c, self.cfg) for c in clips]))

    def read_items(self, items: list[Item]) -> list[tuple[str, float]]:
        """Read shard items (the bytes a dataset stores), decoded as training decoded
        them: a stored MNIST digit is already one, not a photo to prepare.

        Raises ArtifactError for an item that does not decode.
        """
        if not items:
            return []
        inputs = []
        for it in items:
            try:
                inputs.append(decode_item(it.data, self.cfg, it.ext))
            except InputError as exc:
                raise ArtifactError(f"shard item {it.index} cannot be used: {exc}") from exc
        return self._read(torch.stack(inputs))

    def read_file(self, path: Path) -> tuple[str, float]:
        """Read one image or WAV file, by the model's kind. Raises InputError."""
        if self.cfg.modality != "audio":
            im = load_rgb(path)
            return self._read(self._image_input(im, str(path))[None])[0]
        try:
            size = path.stat().st_size
            if size > MAX_CLIP_BYTES:
                raise InputError(f"{path}: {size} bytes is beyond the clip size limit")
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise InputError(f"{path}: no such file") from exc
        except IsADirectoryError as exc:
            raise InputError(f"{path}: is a directory") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc})") from exc
        return self._read(wav_to_model_input(data, self.cfg, str(path))[None])[0]


def predict_files(predictor: Predictor, paths: list[Path]) -> list[dict[str, Any]]:
    """Read each file; a file that cannot be read gets an ``error`` entry instead."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            text, conf = predictor.read_file(path)
            out.append({"file": str(path), "text": text, "confidence": round(conf, 4)})
        except CaptrainError as exc:
            out.append({"file": str(path), "error": str(exc)})
    return out
