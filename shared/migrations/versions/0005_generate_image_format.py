"""generate specs name their image format (image jobs planned before it stored PNG)

A generate spec gained ``image_format`` (default ``pgm``). A job planned before that
rendered PNG, so its stored spec is given ``png``: a shard it re-renders after the
upgrade (a retry, a reconcile) comes out byte-identical to its siblings.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("kind", sa.String),
                sa.column("spec", sa.JSON))


def _generate_specs() -> list[tuple[int, dict[str, Any]]]:
    rows = op.get_bind().execute(sa.select(jobs.c.id, jobs.c.spec)
                                 .where(jobs.c.kind == "generate"))
    return [(job_id, dict(spec)) for job_id, spec in rows]


def _set_spec(job_id: int, spec: dict[str, Any]) -> None:
    op.get_bind().execute(jobs.update().where(jobs.c.id == job_id).values(spec=spec))


def upgrade() -> None:
    for job_id, spec in _generate_specs():
        if "image_format" not in spec and spec.get("kind", "image") == "image":
            _set_spec(job_id, {**spec, "image_format": "png"})


def downgrade() -> None:
    specs = _generate_specs()
    grey = [job_id for job_id, spec in specs
            if spec.get("kind", "image") == "image" and spec.get("image_format") == "pgm"]
    if grey:
        raise RuntimeError(
            f"generate jobs {', '.join(map(str, grey))} store grey PGM images, which "
            "revision 0004 cannot read: delete their datasets before downgrading")
    for job_id, spec in specs:
        if "image_format" in spec:
            _set_spec(job_id, {k: v for k, v in spec.items() if k != "image_format"})
