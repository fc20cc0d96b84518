"""The model registry: every finished run is a numbered version of a named model.

A model's name is the run's ``TrainSpec.register`` (by default its dataset's name),
and its version the next number for that name. Users name models by reference:

    latest         the newest version of any name that is not archived
    RUN            a run id (digits): its version, archived or not
    NAME           the newest version of NAME that is not archived
    NAME@VERSION   that version, archived or not
    NAME@ALIAS     the version that ALIAS of NAME points at (``production``, ...)

An alias points at one version of its name and moves with one upsert; it never
points at an archived version. Each version keeps its lineage: what it was trained
on and with, and what it scored. Torch-free: the scheduler imports it.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import insert_for
from shared.errors import NotFound, SpecError, StateError
from shared.schema import Dataset, Job, Metric, Model, ModelAlias, Run, Shard, utcnow
from shared.spec import NAME_PATTERN

LATEST = "latest"
MAX_ID = 2**31  # ids and versions are 32-bit integer columns
# Two runs of one name finishing at once can both read the same next version; the
# unique (name, version) key refuses the second, which takes the next number. Each
# retry follows a commit by another finisher, so a few always suffice.
REGISTER_ATTEMPTS = 8
# The jobs that build a dataset's rows and shards; train, explore and report read it.
BUILD_KINDS = ("generate", "import", "split")
# The speedup flags the loop records with each epoch's train metrics (workers.device).
SPEEDUPS = ("bf16", "channels_last", "cudnn_benchmark", "compiled")


@dataclass(frozen=True)
class Ref:
    """A parsed model reference: ``kind`` is latest, run, name, version or alias."""

    kind: str
    name: str = ""
    version: int = 0
    alias: str = ""
    run_id: int = 0


def parse_ref(ref: str) -> Ref:
    """Parse a model reference (see the module docstring). Raises SpecError for a
    malformed one, with the shape it should have."""
    if ref == LATEST:
        return Ref(LATEST)
    if ref.isascii() and ref.isdecimal():
        return Ref("run", run_id=int(ref))
    name, at, tail = ref.partition("@")
    if not re.match(NAME_PATTERN, name):
        raise SpecError(f"model {ref!r} is not NAME, NAME@VERSION, NAME@ALIAS, a run id "
                        "or latest")
    if not at:
        return Ref("name", name)
    if not tail:
        raise SpecError(f"model {ref!r}: a version or an alias goes after '@'")
    if tail.isascii() and tail.isdecimal():
        if int(tail) < 1:
            raise SpecError(f"model {ref!r}: versions count from 1")
        return Ref("version", name, version=int(tail))
    if tail == LATEST:
        return Ref("name", name)
    check_alias(tail, f"model {ref!r}: ")
    return Ref("alias", name, alias=tail)


def check_alias(alias: str, context: str = "") -> None:
    """Raise SpecError unless ``alias`` is a plain name that is neither all digits
    (a version) nor ``latest``."""
    if not re.match(NAME_PATTERN, alias) or alias.isdecimal() or alias == LATEST:
        raise SpecError(f"{context}alias {alias!r} must be a plain name (letters, digits, "
                        "'.', '_', '-'), not a number and not 'latest'")


def _newest(session: Session, *where: Any) -> Model | None:
    return session.execute(
        select(Model).where(Model.archived.is_(False), *where)
        .order_by(Model.created_at.desc(), Model.id.desc()).limit(1)
    ).scalar_one_or_none()


def _known(session: Session, name: str) -> None:
    if session.execute(select(Model.id).where(Model.name == name).limit(1)).first() is None:
        raise NotFound(f"no trained model named {name!r}")


def resolve(session: Session, ref: str) -> Model:
    """The model version ``ref`` names. Raises SpecError for a malformed reference,
    NotFound when it names nothing (an unknown name, version, alias or run, or a name
    whose every version is archived)."""
    r = parse_ref(ref)
    row: Model | None
    if r.kind == LATEST:
        row = _newest(session)
        if row is None:
            raise NotFound("no trained model yet (none that is not archived)")
        return row
    if r.kind == "run":
        row = None if r.run_id >= MAX_ID else session.execute(
            select(Model).where(Model.run_id == r.run_id)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no trained model for run {r.run_id}")
        return row
    if r.kind == "name":
        row = _newest(session, Model.name == r.name)
        if row is None:
            _known(session, r.name)
            raise NotFound(f"every version of model {r.name} is archived: name one as "
                           f"{r.name}@VERSION")
        return row
    if r.kind == "version":
        row = None if r.version >= MAX_ID else session.execute(
            select(Model).where(Model.name == r.name, Model.version == r.version)
        ).scalar_one_or_none()
        if row is None:
            _known(session, r.name)
            raise NotFound(f"model {r.name} has no version {r.version}")
        return row
    row = session.execute(
        select(Model).join(ModelAlias, ModelAlias.model_id == Model.id)
        .where(ModelAlias.name == r.name, ModelAlias.alias == r.alias)
    ).scalar_one_or_none()
    if row is None:
        _known(session, r.name)
        raise NotFound(f"model {r.name} has no alias {r.alias!r}")
    return row


def resolve_version(session: Session, ref: str, lock: bool = False) -> Model:
    """Like ``resolve``, for a command that changes one version: ``ref`` must name
    it explicitly (NAME@VERSION or a run id), so that a repeated command cannot walk
    on to another version. ``lock`` holds the row until the transaction ends.
    Raises SpecError, NotFound."""
    if parse_ref(ref).kind not in ("version", "run"):
        raise SpecError(f"name one version: {ref.partition('@')[0]}@VERSION or a run id, "
                        f"not {ref!r}")
    row = resolve(session, ref)
    if not lock:
        return row
    # PostgreSQL: an alias move and an archive of one version wait for each other, so
    # an alias never ends on an archived version. SQLite has one writer at a time.
    return session.execute(
        select(Model).where(Model.id == row.id).with_for_update()
        .execution_options(populate_existing=True)).scalar_one()


def next_version(session: Session, name: str) -> int:
    """The version the next model named ``name`` gets: one above its highest."""
    top = session.execute(select(func.max(Model.version)).where(Model.name == name)).scalar()
    return int(top or 0) + 1


def register(session: Session, *, run_id: int, name: str, **values: Any) -> Model:
    """Insert the model of run ``run_id`` as the next version of ``name``, inside the
    caller's transaction, and return it; the version already stored for the run if
    there is one (registering is idempotent). ``values`` are the other columns.

    Raises StateError if other finishers keep taking the next version.
    """
    for _ in range(REGISTER_ATTEMPTS):
        row = session.execute(select(Model).where(Model.run_id == run_id)).scalar_one_or_none()
        if row is not None:
            return row
        row = Model(run_id=run_id, name=name, version=next_version(session, name), **values)
        try:
            # A savepoint: on PostgreSQL a failed INSERT spoils the whole transaction.
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            continue  # another run took this version (or, a duplicate, this run)
    raise StateError(f"could not register run {run_id} as a version of {name}: "
                     f"{REGISTER_ATTEMPTS} others finished meanwhile")


def aliases(session: Session, model_ids: list[int] | None = None) -> dict[int, list[str]]:
    """The aliases of each version (by model id) that has any, sorted by name."""
    query = select(ModelAlias.model_id, ModelAlias.alias).order_by(ModelAlias.alias)
    if model_ids is not None:
        query = query.where(ModelAlias.model_id.in_(model_ids))
    out: dict[int, list[str]] = {}
    for model_id, alias in session.execute(query).all():
        out.setdefault(model_id, []).append(alias)
    return out


def set_alias(session: Session, ref: str, alias: str) -> Model:
    """Point ``alias`` of the version ``ref`` names (NAME@VERSION or a run id) at it,
    moving the alias from another version of the name if it was there. Returns the
    version. Raises SpecError for a bad alias or an inexplicit ref, NotFound, and
    StateError for an archived version."""
    check_alias(alias)
    row = resolve_version(session, ref, lock=True)
    if row.archived:
        raise StateError(f"model {row.name}@{row.version} is archived; an alias names a "
                         "version in use (unarchive it first)")
    # One row per (name, alias): moving an alias is this one upsert.
    stmt = insert_for(session)(ModelAlias).values(
        name=row.name, alias=alias, model_id=row.id, updated_at=utcnow())
    session.execute(stmt.on_conflict_do_update(
        index_elements=["name", "alias"],
        set_={"model_id": stmt.excluded.model_id, "updated_at": stmt.excluded.updated_at}))
    return row


def archive(session: Session, ref: str, archived: bool = True) -> Model:
    """Archive (or with ``archived=False`` restore) the version ``ref`` names
    explicitly. Returns it. Raises SpecError, NotFound, and StateError when an alias
    points at the version: archiving it would leave the alias naming a retired model."""
    row = resolve_version(session, ref, lock=True)
    held = aliases(session, [row.id]).get(row.id, [])
    if archived and held:
        raise StateError(f"model {row.name}@{row.version} is {', '.join(held)}: move "
                         "the alias to another version first")
    session.execute(update(Model).where(Model.id == row.id).values(archived=archived))
    session.refresh(row)
    return row


def versions(session: Session) -> list[Model]:
    """Every version of every model, by name, newest version first."""
    return list(session.execute(
        select(Model).order_by(Model.name, Model.version.desc())).scalars())


# --- lineage ---------------------------------------------------------------------------

def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit checked out where this package runs from, or None: installed from
    a wheel, no git, or the checkout of some other project around the install."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    # Only captrain's own checkout: its top is the folder that holds this package.
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def environment() -> dict[str, Any]:
    """What this process runs: captrain's version and commit, torch's and captcha's
    versions. Read before a transaction opens (it runs git)."""
    return {"captrain_version": _version_of("captrain"), "git_commit": git_commit(),
            "torch_version": _version_of("torch"), "captcha_version": _version_of("captcha")}


def _dataset_lineage(session: Session, ds: Dataset) -> dict[str, Any]:
    """The dataset as training read it: what built it and its layout's shard hashes."""
    built = session.execute(
        select(Job).where(Job.dataset_id == ds.id, Job.kind.in_(BUILD_KINDS)).order_by(Job.id)
    ).scalars().all()
    origin = next((j for j in built if j.kind != "split"), None)
    layout = next((j for j in built if j.id == ds.layout_job_id), None)
    shards = session.execute(
        select(Shard.sha256).where(Shard.job_id == ds.layout_job_id).order_by(Shard.index)
    ).scalars().all() if ds.layout_job_id is not None else []
    return {
        "id": ds.id, "name": ds.name, "kind": ds.kind, "meta": ds.meta,
        "job": origin.id if origin else None, "spec": origin.spec if origin else None,
        "layout_job": ds.layout_job_id,
        # A re-split dataset reads the split job's shards: its spec says how they were cut.
        "split_spec": layout.spec if layout is not None and layout.kind == "split" else None,
        "shards": list(shards),
    }


