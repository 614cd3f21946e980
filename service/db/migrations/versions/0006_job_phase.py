"""Job phase: what the running step is doing now (its phase, since when, how long it usually takes);
inference workers' models being loaded

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("phase", sa.JSON(), nullable=True))
    with op.batch_alter_table("inference_workers") as batch:
        batch.add_column(sa.Column("loading", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inference_workers") as batch:
        batch.drop_column("loading")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("phase")
