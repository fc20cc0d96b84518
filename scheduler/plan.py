"""Planning: turn a validated spec into SQL rows in one transaction, then enqueue.

The rows are written and committed before any message is sent. A message lost
after the commit is recovered by ``reconcile`` from the rows; a message can never
name a row that does not exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import shardfmt
from shared.artifacts import put_bytes
from shared.db import session_scope
from shared.errors import InputError, NotFound, SpecError, StateError
from shared.images import IMAGE_SUFFIXES, check_image
from shared.kinds import KINDS, image_input_size, kind_of
from shared.lookup import find_dataset
from shared.schema import READY, SPLITS, Dataset, Job, Shard
from shared.settings import get_settings
from shared.spec import (
    CRNN_COLUMNS_PER_STEP,
    CTC_MODELS,
    MIN_INPUT,
    GenerateSpec,
    SplitSpec,
    SweepSpec,
    TrainSpec,
    derive_seed,
    resolve_charset,
    validate,
)
from shared.state import (
    IMPORTED,
    new_train_job,
    record_builtin,
    record_done_import,
    relayout,
    stored_shard,
)

AUDIO_SAMPLE_RATE = 8000  # captcha's AudioCaptcha writes 8 kHz clips


def _settings_record() -> dict[str, Any]:
    return get_settings().redacted()


def _split_shards(counts: dict[str, int], shard_size: int) -> Iterator[tuple[str, int, int]]:
    """(split, start within split, count) for each shard, train first."""
    for split in SPLITS:
        n = counts[split]
        for start in range(0, n, shard_size):
            yield split, start, min(shard_size, n - start)


def _new_dataset(session: Session, **values: Any) -> Dataset:
    ds = Dataset(**values)
    session.add(ds)
    try:
        session.flush()
    except IntegrityError as exc:
        raise SpecError(f"a dataset named {values['name']!r} already exists") from exc
    return ds


def plan_generate(spec: GenerateSpec) -> tuple[int, list[int]]:
    """Write the job, dataset and shard rows. Returns (job id, shard indices)."""
    with session_scope() as s:
        if s.execute(select(Dataset.id).where(Dataset.name == spec.name)).first():
            raise SpecError(f"a dataset named {spec.name!r} already exists")
        job = Job(kind="generate", spec=spec.model_dump(), settings=_settings_record())
        s.add(job)
        s.flush()
        audio = spec.kind == "audio"
        meta: dict[str, Any] = {"min_length": spec.min_length} if spec.min_length else {}
        if audio:
            meta["sample_rate"] = AUDIO_SAMPLE_RATE
        ds = _new_dataset(
            s, name=spec.name, kind="audio" if audio else "captcha", charset=spec.charset,
            length=spec.length, width=0 if audio else spec.width,
            height=0 if audio else spec.height, count=spec.count, layout_job_id=job.id,
            meta=meta,
        )
        job.dataset_id = ds.id
        shards = [
            Shard(job_id=job.id, dataset_id=ds.id, index=i, split=split, start=start,
                  count=count, seed=derive_seed(spec.seed, i))
            for i, (split, start, count) in enumerate(
                _split_shards(spec.split.counts(spec.count), spec.shard_size)
            )
        ]
        s.add_all(shards)
        return job.id, [sh.index for sh in shards]


@dataclass
class ImportPlan:
    files: list[tuple[Path, str]]
    charset: str
    length: int
    width: int
    height: int


def scan_import(folder: Path) -> ImportPlan:
    """Check every image of ``folder`` before anything is written.

    Raises InputError naming the first file that is not a readable image, or whose
    stem (its label) has a different length from the others.
    """
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no .png or .jpg images")
    length = len(files[0].stem.split("_")[-1])
    size = None
    for path in files:
        label = path.stem.split("_")[-1]
        if len(label) != length or not label:
            raise InputError(f"{path}: label {label!r} is not {length} characters like the rest")
        if (nbytes := path.stat().st_size) > shardfmt.MAX_MEMBER_BYTES:
            raise InputError(f"{path}: {nbytes} bytes is beyond the {shardfmt.MAX_MEMBER_BYTES} "
                             "bytes a shard item may hold")
        w, h = check_image(path)
        size = size or (w, h)
    chars = "".join(sorted({c for p in files for c in p.stem.split("_")[-1]}))
    try:
        charset = resolve_charset(chars)
    except SpecError as exc:
        raise InputError(f"{folder}: labels cannot be used: {exc}") from exc
    assert size is not None
    return ImportPlan([(p, p.stem.split("_")[-1]) for p in files], charset, length, *size)


def plan_import(
    folder: Path, name: str, shard_size: int, progress: Callable[[int], None] | None = None
) -> int:
    """Store a folder of labelled images as source shards of a new dataset.

    Runs here, not on a worker, because the files are on this machine. Everything is
    written in one transaction: a failure leaves no rows. Returns the job id.
    """
    plan = scan_import(folder)
    with session_scope() as s:
        if s.execute(select(Dataset.id).where(Dataset.name == name)).first():
            raise SpecError(f"a dataset named {name!r} already exists")
        spec = {"dir": str(folder.resolve()), "name": name, "shard_size": shard_size}
        job = Job(kind="import", spec=spec, settings=_settings_record())
        s.add(job)
        s.flush()
        ds = _new_dataset(
            s, name=name, kind="imported", charset=plan.charset,
            length=plan.length, width=plan.width, height=plan.height, count=len(plan.files),
        )
        job.dataset_id = ds.id
        record_done_import(job, ds, ready=False)
        for index, start in enumerate(range(0, len(plan.files), shard_size)):
            chunk = plan.files[start : start + shard_size]
            items = [
                shardfmt.Item(start + i, label, path.read_bytes(),
                              path.suffix.lower().lstrip("."))
                for i, (path, label) in enumerate(chunk)
            ]
            meta = {"split": "source", "start": start,
                    "charset": plan.charset, "length": plan.length}
            sha = put_bytes(s, shardfmt.pack(items, meta), shardfmt.MEDIA_TYPE)
            s.add(stored_shard(job_id=job.id, dataset_id=ds.id, index=index, split="source",
                               start=start, count=len(items), seed=0, sha256=sha))
            if progress:
                progress(len(items))
        return job.id


def plan_split(spec: SplitSpec) -> tuple[int, list[int]]:
    """Write a split job and its output shard rows for an imported dataset."""
    with session_scope() as s:
        ds = find_dataset(s, spec.dataset)
        source = s.execute(
            select(Job).where(Job.dataset_id == ds.id, Job.kind == "import").limit(1)
        ).scalar_one_or_none()
        if source is None:
            raise StateError(f"dataset {ds.name} was not imported; only imports are re-split")
        counts = spec.split.counts(ds.count)
        body = spec.model_copy(update={"source_job_id": source.id}).model_dump()
        job = Job(kind="split", spec=body, settings=_settings_record(), dataset_id=ds.id)
        s.add(job)
        s.flush()
        relayout(ds)
        shards = [
            Shard(job_id=job.id, dataset_id=ds.id, index=i, split=split, start=start,
                  count=count, seed=derive_seed(spec.seed, i))
            for i, (split, start, count) in enumerate(_split_shards(counts, spec.shard_size))
        ]
        s.add_all(shards)
        return job.id, [sh.index for sh in shards]


def _builtin_dataset(session: Session, name: str) -> Dataset | None:
    """The datasets that ship with the code (Iris, from scikit-learn), registered on
    first use so that runs and models can point at a row."""
    kind = KINDS.get(name)
    if kind is None or not kind.builtin:
        return None
    ds = _new_dataset(session, name=name, kind=name, charset="", length=1, width=4,
                      height=0, count=150, meta={"source": "sklearn.datasets.load_iris"})
    record_builtin(ds)
    return ds


def check_model_fits(ds: Dataset, model: str, scale: float | None = None) -> None:
    """Raise SpecError when ``model`` cannot learn dataset ``ds`` at ``scale``."""
    kind = kind_of(ds.kind)
    if model not in kind.models:
        raise SpecError(f"model {model} does not fit dataset {ds.name} ({ds.kind}): "
                        f"it takes {', '.join(kind.models)}")
    shortest = ds.meta.get("min_length") or ds.length
    if shortest != ds.length and model not in CTC_MODELS:
        raise SpecError(f"dataset {ds.name} holds texts of {shortest} to {ds.length} "
                        f"characters; model {model} reads a fixed length: use --model crnn")
    if not kind.images:
        return  # audio: a spectrogram of the clip's length, which the train job sizes
    height, width = image_input_size(ds.kind, ds.height, ds.width, scale)
    min_height, min_width = MIN_INPUT[model]
    seen = f"dataset {ds.name}'s {ds.width}x{ds.height} images give {width}x{height} px"
    if height < min_height or width < min_width:
        raise SpecError(f"model {model} needs an input of at least {min_width}x{min_height} "
                        f"px and {seen}: use a larger --scale or larger images")
    steps = width // CRNN_COLUMNS_PER_STEP
    if model in CTC_MODELS and steps < 2 * ds.length - 1:
        raise SpecError(f"crnn reads {ds.length} characters in {steps} time steps when "
                        f"{seen}; it needs {2 * ds.length - 1} (a blank between repeated "
                        "characters): use a larger --scale or wider images")


def check_time_limit(spec: TrainSpec) -> None:
    """Raise SpecError unless the spec's hard time limit stays below the broker's
    visibility timeout: Redis redelivers an unacknowledged message after it, so a
    task allowed to run longer would be delivered again while it runs."""
    vt = get_settings().visibility_timeout
    if spec.time_limit >= vt:
        raise SpecError(f"time limit {spec.time_limit} s must stay below "
                        f"CAPTRAIN_VISIBILITY_TIMEOUT ({vt} s)")


def plan_train(spec: TrainSpec) -> tuple[int, int]:
    """Write the train job and run rows. Returns (run id, job id).

    Raises SpecError for a time limit the broker cannot honour or a model that does
    not fit the dataset, NotFound, or StateError for a dataset that is not ready.
    """
    check_time_limit(spec)
    with session_scope() as s:
        try:
            ds = find_dataset(s, spec.dataset)
        except NotFound:
            found = _builtin_dataset(s, spec.dataset)
            if found is None:
                raise
            ds = found
        check_model_fits(ds, spec.model, spec.scale)
        if ds.status != READY:
            raise StateError(
                f"dataset {ds.name} is {ds.status}, not ready"
                + ("; run `captrain shard` first" if ds.status == IMPORTED else "")
            )
        # The stored spec names the model the run registers as, not "the default".
        spec = spec.model_copy(update={"register": spec.register or ds.name})
        return new_train_job(s, spec.model_dump(), _settings_record(), ds.id, spec.model)


def plan_sweep(*, dataset: str, trials: int, parallel: int, metric: str, space: list[str],
               pruner: str, sampler: str, seed: int, register: str | None,
               base: dict[str, Any]) -> int:
    """Write the sweep job for ``space`` (``shared.space`` texts) over ``dataset``, with
    ``base`` the train-spec values every trial shares. Returns the sweep's job id; its
    first step asks for trials once sent.

    Every value a dimension can draw is checked here, against the train spec, the
    visibility timeout and the dataset (each model a choice names must fit it at
    each scale it can draw), so no trial is refused later. Raises SpecError,
    NotFound, or StateError for a dataset that is not ready; nothing is written then.
    """
    from shared.space import combinations, grid_size, parse_space

    fixed = validate(TrainSpec, dataset=dataset, **base)
    check_time_limit(fixed)
    dims = parse_space(space, {"dataset": dataset, **base}, grid=sampler == "grid")
    if sampler == "grid":
        trials = min(trials, grid_size(dims))  # a grid has so many points, and no more
    spec = validate(SweepSpec, dataset=dataset, trials=trials, parallel=parallel,
                    metric=metric, space=[d.to_dict() for d in dims], sampler=sampler,
                    pruner=pruner, seed=seed, base=base, register=register)
    with session_scope() as s:
        ds = find_dataset(s, dataset)
        if kind_of(ds.kind).modality == "table":
            raise SpecError(f"dataset {ds.name} is a table: its runs cross-validate in "
                            "seconds and have no epochs to sweep and prune")
        for combo in combinations(dims, "model"):
            check_model_fits(ds, combo.get("model", fixed.model),
                             combo.get("scale", fixed.scale))
        if ds.status != READY:
            raise StateError(f"dataset {ds.name} is {ds.status}, not ready")
        job = Job(kind="sweep", spec=spec.model_dump(), settings=_settings_record(),
                  dataset_id=ds.id)
        s.add(job)
        s.flush()
        return job.id
