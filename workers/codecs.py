"""Input codecs: stored items and users' files to the model's input, and labels to
class indices. Training, prediction and reports share them, so a model reads at
predict time exactly what it trained on.

Every model reads (B, 1, H, W) uint8: grey captchas and digits at the model's input
size, or a WAV clip as a log-mel spectrogram quantized to uint8. ``model_config``
says, for a dataset and a train spec, what that input and the output are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from shared.errors import ArtifactError, InputError
from shared.images import load_rgb_bytes
from shared.kinds import image_input_size, kind_of
from shared.schema import Dataset
from shared.shardfmt import unpack
from shared.spec import CTC_MODELS, TrainSpec
from workers.audio import N_FFT, clip_frames, log_mel, read_wav
from workers.models import PAD, ModelConfig

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
    kind = kind_of(dataset.kind)
    common: dict[str, Any] = {
        "charset": dataset.charset, "length": dataset.length, "arch": spec.model,
        "min_length": dataset.meta.get("min_length") or 0, "augment": spec.augment,
    }
    if kind.modality == "audio":
        rate = int(dataset.meta.get("sample_rate", 8000))
        trunk = "1d" if spec.model in CTC_MODELS else "2d"
        return ModelConfig(
            **common, in_height=AUDIO_MELS,
            in_width=clip_frames(dataset.length, rate, AUDIO_HOP),
            image_height=0, image_width=0, modality="audio", sample_rate=rate,
            n_mels=AUDIO_MELS, hop=AUDIO_HOP, n_fft=2 * AUDIO_HOP,
            channels=spec.channels or AUDIO_CHANNELS[trunk], time_pool=AUDIO_TIME_POOL,
            trunk=trunk,
        )
    in_height, in_width = image_input_size(dataset.kind, dataset.height, dataset.width,
                                           spec.scale)
    if spec.channels:
        common["channels"] = spec.channels
    return ModelConfig(
        **common, in_height=in_height, in_width=in_width,
        image_height=dataset.height, image_width=dataset.width, preprocess=kind.preprocess,
    )


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


