from __future__ import annotations

import pytest
from PIL import Image

from scheduler.plan import scan_import
from shared.errors import InputError


def _img(path):
    Image.new("RGB", (160, 60), "white").save(path)


def test_import_reads_labels_from_plain_and_numbered_file_names(tmp_path):
    for name in ("0782.png", "00000001_5521.png", "00000002_9999.jpg"):
        _img(tmp_path / name)
    plan = scan_import(tmp_path)
    assert sorted(label for _, label in plan.files) == ["0782", "5521", "9999"]
    assert plan.length == 4 and plan.charset == "0125789"
    assert (plan.width, plan.height) == (160, 60)


def test_import_refuses_labels_of_mixed_length_naming_the_file(tmp_path):
    _img(tmp_path / "0782.png")
    _img(tmp_path / "123.png")
    with pytest.raises(InputError, match=r"123\.png"):
        scan_import(tmp_path)


def test_import_of_an_empty_or_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"no \.png"):
        scan_import(tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        scan_import(tmp_path / "nope")


def test_import_refuses_a_file_larger_than_a_shard_item_may_be(tmp_path):
    """Refused here, not later by every ``shard`` of the imported dataset."""
    from shared.shardfmt import MAX_MEMBER_BYTES

    _img(tmp_path / "0782.png")
    big = tmp_path / "1234.png"
    _img(big)
    with big.open("ab") as fh:  # Pillow reads the image and ignores what follows it
        fh.write(bytes(MAX_MEMBER_BYTES))
    with pytest.raises(InputError, match=r"1234\.png: \d+ bytes is beyond"):
        scan_import(tmp_path)
