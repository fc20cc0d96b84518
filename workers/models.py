"""The networks, and how their outputs read as text.

One ``nn.Module`` per concept, configured by a dataclass. Every model takes
(B, 1, H, W) normalized grey input: a scaled captcha, a 28×28 digit, or a log-mel
spectrogram (mel bands × frames) for audio. Two output shapes exist:

- fixed length (``multihead``, ``cnn``, ``lenet``): (B, L, C), one softmax per position;
- CTC (``crnn``): (B, T, C + 1) over time steps, class 0 the blank, any length up to T.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.spec import CTC_MODELS

PAD = -1  # label padding past a shorter text's end


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it inputs; stored beside weights."""

    charset: str
    length: int  # the longest text; fixed-length models read exactly this many
    in_height: int  # model input, after scaling the dataset's images
    in_width: int
    image_height: int  # the dataset's image size, for reference
    image_width: int
    arch: str = "multihead"
    channels: int = 32
    dropout: float = 0.3
    mean: float = 0.5  # normalization of grey pixels in [0, 1]
    std: float = 0.5
    min_length: int = 0  # shortest text; 0 means ``length`` (fixed)
    modality: str = "image"  # image | audio
    # How a user's own image becomes model input: "resize" (captchas) or "mnist"
    # (invert, crop to the ink, fit in 20×20, centre by mass in 28×28).
    preprocess: str = "resize"
    sample_rate: int = 8000  # audio: Hz
    n_mels: int = 0  # audio: mel bands (the input height)
    hop: int = 0  # audio: samples per frame
    n_fft: int = 0  # audio: STFT window, samples
    augment: str = "none"  # training-time augmentation preset (workers.augment)
    # crnn: input columns per CTC time step (4, 8 or 16). Long audio needs coarser
    # steps: CTC over hundreds of steps for 4 characters sits on all-blank for long.
    time_pool: int = 4
    # crnn: "2d" convolves the input as an image; "1d" (audio) reads each frame's mel
    # bands as channels and convolves along time only (see CRNN).
    trunk: str = "2d"

    @property
    def ctc(self) -> bool:
        return self.arch in CTC_MODELS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def conv_block(c_in: int, c_out: int, pool: tuple[int, int] = (2, 2)) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(pool),
    )


class MultiHeadCNN(nn.Module):
    """A shared convolutional trunk with one softmax head per character position.

    All heads train jointly on the sum of their cross-entropies: the multi-task
    approach of the captcha notes, without a recurrent decoder. With one position it
    is a plain CNN classifier (``cnn``, for digits).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.trunk = nn.Sequential(
            conv_block(1, c), conv_block(c, 2 * c), conv_block(2 * c, 4 * c),
            conv_block(4 * c, 4 * c),
        )
        with torch.no_grad():
            n_feat = self.trunk(torch.zeros(1, 1, cfg.in_height, cfg.in_width)).numel()
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleList(nn.Linear(n_feat, len(cfg.charset)) for _ in range(cfg.length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, H, W) normalized grey
        feat = self.dropout(self.trunk(x).flatten(1))  # (B, F)
        return torch.stack([head(feat) for head in self.heads], dim=1)  # (B, L, C)


class LeNet(nn.Module):
    """LeNet-5 as LeCun et al. (1998) drew it for 28×28 digits, with ReLU and max-pool."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n_feat = self.features(torch.zeros(1, 1, cfg.in_height, cfg.in_width)).numel()
        self.classifier = nn.Sequential(
            nn.Linear(n_feat, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, cfg.length * len(cfg.charset)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x).flatten(1))  # (B, L*C)
        return logits.view(len(x), self.cfg.length, len(self.cfg.charset))  # (B, L, C)


def conv1d_block(c_in: int, c_out: int, kernel: int, pool: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool1d(pool) if pool > 1 else nn.Identity(),
    )


