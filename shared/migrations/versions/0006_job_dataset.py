"""a job names its dataset (jobs.dataset_id)

The dataset a job builds (generate, split, import) or reads (train, report) was
reached through the job's shards or its run. A column says it directly; existing
jobs get it from their shards, then from their run.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("dataset_id", sa.Integer))
shards = sa.table("shards", sa.column("job_id", sa.Integer), sa.column("dataset_id", sa.Integer))
runs = sa.table("runs", sa.column("job_id", sa.Integer), sa.column("dataset_id", sa.Integer))


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dataset_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_jobs_dataset_id_datasets"), "datasets",
                                    ["dataset_id"], ["id"])
        batch_op.create_index(batch_op.f("ix_jobs_dataset_id"), ["dataset_id"], unique=False)
    for rows in (shards, runs):
        owned = (sa.select(rows.c.dataset_id).where(rows.c.job_id == jobs.c.id)
                 .limit(1).scalar_subquery())
        op.get_bind().execute(jobs.update().where(jobs.c.dataset_id.is_(None))
                              .values(dataset_id=owned))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_dataset_id"))
        batch_op.drop_constraint(batch_op.f("fk_jobs_dataset_id_datasets"), type_="foreignkey")
        batch_op.drop_column("dataset_id")
