"""model registry: names, versions, archived flag, lineage; model aliases

A model becomes a version of a name (shared.registry). Existing models become the
versions of their dataset's name, numbered by (created_at, id). Their lineage holds
what SQL still tells truly: the dataset, the run's spec, settings and device, and
the test metrics; what was not recorded then (shard hashes, package versions,
speedups) is None, since a dataset may have been re-split since.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

models = sa.table(
    "models", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer),
    sa.column("dataset_id", sa.Integer), sa.column("name", sa.String),
    sa.column("version", sa.Integer), sa.column("metrics", sa.JSON),
    sa.column("lineage", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)))
datasets = sa.table("datasets", sa.column("id", sa.Integer), sa.column("name", sa.String),
                    sa.column("kind", sa.String), sa.column("meta", sa.JSON))
runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("job_id", sa.Integer),
                sa.column("device", sa.String))
jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("spec", sa.JSON),
                sa.column("settings", sa.JSON))


def _lineage(row: sa.Row) -> dict:
    dataset = {"id": row.dataset_id, "name": row.dataset, "kind": row.kind, "meta": row.meta,
               "job": None, "spec": None, "layout_job": None, "split_spec": None,
               "shards": None}
    return {"run": row.run_id, "job": row.job_id, "dataset": dataset,
            "train_spec": row.spec, "settings": row.settings, "captrain_version": None,
            "git_commit": None, "torch_version": None, "captcha_version": None,
            "device": row.device, "speedups": None, "test": row.metrics,
            "registered_by": "migration 0007"}


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("archived", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("lineage", sa.JSON(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(models.c.id, models.c.run_id, models.c.dataset_id, models.c.metrics,
                  datasets.c.name.label("dataset"), datasets.c.kind, datasets.c.meta,
                  runs.c.job_id, runs.c.device, jobs.c.spec, jobs.c.settings)
        .join(datasets, datasets.c.id == models.c.dataset_id)
        .join(runs, runs.c.id == models.c.run_id)
        .join(jobs, jobs.c.id == runs.c.job_id)
        .order_by(datasets.c.name, models.c.created_at, models.c.id)
    ).all()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.dataset] = version = counts.get(row.dataset, 0) + 1
        conn.execute(models.update().where(models.c.id == row.id).values(
            name=row.dataset, version=version, lineage=_lineage(row)))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.alter_column("name", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("version", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("lineage", existing_type=sa.JSON(), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_models_name_version"),
                                          ["name", "version"])
    op.create_table(
        "model_aliases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"],
                                name=op.f("fk_model_aliases_model_id_models")),
        sa.PrimaryKeyConstraint("name", "alias", name=op.f("pk_model_aliases")),
    )
    op.create_index(op.f("ix_model_aliases_model_id"), "model_aliases", ["model_id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_model_aliases_model_id"), table_name="model_aliases")
    op.drop_table("model_aliases")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_models_name_version"), type_="unique")
        batch_op.drop_column("lineage")
        batch_op.drop_column("archived")
        batch_op.drop_column("version")
        batch_op.drop_column("name")
