"""Reading user images safely: any size, mode or format Pillow knows, to RGB.

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
    return _to_rgb(path, _open(path))


def load_rgb_bytes(data: bytes, name: str = "image") -> Image.Image:
    """Return encoded image bytes as an RGB image; errors name ``name``. Raises InputError."""
    return _to_rgb(name, _open(name, data))


def _to_rgb(path: Path | str, im: Image.Image) -> Image.Image:
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # Stretch wide grey to 8 bits by its own range; "L" would clip it.
            im = im.convert("F")
            lo, hi = (float(v) for v in im.getextrema())  # type: ignore[arg-type]
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            im = im.point(lambda v: (v - lo) * scale).convert("L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image is truncated or corrupt ({exc})") from exc
