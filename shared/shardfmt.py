"""The shard format: a plain tar that ``tar tf`` lists and any tool can unpack.

    manifest.json            {"format", "split", "start", "count", "labels", ...}
    00000000_0782.pgm        item ``start + 0``, labelled "0782"
    00000001_5521.pgm        ... (.png/.jpg when imported or asked for, .wav for audio)

Labels are in both the member names and the manifest; the reader checks that they
agree. Packing is deterministic (fixed mtime, owner and order), so a shard's bytes,
and its sha256, depend only on its items.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from shared.errors import ArtifactError

FORMAT = "captrain-shard/1"
MEDIA_TYPE = "application/x-tar"
# A member above this is not a captcha image or clip; refuse before reading it into memory.
MAX_MEMBER_BYTES = 16 * 1024 * 1024
_MEMBER = re.compile(r"^(\d{8,})_(.+)\.(pgm|png|jpg|jpeg|wav)$")


@dataclass(frozen=True)
class Item:
    index: int
    label: str
    data: bytes
    ext: str = "png"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(items: Sequence[Item], meta: dict[str, Any]) -> bytes:
    """Return the tar bytes of a shard holding ``items`` and manifest ``meta``."""
    manifest = dict(meta)
    manifest.update(format=FORMAT, count=len(items), labels=[it.label for it in items])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        body = json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode()
        tar.addfile(_info("manifest.json", len(body)), io.BytesIO(body))
        for it in items:
            name = f"{it.index:08d}_{it.label}.{it.ext}"
            tar.addfile(_info(name, len(it.data)), io.BytesIO(it.data))
    return buf.getvalue()


def unpack(data: bytes | io.BufferedIOBase | Any) -> tuple[dict[str, Any], Iterator[Item]]:
    """Open a shard; return its manifest and an iterator over its items.

    Raises ArtifactError for anything that is not a well-formed shard: not a tar, a
    missing or bad manifest, a member that is not an item, a label that disagrees
    with the manifest, or fewer items than the manifest counts.
    """
    fileobj = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 (closed by _items)
        first = tar.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArtifactError(f"shard is not a readable tar: {exc}") from exc
    if first is None or first.name != "manifest.json" or not first.isfile():
        raise ArtifactError("shard has no manifest.json as its first member")
    try:
        manifest = json.loads(_read(tar, first))
        labels = manifest["labels"]
        count = int(manifest["count"])
        if manifest.get("format") != FORMAT or len(labels) != count:
            raise ValueError("format or count mismatch")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"shard manifest is malformed: {exc}") from exc
    return manifest, _items(tar, labels)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_MEMBER_BYTES:
        raise ArtifactError(f"shard member {member.name} is {member.size} bytes, too large")
    fh = tar.extractfile(member)
    if fh is None:
        raise ArtifactError(f"shard member {member.name} is not a file")
    try:
        data = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArtifactError(f"shard member {member.name} is truncated") from exc
    if len(data) != member.size:
        raise ArtifactError(f"shard member {member.name} is truncated")
    return data


def _items(tar: tarfile.TarFile, labels: list[str]) -> Iterator[Item]:
    seen = 0
    try:
        # Iterating a TarFile starts again at its first member, the manifest.
        for member in islice(tar, 1, None):
            m = _MEMBER.match(member.name)
            if not member.isfile() or m is None:
                raise ArtifactError(f"shard member {member.name!r} is not an item")
            if seen >= len(labels) or m.group(2) != labels[seen]:
                raise ArtifactError(f"shard member {member.name!r} disagrees with the manifest")
            yield Item(int(m.group(1)), m.group(2), _read(tar, member), m.group(3))
            seen += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArtifactError(f"shard is truncated after {seen} items: {exc}") from exc
    finally:
        tar.close()
    if seen != len(labels):
        raise ArtifactError(f"shard is truncated: {seen} of {len(labels)} items")
