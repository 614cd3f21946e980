"""OpenAI's Evals API: evals, their runs (leased by an evals worker) and each run's output items

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evals",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("data_source_config", sa.JSON(), nullable=False),
        sa.Column("testing_criteria", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_evals_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_evals"),
    )
    op.create_index("ix_evals_tenant_id", "evals", ["tenant_id"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("eval_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("data_source", sa.JSON(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("result_counts", sa.JSON(), nullable=False),
        sa.Column("per_criteria", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("control", sa.String(16), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["eval_id"], ["evals.id"], name="fk_eval_runs_eval_id_evals"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_eval_runs_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_eval_runs"),
    )
    op.create_index("ix_eval_runs_eval_id", "eval_runs", ["eval_id"])
    op.create_index("ix_eval_runs_tenant_id", "eval_runs", ["tenant_id"])
    op.create_index("ix_eval_runs_job_id", "eval_runs", ["job_id"])
    op.create_table(
        "eval_output_items",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("item_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("datasource_item", sa.JSON(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("sample", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["eval_runs.id"], name="fk_eval_output_items_run_id_eval_runs"),
        sa.PrimaryKeyConstraint("seq", name="pk_eval_output_items"),
        sa.UniqueConstraint("id", name="uq_eval_output_items_id"),
        sa.UniqueConstraint("run_id", "item_index", name="uq_eval_output_items_run_id"),
    )
    op.create_index("ix_eval_output_items_run_id", "eval_output_items", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_eval_output_items_run_id", table_name="eval_output_items")
    op.drop_table("eval_output_items")
    op.drop_index("ix_eval_runs_job_id", table_name="eval_runs")
    op.drop_index("ix_eval_runs_tenant_id", table_name="eval_runs")
    op.drop_index("ix_eval_runs_eval_id", table_name="eval_runs")
    op.drop_table("eval_runs")
    op.drop_index("ix_evals_tenant_id", table_name="evals")
    op.drop_table("evals")
