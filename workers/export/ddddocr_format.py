"""Format ``ddddocr``: ``model.onnx`` and ``charsets.json`` that ddddocr 1.6.1 loads
as a custom model, ``DdddOcr(ocr=False, det=False, import_onnx_path=...,
charsets_path=...)``, and reads as ``captrain predict`` reads.

What ddddocr 1.6.1 does with a custom model (core/ocr_engine.py): it resizes the
image to charsets.json's ``image`` [W, H] with Pillow LANCZOS, converts it to grey
("L") for ``channel`` 1, feeds x/255 as float32 (1, 1, H, W) with no mean or std,
takes the argmax over the last axis of the first output, collapses repeats and drops
index 0 (``charset[0]`` is the blank, ""). So ``image`` is the dataset's own size,
where Pillow's resize returns an unchanged copy, and the graph does the rest
(graphs.DdddocrGraph): captrain's exact resize, the normalization, the model, and
scores shaped for that reading.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.errors import ArtifactError
from shared.images import load_rgb_bytes
from workers.export.check import MIN_AGREEMENT, compare_scores, open_session
from workers.export.graphs import INPUT_NAME, DdddocrGraph, export_graph
from workers.export.quantize import CALIBRATION_ITEMS, EVAL_ITEMS, gate, quantize_int8
from workers.export.source import StoredModel, dataset_items
from workers.predict import Predictor
from workers.synth import render_items

MODEL_FILE = "model.onnx"
CHARSETS_FILE = "charsets.json"
CHECK_ITEMS = 32  # fresh captchas read by ddddocr and by captrain
CHECK_SEED = 20240611  # the same captchas at every export of a model
DDDDOCR_VERSION = "1.6.1"  # the version whose reading this format follows


def write_ddddocr(stored: StoredModel, folder: Path, say: Callable[[str], None],
                  quantize: str = "none") -> dict[str, Any]:
    """Write ``model.onnx`` and ``charsets.json`` into ``folder``; check the graph
    against torch, then ddddocr's reading of fresh captchas against captrain's. With
    ``quantize`` "int8", then quantize the graph, keep it only if it passes
    quantize.gate, and check that ddddocr reads it as its steps say.

    Returns the verification figures (under ``quantization``, the int8 graph's).
    Raises ArtifactError when the graph does not export or a check fails.
    """
    cfg = stored.cfg
    size = (cfg.image_height, cfg.image_width)
    graph = DdddocrGraph(stored.model, cfg)
    say("exporting the graph")
    export_graph(graph, torch.zeros(2, 1, *size), folder / MODEL_FILE)
    charsets = {"charset": ["", *cfg.charset], "word": False,
                "image": [cfg.image_width, cfg.image_height], "channel": 1}
    (folder / CHARSETS_FILE).write_text(json.dumps(charsets, ensure_ascii=False) + "\n")
    items = render_items(CHECK_SEED, 0, CHECK_ITEMS, cfg.charset, cfg.length,
                         cfg.image_width, cfg.image_height, min_length=cfg.min_length or None,
                         image_format="png")
    images = [item.data for item in items]
    say("checking onnxruntime against torch")
    grey = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("L")) for d in images])
    x = torch.from_numpy(grey).float()[:, None] / 255.0  # as ddddocr scales
    verification = compare_scores(open_session(folder / MODEL_FILE), graph, x)
    say("reading fresh captchas with ddddocr and with captrain")
    reader, theirs = read_with_ddddocr(folder, images)
    ours = [text for text, _ in Predictor(stored.model, cfg, stored.run_id).read(
        [load_rgb_bytes(d, f"captcha {i}") for i, d in enumerate(images)])]
    same = sum(a == b for a, b in zip(theirs, ours, strict=True)) / len(images)
    verification.update({
        "reader": reader, "images": len(images),
        "image_size": [cfg.image_width, cfg.image_height], "text_agreement": same,
        "label_accuracy": sum(a == it.label for a, it in zip(theirs, items, strict=True))
        / len(images)})
    if same < MIN_AGREEMENT:
        diffs = [(a, b) for a, b in zip(theirs, ours, strict=True) if a != b][:3]
        raise ArtifactError(f"ddddocr reads {same:.1%} of fresh captchas as captrain does "
                            f"(at least {MIN_AGREEMENT:.1%}), e.g. (ddddocr, captrain) "
                            f"{diffs}; nothing was written")
    if quantize == "int8":
        verification["quantization"] = _quantized(stored, folder, images, say)
    return verification


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _quantized(stored: StoredModel, folder: Path, fresh: list[bytes],
               say: Callable[[str], None]) -> dict[str, Any]:
    """Quantize the checked graph in ``folder`` in place, after it read the test items
    as well as fp32 (quantize.gate), and check that ddddocr reads the int8 graph as
    its steps do on the ``fresh`` captchas; the figures."""
    say("quantizing to int8, calibrated on training items")
    calibration = np.stack([_grey(it.data) for it in
                            dataset_items(stored, CALIBRATION_ITEMS, "train")])
    path = folder / MODEL_FILE
    int8 = folder / "model.int8.onnx"
    quantize_int8(path, int8, calibration[:, None].astype(np.float32) / 255.0)
    say("reading held-out items in fp32 and in int8")
    held = dataset_items(stored, EVAL_ITEMS, "test")
    figures = gate(lambda graph: read_like_ddddocr(folder, [it.data for it in held], graph),
                   path, int8, [it.label for it in held], len(calibration))
    int8.replace(path)
    say("reading fresh captchas with ddddocr and by its steps, in int8")
    reader, theirs = read_with_ddddocr(folder, fresh)
    steps = read_like_ddddocr(folder, fresh)
    same = sum(a == b for a, b in zip(theirs, steps, strict=True)) / len(fresh)
    figures.update({"reader": reader, "reader_agreement": same})
    if same < MIN_AGREEMENT:
        raise ArtifactError(f"{reader} reads {same:.1%} of fresh captchas with the int8 "
                            "model as its steps do; nothing was written")
    return figures


def read_with_ddddocr(folder: Path, images: list[bytes]) -> tuple[str, list[str]]:
    """Read ``images`` (encoded bytes) as ddddocr reads them from ``folder``.

    With the ddddocr package installed (the dev extra), that package itself reads;
    without it, its steps as written in the module docstring, with onnxruntime.
    Returns (who read, texts).
    """
    try:
        import ddddocr
    except ImportError:
        who = f"ddddocr {DDDDOCR_VERSION}'s steps (the package is not installed)"
        return who, read_like_ddddocr(folder, images)
    ocr = ddddocr.DdddOcr(ocr=False, det=False, show_ad=False,
                          import_onnx_path=str(folder / MODEL_FILE),
                          charsets_path=str(folder / CHARSETS_FILE))
    try:
        texts = [str(ocr.classification(data)) for data in images]
    except Exception as exc:  # ddddocr wraps everything in its own error classes
        raise ArtifactError(f"ddddocr cannot read with the export: {exc}") from exc
    return f"ddddocr {importlib.metadata.version('ddddocr')}", texts


def read_like_ddddocr(folder: Path, images: list[bytes], model: Path | None = None
                      ) -> list[str]:
    """Read ``images`` from ``folder`` (its graph, or ``model``) by ddddocr 1.6.1's
    steps (module docstring), with Pillow, numpy and onnxruntime."""
    charsets = json.loads((folder / CHARSETS_FILE).read_text())
    session = open_session(model or folder / MODEL_FILE)
    width, height = charsets["image"]
    texts = []
    for data in images:
        im = Image.open(io.BytesIO(data)).resize((width, height), Image.Resampling.LANCZOS)
        x = np.asarray(im.convert("L")).astype(np.float32)[None, None] / 255.0
        steps = session.run(None, {INPUT_NAME: x})[0][0].argmax(-1)  # (S,)
        kept = [int(c) for i, c in enumerate(steps) if c != 0 and (i == 0 or c != steps[i - 1])]
        texts.append("".join(charsets["charset"][c] for c in kept))
    return texts
