"""The SQL artifact store, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from sqlalchemy import func, select, update

from shared.artifacts import iter_chunks, put_stream, read_verified
from shared.db import session_scope
from shared.errors import ArtifactError
from shared.schema import Artifact, ArtifactChunk

CHUNK = 64 * 1024


def _put(data: bytes) -> str:
    with session_scope() as s:
        return put_stream(s, io.BytesIO(data), "application/octet-stream", chunk_bytes=CHUNK)


def test_an_artifact_is_chunked_addressed_by_sha256_and_read_back(backend):
    data = os.urandom(3 * CHUNK + 123)
    sha = _put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    with session_scope() as s:
        assert s.get(Artifact, sha).chunks == 4
        sizes = s.execute(
            select(func.length(ArtifactChunk.data)).where(ArtifactChunk.sha256 == sha)
            .order_by(ArtifactChunk.seq)
        ).scalars().all()
        assert sizes == [CHUNK, CHUNK, CHUNK, 123]
        assert read_verified(s, sha) == data
        # Streaming yields chunk by chunk, never the whole blob at once.
        assert [len(c) for c in iter_chunks(s, sha)] == sizes


def test_storing_the_same_bytes_twice_keeps_one_copy(backend):
    data = os.urandom(CHUNK + 1)
    assert _put(data) == _put(data)
    with session_scope() as s:
        n = s.execute(select(func.count()).select_from(ArtifactChunk).where(
            ArtifactChunk.sha256 == hashlib.sha256(data).hexdigest())).scalar_one()
    assert n == 2


def test_an_empty_artifact_round_trips(backend):
    sha = _put(b"")
    with session_scope() as s:
        assert read_verified(s, sha) == b""


def test_bytes_altered_in_sql_fail_the_hash_check(backend):
    data = os.urandom(2 * CHUNK)
    sha = _put(data)
    with session_scope() as s:
        s.execute(update(ArtifactChunk).where(ArtifactChunk.sha256 == sha,
                                              ArtifactChunk.seq == 1)
                  .values(data=os.urandom(CHUNK)))
    with session_scope() as s, pytest.raises(ArtifactError, match="sha256"):
        read_verified(s, sha)


def test_a_missing_chunk_or_artifact_is_an_artifact_error(backend):
    sha = _put(os.urandom(2 * CHUNK))
    with session_scope() as s:
        s.execute(ArtifactChunk.__table__.delete().where(ArtifactChunk.sha256 == sha,
                                                         ArtifactChunk.seq == 1))
    with session_scope() as s:
        with pytest.raises(ArtifactError, match="missing chunk"):
            read_verified(s, sha)
        with pytest.raises(ArtifactError, match="not in the store"):
            read_verified(s, "0" * 64)
