"""Checking a written graph before it is kept: onnxruntime against torch on the same
inputs, at batch sizes that prove the batch axis is dynamic.

An export whose scores differ by more than MAX_ABS_DIFF, or whose argmax agrees at
fewer than MIN_AGREEMENT of the steps (or, for ddddocr, whose texts agree on fewer
than MIN_AGREEMENT of the images), fails, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.errors import ArtifactError
from workers.export.graphs import INPUT_NAME, OPSET

BATCH_SIZES = (1, 7)  # one alone, and a batch no graph was traced at (tracing uses 2)
MAX_ABS_DIFF = 1e-3  # scores are logits of a few units; float32 paths differ by ~1e-6
MIN_AGREEMENT = 0.999


def open_session(path: Path) -> Any:
    """An onnxruntime CPU session over ``path``, after onnx's own checker and an opset
    check. Raises ArtifactError."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset < OPSET:
            raise ValueError(f"opset {opset} is below {OPSET}")
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx and onnxruntime raise their own unrelated classes
        raise ArtifactError(f"the exported {path.name} does not load: {exc}") from exc


@torch.no_grad()
def compare_scores(session: Any, graph: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Run ``x`` ((n, 1, H, W) float32) through ``session`` and through ``graph`` in
    torch, in batches of each of BATCH_SIZES.

    Returns {"batch_sizes", "items", "max_abs_diff", "argmax_agreement"}; raises
    ArtifactError when either is out of bounds or a batch size fails to run.
    """
    want = graph.eval()(x).numpy()
    diff, agree, steps = 0.0, 0, 0
    for size in BATCH_SIZES:
        for start in range(0, len(x), size):
            chunk = x[start:start + size].numpy()
            try:
                got = session.run(None, {INPUT_NAME: chunk})[0]
            except Exception as exc:  # onnxruntime's own classes
                raise ArtifactError(f"the exported model fails at batch size {len(chunk)}: "
                                    f"{str(exc).splitlines()[0]}") from exc
            ref = want[start:start + size]
            if got.shape != ref.shape:
                raise ArtifactError(f"the exported model gives scores of shape {got.shape} "
                                    f"where torch gives {ref.shape}")
            diff = max(diff, float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            steps += ref.shape[0] * ref.shape[1]
    result = {"batch_sizes": list(BATCH_SIZES), "items": len(x),
              "max_abs_diff": diff, "argmax_agreement": agree / steps}
    if diff > MAX_ABS_DIFF or agree / steps < MIN_AGREEMENT:
        raise ArtifactError(
            f"onnxruntime does not read as torch does: max |diff| {diff:.3g} (at most "
            f"{MAX_ABS_DIFF:g}), argmax agreement {agree / steps:.4f} (at least "
            f"{MIN_AGREEMENT}); nothing was written")
    return result
