"""Journal columns wide enough for any host value, a batch index, the fswatch_sync_missing table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

row_key, model_slug, old_status and new_status become TEXT, app_number BIGINT, before_image
LONGTEXT on MariaDB/MySQL (TEXT there holds 64 KiB). MariaDB indexes a TEXT column by a prefix
only, so the (model_slug, app_number) index is dropped before the change and made again as
(app_number, model_slug(191)).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

JOURNAL = "fswatch_sync_journal"
MISSING = "fswatch_sync_missing"
_WIDENED = (
    ("row_key", sa.String(200), sa.Text()),
    ("model_slug", sa.String(200), sa.Text()),
    ("old_status", sa.String(40), sa.Text()),
    ("new_status", sa.String(40), sa.Text()),
    ("app_number", sa.Integer(), sa.BigInteger()),
)


def _on_mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    op.drop_index("ix_fswatch_sync_journal_app", table_name=JOURNAL)
    with op.batch_alter_table(JOURNAL) as batch:
        for name, old, new in _WIDENED:
            batch.alter_column(name, existing_type=old, type_=new, existing_nullable=True)
        if _on_mysql():
            batch.alter_column(
                "before_image", existing_type=sa.Text(), type_=mysql.LONGTEXT(),
                existing_nullable=True,
            )
    op.create_index("ix_fswatch_sync_journal_batch", JOURNAL, ["batch_id"])
    op.create_index(
        "ix_fswatch_sync_journal_app", JOURNAL, ["app_number", "model_slug"],
        mysql_length={"model_slug": 191},
    )
    # A newer version's start-up (create_all) may have made this table beside a 0001 journal.
    # Offline (--sql) there is nothing to look at: the script creates it.
    if op.get_context().as_sql or not sa.inspect(op.get_bind()).has_table(MISSING):
        op.create_table(
            MISSING,
            sa.Column("id", _Id, primary_key=True, autoincrement=True),
            sa.Column("model_slug", sa.Text(), nullable=False),
            sa.Column("app_number", sa.BigInteger(), nullable=False),
            sa.Column("missing_since", _Time, nullable=False),
        )
        op.create_index(
            "ix_fswatch_sync_missing_app", MISSING, ["app_number", "model_slug"],
            mysql_length={"model_slug": 191},
        )


def downgrade() -> None:
    op.drop_table(MISSING)
    op.drop_index("ix_fswatch_sync_journal_app", table_name=JOURNAL)
    op.drop_index("ix_fswatch_sync_journal_batch", table_name=JOURNAL)
    with op.batch_alter_table(JOURNAL) as batch:
        if _on_mysql():
            batch.alter_column(
                "before_image", existing_type=mysql.LONGTEXT(), type_=sa.Text(),
                existing_nullable=True,
            )
        # Values longer than the old widths make this fail on PostgreSQL and MariaDB (strict
        # mode) rather than be cut short.
        for name, old, new in _WIDENED:
            batch.alter_column(name, existing_type=new, type_=old, existing_nullable=True)
    op.create_index("ix_fswatch_sync_journal_app", JOURNAL, ["model_slug", "app_number"])
