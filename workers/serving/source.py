"""Where the served model comes from, and following a reference that moves.

``FolderSource`` serves one exported folder: no database, no torch. ``RegistrySource``
resolves a model reference through the registry (``shared.registry``), exports the
version it names once into a cache under ``CAPTRAIN_HOME/serve/`` and loads it; asked
again later, it says whether the reference now names another version (an alias that
moved, a newer version of a bare name) and loads that one.

``follow`` runs in a thread of its own: it loads the first runner, hands it to the
batcher, and polls the source, swapping in each new version.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.errors import CaptrainError
from workers.serving.runner import META_FILE, Runner, read_info

log = logging.getLogger("captrain.serve")


class Swapper(Protocol):
    """Where ``follow`` hands each runner (a Batcher)."""

    @property
    def current(self) -> Runner | None: ...

    def swap(self, runner: Runner) -> None: ...


class Source(Protocol):
    ref: str

    def load(self) -> Runner:
        """The runner of what the reference names now."""

    def moved(self) -> Runner | None:
        """A runner for the version the reference names now, or None if unchanged."""


class FolderSource:
    """One exported folder, read as it is."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        self.folder = folder
        self.ref = str(folder)
        self.threads = threads
        read_info(folder)  # a folder the server cannot serve is refused before it starts

    def load(self) -> Runner:
        return Runner(self.folder, self.ref, self.threads)

    def moved(self) -> Runner | None:
        return None


@dataclass(frozen=True)
class Version:
    """One registered model version, as the registry resolved a reference."""

    name: str
    version: int
    run_id: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def resolve(ref: str) -> Version:
    """The version ``ref`` names now. Raises SpecError, NotFound, and the database's
    errors as CaptrainErrors (shared.db)."""
    from shared.db import session_scope
    from shared.registry import resolve as registry_resolve

    with session_scope() as s:
        row = registry_resolve(s, ref)
        return Version(row.name, row.version, row.run_id)


class RegistrySource:
    """A registry reference, exported per version into ``cache`` and followed."""

    def __init__(self, ref: str, cache: Path, threads: int | None = None) -> None:
        self.ref = ref
        self.cache = cache
        self.threads = threads
        self.current: Version | None = None

    def load(self) -> Runner:
        return self._runner(resolve(self.ref))

    def moved(self) -> Runner | None:
        now = resolve(self.ref)
        return None if now == self.current else self._runner(now)

    def _runner(self, version: Version) -> Runner:
        runner = Runner(exported(version, self.cache), self.ref, self.threads)
        self.current = version
        return runner


def exported(version: Version, cache: Path) -> Path:
    """The ONNX export of ``version`` under ``cache``, made once per (name, version).

    Processes serving at once (``--workers``) export under one lock; the folder
    appears by an atomic rename, so a half-written export is never read.
    """
    folder = cache / version.label
    if (folder / META_FILE).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if (folder / META_FILE).is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.label}-", dir=cache))
        try:
            _export(version, tmp)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", version.label, folder)
    return folder


def _export(version: Version, out: Path) -> None:
    """Write the ``onnx`` export of run ``version.run_id`` into the empty folder ``out``
    through the exporter's Python API (it imports torch)."""
    from workers.export import export_model

    export_model(str(version.run_id), "onnx", out)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def follow(source: Source, batcher: Swapper, interval: float, stop: threading.Event) -> None:
    """Load the first runner into ``batcher`` (retrying every ``interval`` seconds
    until it loads), then poll ``source`` every ``interval`` seconds and swap in each
    new version. Returns when ``stop`` is set. Never raises: a failed poll keeps the
    version being served."""
    while batcher.current is None and not stop.is_set():
        try:
            runner = source.load()
        except CaptrainError as exc:
            log.error("cannot load %s: %s", source.ref, exc)
            stop.wait(interval)
            continue
        except Exception:
            log.exception("cannot load %s", source.ref)
            stop.wait(interval)
            continue
        batcher.swap(runner)
        log.info("serving %s from %s", runner.label, source.ref)
    while not stop.wait(interval):
        try:
            moved = source.moved()
        except CaptrainError as exc:
            log.warning("polling %s: %s; still serving %s", source.ref, exc,
                        batcher.current and batcher.current.label)
            continue
        except Exception:  # keep serving whatever a poll runs into
            log.exception("polling %s failed; still serving", source.ref)
            continue
        if moved is not None:
            batcher.swap(moved)
