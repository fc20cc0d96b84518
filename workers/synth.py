"""Seeded captcha rendering with the ``captcha`` package.

``captcha`` 0.7.1 draws every random number from the ``secrets`` module, so seeding
``random`` changes nothing. ``SeededSecrets`` offers the three functions it calls
(``randbelow``, ``randbits``, ``choice``) over a ``random.Random``, and
``seeded_captcha`` swaps it in for the module's ``secrets`` while a shard renders.
A prefork worker process renders one shard at a time, so the swap is not shared.
"""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import captcha.image
from captcha.image import ImageCaptcha

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
    """Within the block, ``captcha.image`` draws from ``rng`` instead of ``secrets``."""
    with _swap_lock:
        original = captcha.image.secrets
        captcha.image.secrets = SeededSecrets(rng)  # type: ignore[assignment]
        try:
            yield
        finally:
            captcha.image.secrets = original


def render_items(
    seed: int, start: int, count: int, charset: str, length: int, width: int, height: int
) -> list[Item]:
    """Render ``count`` labelled PNG captchas, numbered from ``start``.

    Labels and images both come from ``random.Random(seed)``: the same arguments give
    byte-identical PNGs on any machine with the same captcha and Pillow versions.
    """
    rng = random.Random(seed)
    gen = ImageCaptcha(width=width, height=height)
    items = []
    with seeded_captcha(rng):
        for i in range(count):
            label = "".join(rng.choice(charset) for _ in range(length))
            buf = io.BytesIO()
            gen.generate_image(label).save(buf, format="PNG")
            items.append(Item(start + i, label, buf.getvalue()))
    return items
