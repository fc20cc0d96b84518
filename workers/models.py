"""The networks. One ``nn.Module`` per concept, configured by a dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it images; stored beside weights."""

    charset: str
    length: int
    in_height: int  # model input, after scaling the dataset's images
    in_width: int
    image_height: int  # the dataset's image size, for reference
    image_width: int
    arch: str = "multihead"
    channels: int = 32
    dropout: float = 0.3
    mean: float = 0.5  # normalization of grey pixels in [0, 1]
    std: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class MultiHeadCNN(nn.Module):
    """A shared convolutional trunk with one softmax head per character position.

    All heads train jointly on the sum of their cross-entropies: the multi-task
    approach of the captcha notes, without a recurrent decoder.
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


def build_model(cfg: ModelConfig) -> nn.Module:
    """Return a freshly initialised model for ``cfg.arch``."""
    if cfg.arch == "multihead":
        return MultiHeadCNN(cfg)
    raise ValueError(f"unknown model {cfg.arch!r}")
