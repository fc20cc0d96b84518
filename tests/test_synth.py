from __future__ import annotations

import hashlib
import io
import secrets

import captcha.image
import numpy as np
import pytest
import torch
from PIL import Image

from shared import shardfmt
from shared.errors import ArtifactError, InputError
from shared.images import load_rgb_bytes
from workers.codecs import decode_item, decode_shard, read_pgm, to_grey
from workers.models import ModelConfig
from workers.predict import Predictor
from workers.synth import render_items

CFG = ModelConfig(charset="0123456789", length=4, in_height=30, in_width=80,
                  image_height=60, image_width=160)


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
    header = b"P5\n160 60\n255\n"
    assert all(it.ext == "pgm" and it.data.startswith(header)
               and len(it.data) == len(header) + 160 * 60 for it in items)
    png = render_items(3, 100, 4, "AB", 6, 160, 60, image_format="png")
    assert all(it.ext == "png" and it.data.startswith(b"\x89PNG") for it in png)
    assert [it.label for it in png] == [it.label for it in items]


def test_grey_pgm_and_colour_png_captchas_give_the_model_the_same_input():
    pgm = render_items(5, 0, 12, CFG.charset, 4, 160, 60)
    png = render_items(5, 0, 12, CFG.charset, 4, 160, 60, image_format="png")
    x_pgm, y_pgm = decode_shard(shardfmt.pack(pgm, {}), CFG)
    x_png, y_png = decode_shard(shardfmt.pack(png, {}), CFG)
    assert x_pgm.shape == (12, 1, 30, 80) and x_pgm.float().std() > 10
    assert torch.equal(x_pgm, x_png) and torch.equal(y_pgm, y_png)


def test_a_shard_decodes_to_the_inputs_of_its_items_decoded_one_by_one():
    # Two sizes and both formats in one shard: resized a batch per size, the same pixels.
    items = (render_items(8, 0, 5, CFG.charset, 4, 160, 60)
             + render_items(9, 5, 4, CFG.charset, 4, 200, 80, image_format="png")
             + render_items(10, 9, 3, CFG.charset, 4, 160, 60, image_format="png"))
    x, _ = decode_shard(shardfmt.pack(items, {}), CFG)
    one_by_one = torch.stack([decode_item(it.data, CFG, it.ext) for it in items])
    assert x.shape == (12, 1, 30, 80) and torch.equal(x, one_by_one)


def test_grey_is_pillows_luma_exactly_and_keeps_grey_images_as_they_are():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)
    rgb[0, :, :] = np.arange(256, dtype=np.uint8)[:, None]  # every grey level
    rgb[1, :, 0], rgb[2, :, 1], rgb[3, :, 2] = 255, 255, 255  # pure channels
    ours = to_grey(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy()
    assert np.array_equal(ours, np.asarray(Image.fromarray(rgb).convert("L")))
    assert np.array_equal(ours[0], np.arange(256))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n", "not a binary PGM"),
        (b"P2\n2 2\n255\n1 2 3 4", "not a binary PGM"),
        (b"P5\n2 2\n65535\n" + bytes(8), "maxval 65535"),
        (b"P5\n4 3\n255\n" + bytes(11), "4x3 holds 11"),
        (b"P5\n4 3\n255\n" + bytes(13), "4x3 holds 13"),
        (b"P5\n0 3\n255\n", "0x3 holds 0"),
    ],
)
def test_a_malformed_pgm_is_refused_with_its_reason(data, message):
    with pytest.raises(InputError, match=message):
        read_pgm(data, "item")


def test_a_shard_with_a_truncated_pgm_is_an_artifact_error_naming_the_item():
    items = render_items(6, 40, 3, CFG.charset, 4, 160, 60)
    bad = shardfmt.Item(41, items[1].label, items[1].data[:-1], "pgm")
    with pytest.raises(ArtifactError, match="item 41"):
        decode_shard(shardfmt.pack([items[0], bad, items[2]], {}), CFG)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _imported_oddities() -> list[tuple[str, bytes, str]]:
    """Files a user may import: transparency, EXIF rotation, a palette, 16-bit grey."""
    rgba = Image.new("RGBA", (160, 60), (0, 0, 0, 0))  # transparent black background
    rgba.paste((20, 40, 200, 255), (30, 10, 130, 50))
    portrait = Image.new("RGB", (60, 160), (250, 250, 250))
    portrait.paste((0, 0, 0), (0, 0, 60, 30))  # a bar at the top, before rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 160x60, the bar on the right
    wide = Image.fromarray(np.linspace(1000, 50000, 160 * 60).astype(np.uint16).reshape(60, 160))
    return [("alpha", _encoded(rgba, "PNG"), "png"),
            ("exif", _encoded(portrait, "JPEG", exif=exif), "jpg"),
            ("palette", _encoded(rgba.convert("RGB").convert("P"), "PNG"), "png"),
            ("16-bit", _encoded(wide, "PNG"), "png")]


@pytest.mark.parametrize("name,data,ext",
                         [pytest.param(*case, id=case[0]) for case in _imported_oddities()])
def test_imported_images_train_on_what_predict_reads(name, data, ext):
    """The training path decodes an imported file as ``predict`` reads the same file."""
    predictor = Predictor(torch.nn.Identity(), CFG, run_id=0)
    assert torch.equal(decode_item(data, CFG, ext),
                       predictor._image_input(load_rgb_bytes(data), name))


def test_transparency_trains_on_white_and_exif_rotation_is_applied():
    cases = {name: decode_item(data, CFG, ext) for name, data, ext in _imported_oddities()}
    assert cases["alpha"][0, 0, 0] == 255  # composited on white, as predict reads it
    bar = cases["exif"][0]
    assert bar[:, -5:].float().mean() < 40 < 200 < bar[:, :5].float().mean()


def test_the_captcha_module_gets_its_secrets_back_after_rendering():
    render_items(3, 0, 1, "0123456789", 4, 160, 60)
    assert captcha.image.secrets is secrets
