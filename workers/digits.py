"""A user's digit photo or scan, prepared the way MNIST's digits were made.

LeCun et al. describe it: the ink of each digit was size-normalized to fit a 20×20
box with its aspect ratio kept, anti-aliased to grey, then centred by centre of mass
in a 28×28 field. MNIST digits are white ink on black; photos are dark ink on light
paper, so the image is inverted first, and the paper's own shade is subtracted so a
grey sheet does not count as ink.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from shared.errors import InputError

SIDE = 28
BOX = 20
INK_FRACTION = 0.3  # a pixel is ink when it is this close to the darkest stroke


def mnist_input(image: Image.Image, name: str = "image") -> np.ndarray:
    """Return ``image`` (any size or mode) as a (28, 28) uint8 MNIST-style digit.

    Raises InputError when the image holds no ink (a blank page).
    """
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    ink = 255.0 - grey
    ink = np.clip(ink - np.median(ink), 0.0, None)  # the paper is the most common shade
    peak = float(ink.max())
    if peak < 32.0:
        raise InputError(f"{name}: no ink found (is it a blank or low-contrast image?)")
    rows = np.flatnonzero((ink >= peak * INK_FRACTION).any(1))
    cols = np.flatnonzero((ink >= peak * INK_FRACTION).any(0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] * (255.0 / peak)
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(
        Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    field = np.zeros((SIDE, SIDE), dtype=np.float32)
    total = float(small.sum()) or 1.0
    ys, xs = np.indices(small.shape)
    cy, cx = float((ys * small).sum()) / total, float((xs * small).sum()) / total
    # Put the centre of mass at the field's centre, clamped so the box stays inside.
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - small.shape[0]))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - small.shape[1]))
    field[top : top + small.shape[0], left : left + small.shape[1]] = small
    return field.clip(0, 255).astype(np.uint8)