def lineage(session: Session, run_id: int, test: dict[str, Any],
            env: dict[str, Any]) -> dict[str, Any]:
    """Everything that produced run ``run_id``'s model, as JSON: the dataset (its
    build spec and shard hashes in index order), the training spec, the settings
    (passwords redacted at submission), ``env`` (``environment()``), the device and
    the speedups of its last epoch, and the test metrics."""
    run = session.get(Run, run_id)
    assert run is not None  # the caller holds the run's lease
    job = session.get(Job, run.job_id)
    ds = session.get(Dataset, run.dataset_id)
    assert job is not None and ds is not None  # foreign keys
    last = session.execute(
        select(Metric.epoch).where(Metric.run_id == run_id, Metric.split == "train")
        .order_by(Metric.epoch.desc()).limit(1)).scalar()
    flags = dict(session.execute(
        select(Metric.name, Metric.value).where(
            Metric.run_id == run_id, Metric.split == "train", Metric.epoch == last,
            Metric.name.in_(SPEEDUPS))).all()) if last is not None else {}
    return {
        "run": run.id, "job": job.id, "dataset": _dataset_lineage(session, ds),
        "train_spec": job.spec, "settings": job.settings, **env,
        "device": run.device, "speedups": {k: bool(v) for k, v in sorted(flags.items())},
        # The confusion matrices stay in the model's metrics: here they would only
        # double the size of what `captrain model` prints.
        "test": {k: v for k, v in test.items() if k != "confusion"},
    }
