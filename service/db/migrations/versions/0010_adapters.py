"""LoRA adapters as models: an upload's base, and the adapters each inference worker holds

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploaded_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base", sa.String(255), nullable=True))
    with op.batch_alter_table("inference_workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapters", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("inference_workers", schema=None) as batch_op:
        batch_op.drop_column("adapters")
    with op.batch_alter_table("uploaded_models", schema=None) as batch_op:
        batch_op.drop_column("base")
