"""The tool's tables as released at commit 7413865 (0.1.0), copied verbatim from its
``fswatch_sync/schema.py``: what ``init-db`` made on a database that now needs upgrading."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

tool_metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; BigInteger elsewhere.
_JournalId = BigInteger().with_variant(Integer(), "sqlite")
# MySQL/MariaDB keep whole seconds in a plain DATETIME: a lease would expire up to a second
# early and the sweep history could not order sweeps; microseconds, as on the others.
_Time = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

journal_table = Table(
    "fswatch_sync_journal",
    tool_metadata,
    Column("id", _JournalId, primary_key=True, autoincrement=True),
    Column("batch_id", String(36), nullable=False),
    Column("at", _Time, nullable=False),
    Column("action", String(40), nullable=False),
    Column("source", String(20), nullable=False),
    Column("table_name", String(200), nullable=False),
    Column("row_key", String(200), nullable=True),
    Column("model_slug", String(200), nullable=True),
    Column("app_number", Integer, nullable=True),
    Column("old_status", String(40), nullable=True),
    Column("new_status", String(40), nullable=True),
    Column("before_image", Text, nullable=True),
    Column("restored_at", _Time, nullable=True),
    Index("ix_fswatch_sync_journal_at", "at"),
    Index("ix_fswatch_sync_journal_app", "model_slug", "app_number"),
)

sweeps_table = Table(
    "fswatch_sync_sweeps",
    tool_metadata,
    Column("id", _JournalId, primary_key=True, autoincrement=True),
    Column("instance_id", String(64), nullable=False),
    Column("trigger", String(20), nullable=False),
    Column("started_at", _Time, nullable=False),
    Column("finished_at", _Time, nullable=True),
    Column("dry_run", Boolean, nullable=False),
    Column("forced", Boolean, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("orphan_apps", Integer, nullable=False, default=0),
    Column("orphan_tasks", Integer, nullable=False, default=0),
    Column("stuck_tasks", Integer, nullable=False, default=0),
    Column("old_tasks", Integer, nullable=False, default=0),
    Column("blocked_apps", Integer, nullable=False, default=0),
    Column("message", Text, nullable=True),
    Index("ix_fswatch_sync_sweeps_started", "started_at"),
)

instances_table = Table(
    "fswatch_sync_instances",
    tool_metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _Time, nullable=False),
    Column("heartbeat_at", _Time, nullable=False),
    Column("stopped_at", _Time, nullable=True),
    Column("state", String(20), nullable=False),
    Column("root", Text, nullable=False),
    Column("stats", Text, nullable=True),
)

leases_table = Table(
    "fswatch_sync_leases",
    tool_metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("acquired_at", _Time, nullable=False),
    Column("expires_at", _Time, nullable=False),
)