class CRNN(nn.Module):
    """Convolutions, a bidirectional GRU along the width, and a CTC output per column.

    The ``2d`` trunk (images) halves the height four times but the width only twice
    (``time_pool`` 4), so an 80 px wide input gives 20 time steps: room for texts of
    any length up to about half that.

    The ``1d`` trunk (audio) treats a spectrogram's mel bands as the channels of one
    frame and convolves along time only. A spoken digit is a pattern across all
    bands at once, so nothing is lost, and the activations are a fraction of the 2d
    trunk's (its speed and accuracy against the 2d trunk: BENCHMARKS.md).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        if cfg.trunk == "1d":
            p1 = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 4, 2)}[cfg.time_pool]
            self.trunk = nn.Sequential(
                conv1d_block(cfg.in_height, c, 5, p1[0]), conv1d_block(c, 2 * c, 5, p1[1]),
                conv1d_block(2 * c, 2 * c, 3, p1[2]),
            )
            hidden = 2 * c  # the trunk's own width: no projection before the GRU
            self.proj: nn.Linear | None = None
        else:
            pools = {4: (2, 2, 1, 1), 8: (2, 2, 2, 1), 16: (2, 2, 2, 2)}[cfg.time_pool]
            self.trunk = nn.Sequential(
                conv_block(1, c, (2, pools[0])), conv_block(c, 2 * c, (2, pools[1])),
                conv_block(2 * c, 4 * c, (2, pools[2])),
                conv_block(4 * c, 4 * c, (2, pools[3])),
            )
            with torch.no_grad():
                _, ch, h, _ = self.trunk(torch.zeros(1, 1, cfg.in_height, cfg.in_width)).shape
            hidden = 4 * c
            self.proj = nn.Linear(ch * h, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(2 * hidden, len(cfg.charset) + 1)  # + the blank, index 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            # Already non-negative (ReLU, then max-pool) and as wide as the GRU.
            f = self.trunk(x[:, 0]).transpose(1, 2)  # (B, n_mels, W) -> (B, T, 2c)
        else:
            f = self.trunk(x)  # (B, ch, h, T)
            f = torch.relu(self.proj(f.permute(0, 3, 1, 2).flatten(2)))  # (B, T, hidden)
        seq, _ = self.rnn(f)  # (B, T, 2*hidden)
        return self.out(self.dropout(seq))  # (B, T, C+1)


# The network of each image model name (shared.spec.IMAGE_MODELS).
NETWORKS: dict[str, type[nn.Module]] = {
    "multihead": MultiHeadCNN, "cnn": MultiHeadCNN, "lenet": LeNet, "crnn": CRNN}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Return a freshly initialised model for ``cfg.arch``. Raises ValueError."""
    network = NETWORKS.get(cfg.arch)
    if network is None:
        raise ValueError(f"unknown model {cfg.arch!r}")
    return network(cfg)


def time_steps(cfg: ModelConfig) -> int:
    """How many CTC time steps a ``crnn`` gives for ``cfg``'s input width."""
    width = cfg.in_width
    for _ in range(cfg.time_pool.bit_length() - 1):
        width //= 2
    return width


@torch.no_grad()
def greedy(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Read model output as class indices, on the logits' device.

    Returns (B, L) indices into ``cfg.charset``, padded with PAD past a shorter text,
    and (B,) confidences: the product of the chosen classes' probabilities. For CTC
    that is the product over the best path's emitting steps, times its least sure
    other step, so that a doubtful blank (a character perhaps missed) counts too.
    """
    best, idx = logits.float().softmax(-1).max(-1)  # (B, L) or (B, T)
    if not cfg.ctc:
        return idx, best.prod(-1)
    # Greedy CTC: collapse repeats, then drop blanks; at most ``length`` characters.
    # Vectorized, so that training on a GPU never waits for the host.
    prev = F.pad(idx[:, :-1], (1, 0), value=0)  # (B, T): the step before; blank first
    new = (idx != 0) & (idx != prev)
    slot = new.long().cumsum(1) - 1  # (B, T): output position of each new character
    emit = new & (slot < cfg.length)
    out = torch.full((len(idx), cfg.length + 1), PAD, dtype=torch.long, device=idx.device)
    # Steps that emit nothing write into the extra last column, dropped below.
    out.scatter_(1, torch.where(emit, slot, cfg.length), torch.where(emit, idx - 1, PAD))
    conf = (torch.where(emit, best, 1.0).prod(1)
            * torch.where(emit, 1.0, best).min(1).values.clamp(max=1.0))
    return out[:, : cfg.length], conf


def decode(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``greedy`` on the CPU: (B, L) indices (PAD past a shorter text), (B,) confidences."""
    idx, conf = greedy(logits, cfg)
    return idx.cpu(), conf.cpu()
