"""The fswatch_sync_tree table: the root and model directories last seen holding apps.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

One row per directory (the root: slug NULL) per host and root (scope, a digest), holding its
(device, inode) as text. An empty root or model directory that is still that directory had its
last apps really deleted; an unmounted volume's mount point is another directory (treehealth).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

TREE = "fswatch_sync_tree"


def upgrade() -> None:
    # A newer version's start-up (create_all) may have made this table already. Offline (--sql)
    # there is nothing to look at: the script creates it.
    if op.get_context().as_sql or not sa.inspect(op.get_bind()).has_table(TREE):
        op.create_table(
            TREE,
            sa.Column("id", _Id, primary_key=True, autoincrement=True),
            sa.Column("scope", sa.String(64), nullable=False),
            sa.Column("slug", sa.Text(), nullable=True),
            sa.Column("identity", sa.String(64), nullable=False),
            sa.Column("recorded_at", _Time, nullable=False),
        )
        op.create_index("ix_fswatch_sync_tree_scope", TREE, ["scope"])


def downgrade() -> None:
    op.drop_table(TREE)
