"""analyses, analysis files and dataset meta

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("meta", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_analyses_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
        sa.UniqueConstraint("job_id", name=op.f("uq_analyses_job_id")),
    )
    op.create_table(
        "analysis_files",
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"],
                                name=op.f("fk_analysis_files_analysis_id_analyses")),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"],
                                name=op.f("fk_analysis_files_sha256_artifacts")),
        sa.PrimaryKeyConstraint("analysis_id", "name", name=op.f("pk_analysis_files")),
    )


def downgrade() -> None:
    op.drop_table("analysis_files")
    op.drop_table("analyses")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("meta")
