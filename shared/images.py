"""Reading user images safely: any size, mode or format Pillow knows, to RGB or grey.

Refused with an InputError, naming the file: not an image, truncated, empty, and
decompression bombs (a header that claims more than ``MAX_PIXELS``). Converted:
palette, grey, CMYK, alpha (composited on white), 16-bit and float grey (rescaled),
EXIF rotation; an animation gives its first frame.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# 40 MP: far above any captcha or scan, far below what would exhaust memory.
MAX_PIXELS = 40_000_000


def _open(path: Path | str, data: bytes | None = None) -> Image.Image:
    # ``data``, when given, is the image's bytes and ``path`` only names them.
    try:
        if (len(data) if data is not None else Path(path).stat().st_size) == 0:
            raise InputError(f"{path}: file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else path)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a directory") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, ValueError, SyntaxError) as exc:
        # Pillow raises ValueError for some broken headers ("Truncated IHDR chunk").
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    w, h = im.size
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        raise InputError(f"{path}: {w}x{h} pixels is beyond the {MAX_PIXELS} pixel limit")
    return im


def check_image(path: Path) -> tuple[int, int]:
    """Decode ``path`` fully; return (width, height). Raises InputError."""
    im = _open(path)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image is truncated or corrupt ({exc})") from exc
    return im.size


def load_rgb(path: Path) -> Image.Image:
    """Return ``path`` as an RGB image. Raises InputError."""
    im = _open(path)
    out = _as(path, im, "RGB")
    if out is im:  # a multi-frame file stays open behind its image: hand back a copy
        out = im.copy()
        im.close()
    return out


def load_rgb_bytes(data: bytes, name: str = "image") -> Image.Image:
    """Return encoded image bytes as an RGB image; errors name ``name``. Raises InputError."""
    return _as(name, _open(name, data), "RGB")


def load_grey_bytes(data: bytes, name: str = "image") -> Image.Image:
    """Return encoded image bytes as Pillow's luma ("L"): the same pixels as
    ``load_rgb_bytes(...).convert("L")``, without an RGB copy in between for RGB and
    grey images. Errors name ``name``. Raises InputError."""
    return _as(name, _open(name, data), "L")


def _as(path: Path | str, im: Image.Image, mode: str) -> Image.Image:
    """``im`` decoded, upright and flattened on white, in ``mode`` (RGB or L)."""
    try:
        im = _flat(im)
        return im if im.mode == mode else im.convert(mode)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image is truncated or corrupt ({exc})") from exc


def _flat(im: Image.Image) -> Image.Image:
    """``im``'s first frame, decoded and turned upright by its EXIF orientation, as RGB
    or 8-bit grey. Grey stays grey: L -> RGB -> L gives back the same bytes, as
    RGB -> L gives those of RGB -> RGB -> L."""
    im.seek(0)
    im.load()
    ImageOps.exif_transpose(im, in_place=True)  # no copy when it is upright already
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Stretch wide grey to 8 bits by its own range; "L" would clip it.
        im = im.convert("F")
        lo, hi = (float(v) for v in im.getextrema())  # type: ignore[arg-type]
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return im.point(lambda v: (v - lo) * scale).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im if im.mode in ("RGB", "L") else im.convert("RGB")
