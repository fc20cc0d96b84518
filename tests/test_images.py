"""Reading user images: every kind of file a user may hand to ``predict``."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.errors import InputError
from shared.images import check_image, load_grey_bytes, load_rgb, load_rgb_bytes

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused; each case rewrites it


def _png_header_only(path, width, height):
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_rgb_png_and_jpeg_load_as_rgb(tmp_path):
    for ext in ("png", "jpg"):
        p = tmp_path / f"a.{ext}"
        Image.new("RGB", (160, 60), (200, 10, 10)).save(p)
        assert load_rgb(p).mode == "RGB" and load_rgb(p).size == (160, 60)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1", "I;16", "I", "F"])
def test_every_common_mode_converts_to_rgb(tmp_path, mode):
    p = tmp_path / ("a.tiff" if mode in ("CMYK", "F", "I") else "a.png")
    im = Image.new("L", (40, 20), 128).convert(mode) if mode not in ("I;16",) else \
        Image.fromarray(np.full((20, 40), 40000, dtype=np.uint16))
    im.save(p)
    out = load_rgb(p)
    assert out.mode == "RGB" and out.size == (40, 20)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I"])
def test_grey_loading_gives_the_pixels_of_rgb_then_grey(mode):
    """The server reads grey straight from the file (no RGB copy for RGB and grey
    images): the same bytes as RGB then Pillow's luma, in every mode, EXIF-rotated too."""
    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    im = (base.convert("L").convert(mode) if mode in ("I;16", "I")
          else base.convert(mode))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the loader must turn it upright
    saves = {"PNG": ("RGB", "L", "P", "RGBA", "LA", "1", "I;16"), "TIFF": (mode,),
             "JPEG": ("RGB", "L", "CMYK")}
    for fmt in (f for f, modes in saves.items() if mode in modes):
        buf = io.BytesIO()
        im.save(buf, fmt, exif=exif)
        data = buf.getvalue()
        grey = load_grey_bytes(data)
        assert grey.mode == "L" and grey.size == (20, 40), (mode, fmt)
        assert np.array_equal(np.asarray(grey), np.asarray(load_rgb_bytes(data).convert("L"))), \
            (mode, fmt)


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path):
    arr = np.zeros((10, 10), dtype=np.uint16)
    arr[:, 5:] = 60000
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    out = np.asarray(load_rgb(p))
    assert out[0, 0, 0] == 0 and out[0, 9, 0] == 255


def test_an_animated_image_gives_its_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 255, 255), (0, 0, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert np.asarray(load_rgb(p))[0, 0, 0] == 255


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("hello, not an image"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: _png_header_only(p, 50_000, 50_000), "pixel limit|readable"),
    ],
)
def test_unusable_files_raise_input_error_naming_the_file(tmp_path, make, message):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(InputError, match=message) as err:
        load_rgb(p)
    assert str(p) in str(err.value)


def test_a_truncated_png_is_refused(tmp_path):
    p = tmp_path / "t.png"
    Image.effect_noise((160, 60), 50).convert("RGB").save(p)
    p.write_bytes(p.read_bytes()[:-400])
    with pytest.raises(InputError, match=r"truncated|corrupt|readable"):
        check_image(p)
    with pytest.raises(InputError):
        load_rgb(p)


def test_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_rgb(tmp_path / "nope.png")


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.binary(max_size=2048))
def test_image_loader_fuzz_gives_input_error_or_an_rgb_image(tmp_path, blob):
    p = tmp_path / "fuzz.png"
    p.write_bytes(blob)
    try:
        im = load_rgb(p)
    except InputError:
        return
    assert im.mode == "RGB"


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_a_corrupted_png_byte_gives_input_error_or_an_rgb_image(tmp_path, pos, value):
    p = tmp_path / "flip.png"
    Image.effect_noise((40, 20), 30).convert("RGB").save(p)
    data = bytearray(p.read_bytes())
    data[pos % len(data)] = value
    p.write_bytes(bytes(data))
    try:
        im = load_rgb(p)
    except InputError:
        return
    assert im.mode == "RGB"
