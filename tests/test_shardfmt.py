from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ArtifactError
from shared.shardfmt import Item, pack, unpack

ITEMS = [Item(10, "0782", b"\x89PNG fake 1"), Item(11, "5521", b"\x89PNG fake two")]


def test_pack_then_unpack_returns_the_same_items_and_manifest():
    data = pack(ITEMS, {"split": "train", "start": 10})
    manifest, items = unpack(data)
    assert manifest["labels"] == ["0782", "5521"]
    assert manifest["split"] == "train"
    assert list(items) == ITEMS


def test_packing_is_byte_identical_for_the_same_items():
    assert pack(ITEMS, {"a": 1}) == pack(list(ITEMS), {"a": 1})


def test_a_shard_is_a_plain_tar_with_labelled_member_names():
    with tarfile.open(fileobj=io.BytesIO(pack(ITEMS, {})), mode="r:") as tar:
        assert tar.getnames() == ["manifest.json", "00000010_0782.png", "00000011_5521.png"]


def test_a_truncated_shard_is_refused():
    data = pack(ITEMS, {})
    # Cuts inside the header, the manifest, and the last item's bytes (a cut in the
    # tar's zero padding loses nothing, and the artifact's sha256 catches it anyway).
    for cut in (10, data.index(b"labels"), data.index(b"fake two") + 3):
        with pytest.raises(ArtifactError):
            _, items = unpack(data[:cut])
            list(items)


def test_a_label_that_disagrees_with_the_manifest_is_refused():
    good = pack(ITEMS, {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(good)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name.endswith("5521.png"):
                member.name = member.name.replace("5521", "5522")
            dst.addfile(member, io.BytesIO(body))
    _, items = unpack(buf.getvalue())
    with pytest.raises(ArtifactError, match="disagrees"):
        list(items)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_artifact_error_or_a_valid_shard(blob):
    try:
        _, items = unpack(blob)
        list(items)
    except ArtifactError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=255))
def test_a_flipped_byte_never_escapes_as_another_exception(pos, value):
    data = bytearray(pack(ITEMS, {"split": "train"}))
    data[pos % len(data)] = value
    try:
        _, items = unpack(bytes(data))
        list(items)
    except ArtifactError:
        pass
