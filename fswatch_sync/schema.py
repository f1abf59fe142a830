"""The tool's own tables (journal, missing apps, tree identities, sweeps, instances, leases), in
a MetaData of their own that the Alembic history in ``fswatch_sync/migrations`` follows.

The ``[schema]`` mapping (SchemaConfig and its parts) and the default host tables
(default_host_metadata) have modules of their own, schemaconfig and defaulttables; user code
imports them from here, so they stay importable from here.
"""

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

from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.schemaconfig import (
    DEPENDENT_POLICIES,
    MAX_TEMPLATE_LENGTH,
    AppColumns,
    Dependent,
    Messages,
    SchemaConfig,
    Statuses,
    TaskColumns,
)

__all__ = [
    "DEPENDENT_POLICIES",
    "MAX_TEMPLATE_LENGTH",
    "AppColumns",
    "Dependent",
    "Messages",
    "SchemaConfig",
    "Statuses",
    "TaskColumns",
    "default_host_metadata",
    "instances_table",
    "journal_table",
    "leases_table",
    "missing_table",
    "sweeps_table",
    "tool_metadata",
    "tree_table",
]

# The tool's own tables live in their own MetaData so a host's Alembic can include or exclude
# them as a whole (see README, "Migrations").
tool_metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; BigInteger elsewhere.
_JournalId = BigInteger().with_variant(Integer(), "sqlite")
# MySQL/MariaDB keep whole seconds in a plain DATETIME: a lease would expire up to a second
# early and the sweep history could not order sweeps; microseconds, as on the others.
_Time = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# MySQL/MariaDB's TEXT holds 64 KiB; a host row's before-image can be larger.
_LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

journal_table = Table(
    "fswatch_sync_journal",
    tool_metadata,
    Column("id", _JournalId, primary_key=True, autoincrement=True),
    Column("batch_id", String(36), nullable=False),
    Column("at", _Time, nullable=False),
    Column("action", String(40), nullable=False),
    Column("source", String(20), nullable=False),
    Column("table_name", String(200), nullable=False),
    # Wide enough for anything a host column can hold (a slug of any length, a BIGINT app
    # number, an enum or long status, a composite string key): one row the journal could not
    # hold would stop every sweep.
    Column("row_key", Text, nullable=True),
    Column("model_slug", Text, nullable=True),
    Column("app_number", BigInteger, nullable=True),
    Column("old_status", Text, nullable=True),
    Column("new_status", Text, nullable=True),
    Column("before_image", _LongText, nullable=True),
    Column("restored_at", _Time, nullable=True),
    Index("ix_fswatch_sync_journal_at", "at"),
    Index("ix_fswatch_sync_journal_batch", "batch_id"),
)

# A restore asks whether an app's removal is journalled (and not yet undone). Only app_removed
# entries are indexed by app: an index over every entry would take an insertion at a random
# place for each task a sweep changes, and that index's pages were most of a big purge's writes.
# MariaDB has no partial index; there the question is answered by a scan, and only when a task
# is put back without its app row.
Index(
    "ix_fswatch_sync_journal_removed_app",
    journal_table.c.app_number,
    journal_table.c.model_slug,
    sqlite_where=journal_table.c.action == "app_removed",
    postgresql_where=journal_table.c.action == "app_removed",
).ddl_if(dialect=("sqlite", "postgresql"))  # type: ignore[arg-type]  # a tuple is accepted

# Apps found missing while the missing-since grace is on (and the host has no column for it):
# one row per app key, deleted when the app is removed or its directory returns.
missing_table = Table(
    "fswatch_sync_missing",
    tool_metadata,
    Column("id", _JournalId, primary_key=True, autoincrement=True),
    Column("model_slug", Text, nullable=False),
    Column("app_number", BigInteger, nullable=False),
    Column("missing_since", _Time, nullable=False),
    Index(
        "ix_fswatch_sync_missing_app", "app_number", "model_slug", mysql_length={"model_slug": 191}
    ),
)

# The directories (the root, each model directory) last seen holding apps, as (device, inode),
# per host and root: an empty root or model directory that is still the same directory had its
# last apps really deleted, where an unmounted volume's mount point is another directory.
tree_table = Table(
    "fswatch_sync_tree",
    tool_metadata,
    Column("id", _JournalId, primary_key=True, autoincrement=True),
    Column("scope", String(64), nullable=False),
    Column("slug", Text, nullable=True),  # NULL: the root itself
    Column("identity", String(64), nullable=False),
    Column("recorded_at", _Time, nullable=False),
    Index("ix_fswatch_sync_tree_scope", "scope"),
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
