"""``export --quantize int8``: the checked fp32 graph quantized by onnxruntime, kept
only when it reads the model's held-out items as well as fp32 does.

The scheme is onnxruntime's static quantization in the QDQ format: weights int8 per
output channel, activations uint8 with ranges calibrated on items of the model's own
training split. The weights keep 7 bits (``reduce_range``): on a CPU without VNNI
(AVX2, AVX-512 without it), onnxruntime's uint8-by-int8 kernels add products in int16
and saturate at 8 bits. Measured on an AVX2 machine (tests/test_export.py's small
multi-head model), 8-bit weights read 5% of the held-out items that fp32 read 82.3%
of; 7 bits, calibrated on 1,024 items, read 82.0%. An export runs wherever its user
runs it, so it takes the bits that read right on every CPU.

The graph keeps its float32 input and output, so every reader of a format
(onnxruntime, ``captrain serve``, ddddocr) feeds it as it feeds fp32.

Quantized scores are not fp32's to 1e-3, so the gate is the reading itself: on the
dataset's test items, the int8 graph's whole-sequence accuracy may fall at most
MAX_DROP below the fp32 graph's, or the export fails and nothing is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ArtifactError
from workers.export.graphs import INPUT_NAME

CALIBRATION_ITEMS = 1024  # training items whose activations set the uint8 ranges
EVAL_ITEMS = 512  # test items both graphs read
MAX_DROP = 0.01  # whole-sequence accuracy int8 may lose against fp32
SCHEME = ("onnxruntime static QDQ: int8 weights per channel at 7 bits, uint8 "
          "activations calibrated on the dataset's training items")
CALIBRATION_BATCH = 32
# The ops that hold the model's arithmetic. The rest stays float32: the exact resize
# and the scores ddddocr's reading needs, whose never-chosen -1e4 steps would take
# every uint8 level of a quantized Concat and leave none for the real scores.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Write ``out``: the graph ``fp32`` statically quantized (module docstring),
    its activation ranges calibrated on ``calibration`` ((n, 1, H, W) float32, the
    graph's own input). Raises ArtifactError."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                calibration[i:i + CALIBRATION_BATCH]
                for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    try:
        with tempfile.TemporaryDirectory(prefix="captrain-quantize-") as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            # Shape inference and constant folding first, as onnxruntime advises.
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, reduce_range=True,
                            op_types_to_quantize=list(QUANTIZED_OPS))
    except Exception as exc:  # onnx and onnxruntime raise many unrelated classes
        raise ArtifactError(f"onnxruntime cannot quantize the model to int8: {exc}") from exc


def gate(read: Callable[[Path], list[str]], fp32: Path, int8: Path, labels: list[str],
         calibration_items: int) -> dict[str, Any]:
    """Read the held-out items whose ``labels`` are given with both graphs
    (``read(path)`` gives one text per item) and compare.

    Returns the figures; raises ArtifactError when int8 loses more than MAX_DROP.
    """
    ours, theirs = read(fp32), read(int8)
    n = len(labels)
    acc32 = sum(a == b for a, b in zip(ours, labels, strict=True)) / n
    acc8 = sum(a == b for a, b in zip(theirs, labels, strict=True)) / n
    figures = {
        "type": "int8", "scheme": SCHEME, "calibration_items": calibration_items,
        "items": n, "seq_acc_fp32": acc32, "seq_acc_int8": acc8,
        "text_agreement": sum(a == b for a, b in zip(ours, theirs, strict=True)) / n,
        "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size}
    if acc8 < acc32 - MAX_DROP - 1e-9:  # exactly one point lower is within
        raise ArtifactError(
            f"the int8 model reads {acc8:.1%} of {n} held-out items against fp32's "
            f"{acc32:.1%} (it may lose at most {MAX_DROP:.0%}); nothing was written. "
            "Export without --quantize")
    return figures
