"""One exported model in onnxruntime: its contract read and checked, images prepared
as the model reads them, and scores decoded to text with a confidence.

The folder is what ``captrain export --format onnx`` writes: ``model.onnx`` and
``captrain.json``. Nothing here imports torch; Pillow and numpy prepare the input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.errors import ConfigError
from shared.images import load_grey_bytes

META_FILE = "captrain.json"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelInfo:
    """What the contract file says about one exported model."""

    ref: str  # what the user asked for: a registry ref, or the folder
    label: str  # name@version, or run N for a model without a name
    charset: str
    length: int
    decoding: str  # fixed | ctc
    height: int
    width: int
    input_name: str
    output_name: str
    arch: str

    def public(self) -> dict[str, Any]:
        """The model as ``GET /v1/models`` shows it."""
        return {"ref": self.ref, "model": self.label, "arch": self.arch,
                "input": {"height": self.height, "width": self.width, "channels": 1},
                "charset": self.charset, "length": self.length, "decoding": self.decoding}


def read_info(folder: Path, ref: str | None = None) -> ModelInfo:
    """Read and check ``folder/captrain.json``.

    Raises ConfigError, in one line, for a folder that is not a captrain ONNX export,
    or a model the server cannot feed (audio, or a digit-photo preprocess).
    """
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder}: no {META_FILE}; export the model with "
                          "`captrain export MODEL --format onnx --out DIR`") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"{folder}: no {MODEL_FILE}")
    try:
        return _info(meta, ref or str(folder))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a captrain-onnx contract ({exc!r})") from exc


def _info(meta: dict[str, Any], ref: str) -> ModelInfo:
    if meta.get("format") != "captrain-onnx" or meta.get("format_version") != 1:
        raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
    inp, out, model = meta["input"], meta["output"], meta["model"]
    if inp.get("modality") != "image" or inp.get("preprocess") != "resize":
        raise ConfigError(
            f"model {ref!r} reads {inp.get('modality')} input prepared by "
            f"{inp.get('preprocess')!r}; captrain serve reads captcha images (resize) only")
    if inp.get("channels") != 1 or inp.get("scale") != "x/255":
        raise ValueError(f"input channels {inp.get('channels')}, scale {inp.get('scale')}")
    if out["decoding"] not in ("fixed", "ctc"):
        raise ValueError(f"decoding {out['decoding']!r}")
    name, version = model.get("name"), model.get("version")
    label = f"{name}@{version}" if name and version is not None else f"run {model['run']}"
    return ModelInfo(ref=ref, label=label, charset=str(meta["charset"]),
                     length=int(meta["length"]), decoding=out["decoding"],
                     height=int(inp["height"]), width=int(inp["width"]),
                     input_name=str(inp["name"]), output_name=str(out["name"]),
                     arch=str(meta.get("arch", "")))


def default_threads(processes: int = 1) -> int:
    """onnxruntime intra-op threads: this process's share of the cores it may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, processes))


class Runner:
    """An onnxruntime session over one exported model.

    Not thread-safe by contract: one batcher thread calls :meth:`run`; :meth:`prepare`
    touches no session state and runs anywhere.
    """

    def __init__(self, folder: Path, ref: str | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = folder
        self.info = read_info(folder, ref)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        # Spinning workers would take the cores the event loop needs between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Subnormal floats flushed to zero: about 15% faster on this model (measured),
        # and no reading changes (their size is below 1e-38).
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unrelated classes
            raise ConfigError(f"{folder / MODEL_FILE}: onnxruntime cannot load it "
                              f"({str(exc).splitlines()[0]})") from exc

    @property
    def label(self) -> str:
        return self.info.label

    def prepare(self, data: bytes, name: str) -> np.ndarray:
        """Encoded image bytes -> (H, W) uint8 grey at the model's input size: Pillow's
        luma, bilinear (antialiased) resize. :meth:`run` scales a batch by 1/255.

        Raises InputError (naming ``name``) for bytes that are no readable image.
        """
        im = load_grey_bytes(data, name)
        return np.asarray(im.resize((self.info.width, self.info.height),
                                    Image.Resampling.BILINEAR))

    def run(self, x: np.ndarray) -> list[tuple[str, float]]:
        """(N, H, W) uint8 grey, as :meth:`prepare` gives it -> (text, confidence) per
        image. The batch is scaled by 1/255 in one pass."""
        x = x[:, None].astype(np.float32) * np.float32(1 / 255)
        scores = self.session.run([self.info.output_name], {self.info.input_name: x})[0]
        return decode_scores(np.asarray(scores), self.info)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large scores."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def decode_scores(scores: np.ndarray, info: ModelInfo) -> list[tuple[str, float]]:
    """(N, T, K) scores -> (text, confidence) per row.

    fixed: charset[argmax] per position; confidence is the product of the positions'
    top probabilities. ctc (class 0 blank): argmax per step, repeats collapsed,
    blanks dropped, at most ``length`` characters; confidence is the product of the
    kept steps' top probabilities.
    """
    probs = softmax(scores.astype(np.float32, copy=False))
    best, idx = probs.max(-1), probs.argmax(-1)  # (N, T)
    charset = info.charset
    if info.decoding == "fixed":
        conf = best.prod(-1)
        return [("".join(charset[i] for i in row), float(c))
                for row, c in zip(idx.tolist(), conf.tolist(), strict=True)]
    prev = np.pad(idx[:, :-1], ((0, 0), (1, 0)))  # the step before; blank first
    new = (idx != 0) & (idx != prev)
    emit = new & (np.cumsum(new, axis=1) <= info.length)
    conf = np.where(emit, best, 1.0).prod(-1)
    out = []
    for row, keep, c in zip(idx, emit, conf.tolist(), strict=True):
        out.append(("".join(charset[i - 1] for i in row[keep].tolist()), float(c)))
    return out
