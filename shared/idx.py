"""The IDX format of the MNIST files, read and checked with the standard library.

As LeCun's MNIST page lays it out: a big-endian header, then unsigned bytes.

    images (idx3): magic 2051 | count | rows | cols | count*rows*cols pixels
    labels (idx1): magic 2049 | count | count labels

Files may be gzipped (the ``.gz`` the page serves) or raw. Every failure is an
InputError that names the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InputError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
# 60,000 28×28 images are 47 MB; anything past this is not an MNIST file (or a bomb).
MAX_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Idx:
    path: Path
    count: int
    rows: int  # 0 for a label file
    cols: int
    body: bytes  # pixels row-major, image after image; or one byte per label

    def image(self, i: int) -> bytes:
        size = self.rows * self.cols
        return self.body[i * size : (i + 1) * size]


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.open(fh) as gz:
                    data = gz.read(MAX_BYTES + 1)
            else:
                data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: gzip data is truncated or corrupt ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    if len(data) > MAX_BYTES:
        raise InputError(f"{path}: more than {MAX_BYTES} bytes; not an MNIST file")
    return data


def read_idx(path: Path, kind: str) -> Idx:
    """Read an IDX ``images`` or ``labels`` file and check it whole.

    Raises InputError naming ``path`` for a wrong magic number, a short header, a
    body shorter or longer than the header says, or bad gzip data.
    """
    data = _read(path)
    want = IMAGES_MAGIC if kind == "images" else LABELS_MAGIC
    header = 16 if kind == "images" else 8
    if len(data) < header:
        raise InputError(f"{path}: truncated header ({len(data)} of {header} bytes)")
    magic, count = struct.unpack(">II", data[:8])
    if magic != want:
        other = {IMAGES_MAGIC: " (an images file)", LABELS_MAGIC: " (a labels file)"}
        raise InputError(f"{path}: wrong magic number {magic}{other.get(magic, '')}; "
                         f"IDX {kind} files start with {want}")
    rows, cols = struct.unpack(">II", data[8:16]) if kind == "images" else (0, 0)
    if kind == "images" and not (1 <= rows <= 1024 and 1 <= cols <= 1024):
        raise InputError(f"{path}: images of {rows}x{cols} pixels are not plausible")
    expected = count * (rows * cols if kind == "images" else 1)
    body = data[header:]
    if len(body) < expected:
        raise InputError(f"{path}: truncated: the header promises {count} {kind} "
                         f"({expected} bytes) but {len(body)} bytes follow it")
    if len(body) > expected:
        raise InputError(f"{path}: {len(body) - expected} bytes past the {count} {kind} "
                         "the header promises")
    return Idx(path, count, rows, cols, body)
