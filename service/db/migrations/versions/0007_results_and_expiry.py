"""OpenAI's file and job fields: a file's expiry (`expires_after`), a job's result files, and checkpoint
permissions (a checkpoint shared with another tenant)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_shares",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("checkpoint_id", sa.String(40), nullable=False),
        sa.Column("owner_id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["job_checkpoints.id"],
            name="fk_checkpoint_shares_checkpoint_id_job_checkpoints",
        ),
        sa.ForeignKeyConstraint(["owner_id"], ["tenants.id"], name="fk_checkpoint_shares_owner_id_tenants"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_checkpoint_shares_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoint_shares"),
        sa.UniqueConstraint("checkpoint_id", "tenant_id", name="uq_checkpoint_shares_checkpoint_id"),
    )
    op.create_index("ix_checkpoint_shares_checkpoint_id", "checkpoint_shares", ["checkpoint_id"])
    op.create_index("ix_checkpoint_shares_tenant_id", "checkpoint_shares", ["tenant_id"])
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_files", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_checkpoint_shares_tenant_id", table_name="checkpoint_shares")
    op.drop_index("ix_checkpoint_shares_checkpoint_id", table_name="checkpoint_shares")
    op.drop_table("checkpoint_shares")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("expires_at")
