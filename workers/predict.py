"""Reading text from images with a stored model.

Weights load from safetensors, after the artifact's sha256 checked out: loading a
model never unpickles and never runs code from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from shared.artifacts import read_verified
from shared.db import session_scope
from shared.errors import ArtifactError, CaptrainError
from shared.images import load_rgb
from shared.records import find_model
from workers.data import decode_label, normalize, to_model_input
from workers.models import ModelConfig, build_model


@dataclass
class Predictor:
    model: nn.Module
    cfg: ModelConfig
    run_id: int

    @classmethod
    def load(cls, ref: str) -> Predictor:
        """Load the model named by ``ref`` (run id, dataset name or ``latest``).

        Raises NotFound, or ArtifactError if the weights fail their hash check.
        """
        with session_scope() as s:
            row = find_model(s, ref)
            blob = read_verified(s, row.weights_sha256)
            cfg = ModelConfig.from_dict(row.config)
            run_id = row.run_id
        model = build_model(cfg)
        try:
            model.load_state_dict(safetensors.torch.load(blob))
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise ArtifactError(f"model of run {run_id} does not load: {exc}") from exc
        model.eval()
        return cls(model, cfg, run_id)

    @torch.no_grad()
    def read(self, images: list[Image.Image]) -> list[tuple[str, float]]:
        """Return (text, confidence) per RGB image; confidence is the product of the
        per-position softmax maxima."""
        if not images:
            return []
        x = torch.stack([
            to_model_input(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
                           .permute(2, 0, 1), self.cfg)
            for im in images
        ])
        probs = self.model(normalize(x, self.cfg)).softmax(-1)  # (B, L, C)
        best, idx = probs.max(-1)
        return [(decode_label(i.tolist(), self.cfg.charset), float(p.prod()))
                for i, p in zip(idx, best, strict=True)]


def predict_files(predictor: Predictor, paths: list[Path]) -> list[dict[str, Any]]:
    """Read each file; a file that cannot be read gets an ``error`` entry instead."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            text, conf = predictor.read([load_rgb(path)])[0]
            out.append({"file": str(path), "text": text, "confidence": round(conf, 4)})
        except CaptrainError as exc:
            out.append({"file": str(path), "error": str(exc)})
    return out
