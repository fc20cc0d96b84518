from __future__ import annotations

import hashlib
import secrets

import captcha.image

from workers.synth import render_items


def _hashes(items):
    return [hashlib.sha256(it.data).hexdigest() for it in items]


def test_the_same_seed_renders_byte_identical_captchas():
    a = render_items(42, 0, 5, "0123456789", 4, 160, 60)
    b = render_items(42, 0, 5, "0123456789", 4, 160, 60)
    assert [it.label for it in a] == [it.label for it in b]
    assert _hashes(a) == _hashes(b)


def test_different_seeds_render_different_captchas():
    a = render_items(1, 0, 5, "0123456789", 4, 160, 60)
    b = render_items(2, 0, 5, "0123456789", 4, 160, 60)
    assert _hashes(a) != _hashes(b)


def test_labels_use_the_charset_and_length_and_items_are_numbered_from_start():
    items = render_items(3, 100, 4, "AB", 6, 160, 60)
    assert [it.index for it in items] == [100, 101, 102, 103]
    assert all(len(it.label) == 6 and set(it.label) <= {"A", "B"} for it in items)
    assert all(it.data.startswith(b"\x89PNG") for it in items)


def test_the_captcha_module_gets_its_secrets_back_after_rendering():
    render_items(3, 0, 1, "0123456789", 4, 160, 60)
    assert captcha.image.secrets is secrets
