"""The Responses API's stored responses

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("conversation", sa.JSON(), nullable=False),
        sa.Column("inputs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_responses_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("seq", name="pk_responses"),
        sa.UniqueConstraint("id", name="uq_responses_id"),
    )
    op.create_index("ix_responses_tenant_id", "responses", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_responses_tenant_id", table_name="responses")
    op.drop_table("responses")
