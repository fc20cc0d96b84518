"""Format ``onnx``: ``model.onnx`` and its contract ``captrain.json``, enough for any
onnxruntime user in any language (README "Export"; ``captrain serve`` reads it).

The graph takes grey x/255 at the model's input size and normalizes itself; it gives
the model's scores as torch does. The sidecar says how an image becomes that input
and how the scores become text.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.codecs import decode_label
from workers.export.check import compare_scores, open_session
from workers.export.graphs import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    ScoresGraph,
    export_graph,
)
from workers.export.quantize import CALIBRATION_ITEMS, EVAL_ITEMS, gate, quantize_int8
from workers.export.source import StoredModel, dataset_inputs, dataset_items, model_inputs
from workers.models import ModelConfig, decode, time_steps

MODEL_FILE = "model.onnx"
META_FILE = "captrain.json"
FORMAT, FORMAT_VERSION = "captrain-onnx", 1
CHECK_ITEMS = 32  # stored items run through both torch and onnxruntime


def write_onnx(stored: StoredModel, folder: Path, say: Callable[[str], None],
               quantize: str = "none") -> dict[str, Any]:
    """Write ``model.onnx`` and ``captrain.json`` into ``folder`` and check the graph
    against torch on stored items of the model's dataset; with ``quantize`` "int8",
    then quantize it and keep that only if it passes quantize.gate.

    Returns the verification figures (those of the fp32 graph, and under
    ``quantization`` the int8 graph's). Raises ArtifactError when the graph does not
    export, does not read as torch does, or loses accuracy in int8; StateError
    without stored items.
    """
    cfg = stored.cfg
    graph = ScoresGraph(stored.model, cfg)
    say("exporting the graph")
    path = folder / MODEL_FILE
    export_graph(graph, torch.zeros(2, 1, cfg.in_height, cfg.in_width), path)
    say("checking onnxruntime against torch")
    x = dataset_inputs(stored, CHECK_ITEMS).float() / 255.0
    verification = compare_scores(open_session(path), graph, x)
    if quantize == "int8":
        verification["quantization"] = _quantized(stored, path, say)
    meta = sidecar(stored, verification)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return verification


def _quantized(stored: StoredModel, path: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Quantize the checked graph at ``path`` in place, after it read the test items
    as well as fp32 (quantize.gate); its figures."""
    say("quantizing to int8, calibrated on training items")
    calibration = model_inputs(stored, dataset_items(stored, CALIBRATION_ITEMS, "train"))
    int8 = path.with_name("model.int8.onnx")
    quantize_int8(path, int8, (calibration.float() / 255.0).numpy())
    say("reading held-out items in fp32 and in int8")
    held = dataset_items(stored, EVAL_ITEMS, "test")
    x = (model_inputs(stored, held).float() / 255.0).numpy()

    def read(graph_path: Path) -> list[str]:
        session = open_session(graph_path)
        scores = np.concatenate([session.run(None, {INPUT_NAME: x[i:i + 64]})[0]
                                 for i in range(0, len(x), 64)])
        idx, _ = decode(torch.from_numpy(scores), stored.cfg)
        return [decode_label(i.tolist(), stored.cfg.charset) for i in idx]

    figures = gate(read, path, int8, [it.label for it in held], len(calibration))
    int8.replace(path)
    return figures


def sidecar(stored: StoredModel, verification: dict[str, Any]) -> dict[str, Any]:
    """The ``captrain.json`` contract of an export (format_version 1)."""
    cfg = stored.cfg
    steps = time_steps(cfg) if cfg.ctc else cfg.length
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": stored.identity,
        "charset": cfg.charset, "length": cfg.length, "min_length": cfg.min_length,
        "arch": cfg.arch,
        "input": input_contract(cfg),
        "normalization": {"mean": cfg.mean, "std": cfg.std, "in_graph": True},
        "output": {"name": OUTPUT_NAME, "decoding": "ctc" if cfg.ctc else "fixed",
                   "blank": 0 if cfg.ctc else None,
                   "shape": ["N", steps, len(cfg.charset) + (1 if cfg.ctc else 0)]},
        "opset": OPSET,
        # int8: the graph is quantized (workers/export/quantize.py); its input and
        # output stay float32, fed and read as above.
        "precision": "int8" if "quantization" in verification else "fp32",
        "verification": verification,
        "exported_with": versions(),
    }


def input_contract(cfg: ModelConfig) -> dict[str, Any]:
    """How a user's image or clip becomes the graph's input."""
    image = cfg.modality == "image"
    contract: dict[str, Any] = {
        "name": INPUT_NAME, "height": cfg.in_height, "width": cfg.in_width, "channels": 1,
        "dtype": "float32", "scale": "x/255",
        "grey": "ITU-R 601-2 luma, as Pillow convert('L')" if image else None,
        "resize": ("bilinear, antialiased (Pillow BILINEAR; torchvision antialias=True)"
                   if image else None),
        "modality": cfg.modality, "preprocess": cfg.preprocess if image else "audio",
    }
    if cfg.preprocess == "mnist" and image:
        contract["mnist"] = ("a dark digit on a light photo: grey, inverted, cropped to "
                             "its ink, fitted in 20x20 and centred by mass in 28x28 "
                             "(workers/digits.py)")
    if not image:
        contract["audio"] = {
            "sample_rate": cfg.sample_rate, "n_fft": cfg.n_fft, "hop": cfg.hop,
            "n_mels": cfg.n_mels, "frames": cfg.in_width,
            "wav": "PCM WAV, mixed to mono, resampled to sample_rate (polyphase)",
            "stft": "torch.stft, hann window of n_fft, center=True, power 2",
            "mel": "triangular filters evenly spaced on the HTK mel scale "
                   "(2595*log10(1+f/700)) from 0 Hz to sample_rate/2",
            "levels": "10*log10(mel + 1e-10) minus its maximum, clamped at -80 dB, "
                      "mapped to 0..255 and rounded; rows flipped (low bands at the "
                      "bottom); frames cut or padded with 0 to `frames` (workers/audio.py)",
        }
    return contract


def versions() -> dict[str, str]:
    """The versions of what wrote an export."""
    import onnx
    import onnxruntime

    try:
        captrain = importlib.metadata.version("captrain")
    except importlib.metadata.PackageNotFoundError:  # a source tree, not installed
        captrain = "unknown"
    return {"captrain": captrain, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
