"""Per-epoch numbers of a run, written as upserts keyed by (run, epoch, split, name)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.db import insert_for
from shared.schema import Metric


def upsert_metrics(
    session: Session, run_id: int, epoch: int, split: str, values: dict[str, Any]
) -> None:
    """Write one epoch's numbers; a repeated epoch overwrites, never duplicates.
    Values that are not numbers (lists, confusion matrices) are skipped."""
    insert = insert_for(session)
    for name, value in values.items():
        if not isinstance(value, int | float):
            continue
        stmt = insert(Metric).values(
            run_id=run_id, epoch=epoch, split=split, name=name, value=float(value)
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["run_id", "epoch", "split", "name"],
                set_={"value": stmt.excluded.value},
            )
        )
