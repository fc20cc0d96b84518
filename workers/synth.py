"""Seeded captcha rendering with the ``captcha`` package.

``captcha`` 0.7.1 draws every random number from the ``secrets`` module, images and
audio alike, so seeding ``random`` changes nothing. ``SeededSecrets`` offers the three
functions it calls (``randbelow``, ``randbits``, ``choice``) over a ``random.Random``,
and ``seeded_captcha`` swaps it in for the modules' ``secrets`` while a shard renders.
A prefork worker process renders one shard at a time, so the swap is not shared.
"""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import captcha.audio
import captcha.image
from captcha.audio import AudioCaptcha
from captcha.image import ImageCaptcha
from PIL import Image

from shared.shardfmt import Item

_swap_lock = threading.Lock()


class SeededSecrets:
    """The part of the ``secrets`` API that ``captcha`` uses, made reproducible."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq: Sequence[Any]) -> Any:
        return self._rng.choice(seq)


@contextmanager
def seeded_captcha(rng: random.Random) -> Iterator[None]:
    """Within the block, ``captcha.image`` and ``captcha.audio`` draw from ``rng``
    instead of ``secrets``."""
    with _swap_lock:
        originals = captcha.image.secrets, captcha.audio.secrets
        captcha.image.secrets = captcha.audio.secrets = SeededSecrets(rng)  # type: ignore[assignment]
        try:
            yield
        finally:
            captcha.image.secrets, captcha.audio.secrets = originals


def draw_label(rng: random.Random, charset: str, length: int, min_length: int | None) -> str:
    """A random text; its length is drawn from min_length..length when that is a range.

    A fixed length draws nothing extra, so fixed-length datasets keep their bytes.
    """
    if min_length is not None and min_length < length:
        length = rng.randint(min_length, length)
    return "".join(rng.choice(charset) for _ in range(length))


def encode_image(im: Image.Image, image_format: str) -> bytes:
    """``im`` as stored: ``pgm`` is binary 8-bit PGM of Pillow's grey, what every model
    reads (a header and a copy, so it costs almost nothing beside drawing); ``png``
    keeps the package's colours in fewer bytes, at the cost of compressing them
    (BENCHMARKS.md has the cost).
    """
    if image_format == "pgm":
        grey = im.convert("L")
        return b"P5\n%d %d\n255\n" % grey.size + grey.tobytes()
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def render_items(
    seed: int, start: int, count: int, charset: str, length: int, width: int, height: int,
    progress: Callable[[int, int], None] | None = None, min_length: int | None = None,
    image_format: str = "pgm",
) -> list[Item]:
    """Render ``count`` labelled captchas, numbered from ``start``, stored as
    ``image_format`` (see :func:`encode_image`).

    Labels and images both come from ``random.Random(seed)``: the same arguments give
    byte-identical items on any machine with the same captcha and Pillow versions.
    ``progress``, if given, is called as ``progress(done, count)`` after each item.
    """
    rng = random.Random(seed)
    gen = ImageCaptcha(width=width, height=height)
    items = []
    with seeded_captcha(rng):
        for i in range(count):
            label = draw_label(rng, charset, length, min_length)
            data = encode_image(gen.generate_image(label), image_format)
            items.append(Item(start + i, label, data, image_format))
            if progress is not None:
                progress(i + 1, count)
    return items


def render_audio_items(
    seed: int, start: int, count: int, charset: str, length: int,
    progress: Callable[[int, int], None] | None = None, min_length: int | None = None,
) -> list[Item]:
    """Render ``count`` labelled WAV captchas (8 kHz, 8-bit mono) with captcha's
    bundled voices, numbered from ``start``; seeded like ``render_items``."""
    rng = random.Random(seed)
    gen = AudioCaptcha()
    items = []
    with seeded_captcha(rng):
        for i in range(count):
            label = draw_label(rng, charset, length, min_length)
            items.append(Item(start + i, label, bytes(gen.generate(label)), "wav"))
            if progress is not None:
                progress(i + 1, count)
    return items
