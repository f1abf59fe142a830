"""The tool's tables as released in 0.1.0: journal, sweeps, instances, leases.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Types are spelled out here, not imported from fswatch_sync.schema: a revision is the layout of
its day and must not follow later edits of the schema module.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
# A host that adds this history to its own version_locations upgrades it as this branch.
branch_labels: str | Sequence[str] | None = ("fswatch_sync",)
depends_on: str | Sequence[str] | None = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "fswatch_sync_journal",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("at", _Time, nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("table_name", sa.String(200), nullable=False),
        sa.Column("row_key", sa.String(200), nullable=True),
        sa.Column("model_slug", sa.String(200), nullable=True),
        sa.Column("app_number", sa.Integer(), nullable=True),
        sa.Column("old_status", sa.String(40), nullable=True),
        sa.Column("new_status", sa.String(40), nullable=True),
        sa.Column("before_image", sa.Text(), nullable=True),
        sa.Column("restored_at", _Time, nullable=True),
    )
    op.create_index("ix_fswatch_sync_journal_at", "fswatch_sync_journal", ["at"])
    op.create_index(
        "ix_fswatch_sync_journal_app", "fswatch_sync_journal", ["model_slug", "app_number"]
    )
    op.create_table(
        "fswatch_sync_sweeps",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("started_at", _Time, nullable=False),
        sa.Column("finished_at", _Time, nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("orphan_apps", sa.Integer(), nullable=False),
        sa.Column("orphan_tasks", sa.Integer(), nullable=False),
        sa.Column("stuck_tasks", sa.Integer(), nullable=False),
        sa.Column("old_tasks", sa.Integer(), nullable=False),
        sa.Column("blocked_apps", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
    )
    op.create_index("ix_fswatch_sync_sweeps_started", "fswatch_sync_sweeps", ["started_at"])
    op.create_table(
        "fswatch_sync_instances",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", _Time, nullable=False),
        sa.Column("heartbeat_at", _Time, nullable=False),
        sa.Column("stopped_at", _Time, nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("stats", sa.Text(), nullable=True),
    )
    op.create_table(
        "fswatch_sync_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("acquired_at", _Time, nullable=False),
        sa.Column("expires_at", _Time, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "fswatch_sync_leases",
        "fswatch_sync_instances",
        "fswatch_sync_sweeps",
        "fswatch_sync_journal",
    ):
        op.drop_table(table)
