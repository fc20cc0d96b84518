"""MNIST-format test data from a real handwritten set: scikit-learn's bundled digits.

``load_digits`` holds 1,797 8×8 scans of digits written by 43 people (the UCI
"Optical Recognition of Handwritten Digits" set). Each is drawn as a photo would
show it, dark ink on light paper at a larger size, then prepared by the same
MNIST procedure that ``predict`` applies to a user's photo, and written as IDX.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from workers.digits import mnist_input

HELD_OUT = 40  # the last digits of the set go into no file: predict reads them fresh


def photo(pixels8: np.ndarray, size: int = 160, margin: int = 40, paper: int = 235) -> Image.Image:
    """A 16-level 8×8 scan as a photo: dark ink on ``paper`` grey, upscaled, with margin."""
    ink = Image.fromarray((pixels8 * (255.0 / 16.0)).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)
    page = np.full((size + 2 * margin, size + 2 * margin), float(paper), dtype=np.float32)
    page[margin:-margin, margin:-margin] -= np.asarray(ink, np.float32) * (paper - 20) / 255.0
    return Image.fromarray(page.clip(0, 255).astype(np.uint8)).convert("RGB")


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.uint8)


def idx_images(images: list[np.ndarray]) -> bytes:
    return struct.pack(">IIII", 2051, len(images), 28, 28) + b"".join(
        im.astype(np.uint8).tobytes() for im in images)


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_test: int = 300, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Write the four IDX files; return the held-out (8×8 scans, labels)."""
    images, labels = digits()
    prepared = [mnist_input(photo(im)) for im in images]
    n_train = len(images) - HELD_OUT - n_test
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": idx_images(prepared[:n_train]),
        "train-labels-idx1-ubyte": idx_labels(labels[:n_train]),
        "t10k-images-idx3-ubyte": idx_images(prepared[n_train : n_train + n_test]),
        "t10k-labels-idx1-ubyte": idx_labels(labels[n_train : n_train + n_test]),
    }
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return images[-HELD_OUT:], labels[-HELD_OUT:]
