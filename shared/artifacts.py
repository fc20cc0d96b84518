"""Content-addressed artifact store in SQL.

An artifact is keyed by the sha256 of its bytes and stored as ordered chunk rows of
at most ``CAPTRAIN_ARTIFACT_CHUNK_BYTES`` each, so no row holds a whole model or
dataset and neither side ever holds one in memory. The artifact row and all its
chunks are written in one transaction: a reader never sees a partial artifact.
Reads stream chunk by chunk and verify the hash at the end.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from sqlalchemy import Column, delete, exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import insert_for
from shared.errors import ArtifactError
from shared.schema import Artifact, ArtifactChunk, Base
from shared.settings import get_settings


def put_stream(
    session: Session, stream: BinaryIO, media_type: str, chunk_bytes: int | None = None
) -> str:
    """Store the bytes read from ``stream`` and return their sha256 (hex).

    Storing bytes that are already present writes nothing. The caller's session
    commits; two writers of the same bytes at once both succeed with one copy.
    """
    chunk_bytes = chunk_bytes or get_settings().artifact_chunk_bytes
    # Hash first, into a spool file, so that a duplicate costs no chunk writes and the
    # bytes are never all in memory.
    digest = hashlib.sha256()
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=chunk_bytes * 4) as spool:
        while block := stream.read(chunk_bytes):
            digest.update(block)
            spool.write(block)
            size += len(block)
        sha = digest.hexdigest()
        if session.get(Artifact, sha) is not None:
            return sha
        spool.seek(0)
        n_chunks = -(-size // chunk_bytes) if size else 0
        insert = insert_for(session)
        try:
            with session.begin_nested():
                session.execute(
                    insert(Artifact)
                    .values(sha256=sha, size=size, chunks=n_chunks, media_type=media_type)
                    .on_conflict_do_nothing()
                )
                for seq in range(n_chunks):
                    session.execute(
                        insert(ArtifactChunk)
                        .values(sha256=sha, seq=seq, data=spool.read(chunk_bytes))
                        .on_conflict_do_nothing()
                    )
        except IntegrityError:
            # A concurrent writer committed the same sha first: same bytes, done.
            pass
    return sha


def put_bytes(session: Session, data: bytes, media_type: str) -> str:
    """Store ``data``; see :func:`put_stream`."""
    return put_stream(session, io.BytesIO(data), media_type)


def iter_chunks(session: Session, sha256: str) -> Iterator[bytes]:
    """Yield the artifact's bytes chunk by chunk, then check size and sha256.

    Raises ArtifactError if the artifact is missing, has a missing chunk, or its bytes
    do not hash to ``sha256`` (tampered or corrupt). The error comes after the last
    chunk: a caller that must not act on bad bytes before the check uses
    :func:`read_verified`.
    """
    art = session.get(Artifact, sha256)
    if art is None:
        raise ArtifactError(f"artifact {sha256[:12]} is not in the store")
    digest = hashlib.sha256()
    size = 0
    seq = -1
    for seq in range(art.chunks):
        data = session.execute(
            select(ArtifactChunk.data).where(
                ArtifactChunk.sha256 == sha256, ArtifactChunk.seq == seq
            )
        ).scalar_one_or_none()
        if data is None:
            raise ArtifactError(f"artifact {sha256[:12]} is missing chunk {seq}")
        digest.update(data)
        size += len(data)
        yield bytes(data)
    if size != art.size or digest.hexdigest() != sha256:
        raise ArtifactError(
            f"artifact {sha256[:12]} failed its sha256 check ({size} of {art.size} bytes)"
        )


def read_verified(session: Session, sha256: str) -> bytes:
    """Return the whole artifact, only after its hash checked out. For small artifacts."""
    return b"".join(iter_chunks(session, sha256))


def referencing_columns() -> list[Column[Any]]:
    """Every column that holds artifact keys: each foreign key to ``artifacts.sha256``
    but the artifact's own chunks.

    Read from the schema rather than listed by hand, so that a table added later (as
    ``analysis_files`` was) can never hold a key to an artifact that gets deleted.
    """
    chunks = ArtifactChunk.__table__
    key = Artifact.__table__.c.sha256
    return [fk.parent for table in Base.metadata.sorted_tables if table is not chunks
            for fk in table.foreign_keys if fk.column is key]


def delete_if_unreferenced(session: Session, sha256: str) -> bool:
    """Delete an artifact that no row points at any more: no shard, run checkpoint,
    model or analysis file (see :func:`referencing_columns`).

    Returns True if it was deleted. Content addressing means two rows may share one
    artifact, so the check looks at every table that holds artifact keys.
    """
    used = session.execute(select(or_(
        *(exists().where(column == sha256) for column in referencing_columns())
    ))).scalar()
    if used:
        return False
    session.execute(delete(ArtifactChunk).where(ArtifactChunk.sha256 == sha256))
    session.execute(delete(Artifact).where(Artifact.sha256 == sha256))
    return True
