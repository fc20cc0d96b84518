"""Finding rows by what a user names them: a dataset by name, a model by reference
(through the registry), a finished run. Read-only; shared by the scheduler and the
workers."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound, StateError
from shared.registry import resolve
from shared.schema import DONE, Dataset, Model, Run
from shared.state import get_run


def find_dataset(session: Session, name: str) -> Dataset:
    """The dataset named ``name``. Raises NotFound."""
    ds = session.execute(select(Dataset).where(Dataset.name == name)).scalar_one_or_none()
    if ds is None:
        raise NotFound(f"no dataset named {name!r}")
    return ds


def finished_run(session: Session, run_id: int) -> tuple[Run, Dataset]:
    """The run ``run_id`` and its dataset, for work that needs a finished run (a report).

    Raises NotFound for an unknown run, StateError for one that is not done.
    """
    run = get_run(session, run_id)
    if run.status != DONE:
        raise StateError(f"run {run_id} is {run.status}; a report needs a finished run")
    dataset = session.get(Dataset, run.dataset_id)
    assert dataset is not None  # a foreign key
    return run, dataset


def find_model(session: Session, ref: str) -> Model:
    """The model version ``ref`` names: ``latest``, a run id, NAME, NAME@VERSION or
    NAME@ALIAS (``shared.registry.resolve``, which says what each means).

    Raises SpecError for a malformed reference, NotFound when nothing matches.
    """
    return resolve(session, ref)
