"""The graphs an export writes: a stored model wrapped so that a reader outside
captrain feeds it plain grey pixels, and the one call that turns a wrapper into ONNX.

- ``ScoresGraph`` (format ``onnx``): x/255 at the model's input size, normalized in
  the graph, out come the model's own scores.
- ``DdddocrGraph`` (format ``ddddocr``): x/255 at the dataset's image size; the graph
  does captrain's resize itself (``FixedPointResize``, exactly), normalizes, and
  gives scores that ddddocr's greedy CTC reading turns into captrain's text.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from shared.errors import ArtifactError
from workers.models import LeNet, ModelConfig

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "scores"
# A log-probability no class reaches: exp(-1e4) is 0 in float32, yet finite, so
# argmax and softmax over a step that holds it stay well defined.
NEVER = -1e4
# Bits of precision torch's uint8 resize gives its int16 weights at most (ATen's
# _compute_index_ranges_int16_weights).
MAX_WEIGHT_BITS = 22


def logits(model: nn.Module, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, written so that the batch stays a dynamic axis when traced.

    LeNet's forward reshapes with ``len(x)``, which both torch exporters record as a
    constant (the TorchScript tracer as a Python int, torch.export by specializing),
    so its head is reshaped here with -1 instead. Export verification runs the stored
    model's own forward at two batch sizes, so this cannot drift from it unseen.
    """
    if isinstance(model, LeNet):
        flat = model.classifier(model.features(x).flatten(1))  # (B, L*C)
        return flat.unflatten(1, (cfg.length, len(cfg.charset)))  # (B, L, C)
    return model(x)


class ScoresGraph(nn.Module):
    """(N, 1, H, W) grey x/255 at the model's input size -> the model's scores:
    (N, L, C) for a fixed-length model, (N, T, C + 1) for CTC with blank 0."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same float32 arithmetic as workers.codecs.normalize.
        return logits(self.model, self.cfg, (x - self.cfg.mean) / self.cfg.std)


def resize_weights(n_in: int, n_out: int) -> tuple[torch.Tensor, int]:
    """The (n_out, n_in) integer weights and their precision in bits that torch's
    antialiased bilinear resize of uint8 uses along one axis.

    The float weights come from torchvision itself, resizing the rows of an identity
    matrix in float64 (the resize is separable, so each axis is a linear map); they
    are then quantized as ATen does for uint8 (the largest precision at which the
    largest weight still fits int16 twice over, rounded half away from zero).
    """
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]  # (n_in, 1, n_in)
    w = TF.resize(eye, [1, n_out], antialias=True)[:, 0, :].T  # (n_out, n_in)
    top = float(w.max())
    bits = 0
    while bits < MAX_WEIGHT_BITS and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = w * (1 << bits)
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc(), bits


class FixedPointResize(nn.Module):
    """(N, 1, H0, W0) grey x/255 -> (N, 1, H, W) x/255: the pixels
    ``TF.resize(uint8, [H, W], antialias=True)`` gives, which training and predict
    read (workers.codecs.to_model_input).

    torch resizes uint8 in two passes, width then height, each a fixed-point sum of
    int16 weights rounded half up and clamped to 0..255. The same integer
    arithmetic here runs in float64 matrix products, where every sum is exact.
    """

    qw_t: torch.Tensor  # (W0, W) integer weights along the width, transposed
    qh: torch.Tensor  # (H, H0) integer weights along the height

    def __init__(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        super().__init__()
        (h0, w0), (h, w) = src, dst
        self.along_w, self.along_h = w != w0, h != h0
        qw, bw = resize_weights(w0, w)
        qh, bh = resize_weights(h0, h)
        self.register_buffer("qw_t", qw.T.contiguous())  # (W0, W)
        self.register_buffer("qh", qh)  # (H, H0)
        self.bw, self.bh = float(1 << bw), float(1 << bh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.floor(x.double() * 255.0 + 0.5)  # the grey bytes back, exactly
        if self.along_w:  # (N, 1, H0, W0) @ (W0, W)
            p = torch.clamp(torch.floor((p @ self.qw_t + self.bw / 2) / self.bw), 0, 255)
        if self.along_h:  # (H, H0) @ (N, 1, H0, W)
            p = torch.clamp(torch.floor((self.qh @ p + self.bh / 2) / self.bh), 0, 255)
        return p.float() / 255.0  # as workers.codecs.normalize divides uint8


class DdddocrGraph(nn.Module):
    """(N, 1, H0, W0) grey x/255 at the dataset's image size -> (N, S, C + 1)
    log-probabilities over ``["", *charset]`` that ddddocr's greedy CTC reading
    (argmax per step, repeats collapsed, index 0 dropped) reads as captrain reads
    the model's own output.

    Fixed length: 2L steps, each position's classes shifted up by one and followed
    by a step where the blank wins, so that "0010" keeps both zeros. CTC: the
    model's steps as they are, except that steps from the (length + 1)-th emitted
    character on become blanks, as captrain's greedy keeps ``length`` characters.
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.resize = FixedPointResize((cfg.image_height, cfg.image_width),
                                       (cfg.in_height, cfg.in_width))
        self.scores = ScoresGraph(model, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = self.scores(self.resize(x)).log_softmax(-1)
        # Columns built by arithmetic on logp, not full_like: the tracer may fold a
        # shape it inferred statically (LeNet's) into a constant, losing the batch.
        zero = logp[..., :1] * 0  # (N, S, 1)
        if self.cfg.ctc:
            return self._capped(logp, zero)
        chars = torch.cat([zero + NEVER, logp], -1)  # (N, L, C+1)
        blank = torch.cat([zero, logp * 0 + NEVER], -1)
        return torch.stack([chars, blank], 2).flatten(1, 2)  # (N, 2L, C+1)

    def _capped(self, logp: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        idx = logp.argmax(-1)  # (N, T)
        prev = torch.cat([idx[:, :1] * 0, idx[:, :-1]], 1)  # blank before the first
        emits = ((idx != 0) & (idx != prev)).long().cumsum(1)  # (N, T)
        blank = torch.cat([zero, logp[..., 1:] * 0 + NEVER], -1)
        return torch.where((emits <= self.cfg.length).unsqueeze(-1), logp, blank)


def export_graph(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``graph`` to ``path`` as ONNX (opset OPSET): one input ``image`` and one
    output ``scores``, both with a dynamic batch axis. Raises ArtifactError.

    The TorchScript exporter (``dynamo=False``): the dynamo exporter takes 5-20x as
    long here, needs onnxscript, and by pytorch#191855 hard-codes the time length of
    a bidirectional GRU (the crnn's). The tracer's warnings about it are expected:
    every export is checked against torch at two batch sizes before it is kept.
    """
    graph.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
    except Exception as exc:  # the exporter raises many unrelated classes
        raise ArtifactError(f"torch cannot export the model to ONNX: {exc}") from exc
