"""Only app_removed journal entries are indexed by app (a partial index; none on MariaDB).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

The (app_number, model_slug) index over every journal entry took an insertion at a random place
for each task a sweep changed. A restore only asks for an app's app_removed entries, so
SQLite and PostgreSQL keep a partial index of those; MariaDB has no partial index and answers
that rare question with a scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOURNAL = "fswatch_sync_journal"
REMOVED = sa.text("action = 'app_removed'")


def _partial_indexes() -> bool:
    return op.get_context().dialect.name in ("sqlite", "postgresql")


def upgrade() -> None:
    op.drop_index("ix_fswatch_sync_journal_app", table_name=JOURNAL)
    if _partial_indexes():
        op.create_index(
            "ix_fswatch_sync_journal_removed_app", JOURNAL, ["app_number", "model_slug"],
            sqlite_where=REMOVED, postgresql_where=REMOVED,
        )


def downgrade() -> None:
    if _partial_indexes():
        op.drop_index("ix_fswatch_sync_journal_removed_app", table_name=JOURNAL)
    op.create_index(
        "ix_fswatch_sync_journal_app", JOURNAL, ["app_number", "model_slug"],
        mysql_length={"model_slug": 191},
    )
