"""Tables: the tool's own, the embedded default host tables, and a mapping onto a host's schema.

The host's tables are never created or altered when a ``[schema]`` mapping is given: they are
reflected from the database, so every column (NOT NULL extras included) is known for journal
before-images and restores.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

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
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.sql.schema import SchemaItem

from fswatch_sync.errors import SettingsError

DEPENDENT_POLICIES = ("restrict", "delete", "nullify")

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


@dataclass(frozen=True)
class AppColumns:
    id: str = "id"
    model_slug: str = "model_slug"
    app_number: str = "app_number"
    created_at: str = "created_at"
    # Optional host columns: set on every row the tool changes / marks missing.
    updated_at: str = ""
    missing_since: str = ""


@dataclass(frozen=True)
class TaskColumns:
    id: str = "id"
    task_id: str = "task_id"
    target_model: str = "target_model"
    target_app_number: str = "target_app_number"
    status: str = "status"
    created_at: str = "created_at"
    started_at: str = "started_at"
    completed_at: str = "completed_at"
    error_message: str = "error_message"
    # Column holding the parent task's key, for hosts whose tasks have sub-tasks, and the
    # parent's column it holds (read from the foreign key when empty, else the primary key).
    parent_id: str = ""
    parent_references: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class Messages:
    """The error message each rule writes into a task (capped at 1000 characters)."""

    orphan_task: str = "cancelled: target app is gone (it has no row any more)"
    stuck_running: str = "failed: still running after {minutes} minutes"
    stuck_pending: str = "cancelled: still pending after {minutes} minutes"


@dataclass(frozen=True)
class Statuses:
    pending: str = "pending"
    running: str = "running"
    completed: str = "completed"
    failed: str = "failed"
    cancelled: str = "cancelled"
    extra_active: tuple[str, ...] = ()
    extra_terminal: tuple[str, ...] = ()

    @property
    def active(self) -> tuple[str, ...]:
        return (self.pending, self.running, *self.extra_active)

    @property
    def terminal(self) -> tuple[str, ...]:
        return (self.completed, self.failed, self.cancelled, *self.extra_terminal)


@dataclass(frozen=True)
class Dependent:
    """A host table whose rows point at an app row, and what a removal does to them.

    ``restrict``: an app with dependent rows is left untouched (row and tasks) and reported as
    blocked. ``delete``: the dependent rows are deleted first, journalled with before-images.
    ``nullify``: the pointing column is set to NULL, journalled.

    A link of several columns with no foreign key (``column = "model_slug,app_number"``,
    ``references = "model_slug,app_number"``) is named as comma-separated lists.
    """

    table: str
    column: str
    references: str = "id"
    policy: str = "restrict"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.column.split(","))

    @property
    def referenced(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.references.split(","))


@dataclass(frozen=True)
class SchemaConfig:
    apps_table: str = "generated_applications"
    tasks_table: str = "analysis_tasks"
    apps: AppColumns = field(default_factory=AppColumns)
    tasks: TaskColumns = field(default_factory=TaskColumns)
    statuses: Statuses = field(default_factory=Statuses)
    dependents: tuple[Dependent, ...] = ()
    # Policy for foreign keys discovered in the database that no [[schema.dependents]] names.
    dependents_policy: str = "restrict"
    # Tables whose rows point at tasks: what purging an old task does to them.
    task_dependents: tuple[Dependent, ...] = ()
    task_dependents_policy: str = "restrict"
    messages: Messages = field(default_factory=Messages)
    # Whether init-db creates the two host tables. True only for the embedded default.
    manage_host_tables: bool = True
    cancel_message: str = "target app is gone: {model_slug}/app{app_number} no longer exists"

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> SchemaConfig:
        """Build from the TOML ``[schema]`` table; raises SettingsError on any bad key."""
        if not table:
            return cls()
        data = dict(table)
        kwargs: dict[str, Any] = {"manage_host_tables": bool(data.pop("manage_host_tables", False))}
        for name in ("apps_table", "tasks_table", "cancel_message"):
            if name in data:
                kwargs[name] = _name(f"schema.{name}", data.pop(name))
        if "cancel_message" in kwargs:
            _check_template("schema.cancel_message", kwargs["cancel_message"])
        if "apps_columns" in data:
            kwargs["apps"] = _dataclass_from(
                AppColumns,
                "schema.apps_columns",
                data.pop("apps_columns"),
                optional={"updated_at", "missing_since"},
            )
        if "tasks_columns" in data:
            kwargs["tasks"] = _dataclass_from(
                TaskColumns,
                "schema.tasks_columns",
                data.pop("tasks_columns"),
                optional={"parent_id", "parent_references", "error_message", "updated_at"},
            )
        if "statuses" in data:
            kwargs["statuses"] = _statuses(data.pop("statuses"))
        if "dependents_policy" in data:
            kwargs["dependents_policy"] = _policy(
                "schema.dependents_policy", data.pop("dependents_policy")
            )
        if "dependents" in data:
            kwargs["dependents"] = _dependents(data.pop("dependents"), "schema.dependents")
        if "task_dependents_policy" in data:
            kwargs["task_dependents_policy"] = _policy(
                "schema.task_dependents_policy", data.pop("task_dependents_policy")
            )
        if "task_dependents" in data:
            kwargs["task_dependents"] = _dependents(
                data.pop("task_dependents"), "schema.task_dependents"
            )
        if "messages" in data:
            kwargs["messages"] = _messages(data.pop("messages"))
        if data:
            raise SettingsError(f"schema.{sorted(data)[0]}", "unknown key in [schema]")
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "apps_table": self.apps_table,
            "tasks_table": self.tasks_table,
            "active_statuses": list(self.statuses.active),
            "terminal_statuses": list(self.statuses.terminal),
            "dependents": [d.__dict__ for d in self.dependents],
            "dependents_policy": self.dependents_policy,
            "task_dependents": [d.__dict__ for d in self.task_dependents],
            "task_dependents_policy": self.task_dependents_policy,
            "manage_host_tables": self.manage_host_tables,
        }


def _name(setting: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise SettingsError(setting, f"{raw!r} is not a name")
    return raw


MAX_TEMPLATE_LENGTH = 1000


def _check_template(
    setting: str, template: str, names: tuple[str, ...] = ("model_slug", "app_number")
) -> None:
    """A message template may name only ``names``, without format specs or conversions: the
    database builds the message (one UPDATE per batch), and a spec like ``{x:>20000000}`` would
    otherwise write megabytes per task."""
    shown = ", ".join(f"{{{name}}}" for name in names)
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise SettingsError(setting, f"longer than {MAX_TEMPLATE_LENGTH} characters")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SettingsError(setting, f"{template!r} is not a template of {shown} ({exc})") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in names:
            raise SettingsError(setting, f"{template!r} names {{{name}}}; it may name {shown}")
        if conversion or spec not in ("", "d"):
            raise SettingsError(
                setting, f"{template!r}: {{{name}}} takes no format spec or conversion"
            )


def _messages(raw: Any) -> Messages:
    if not isinstance(raw, dict):
        raise SettingsError("schema.messages", "must be a TOML table")
    values: dict[str, str] = {}
    known = {f.name for f in fields(Messages)}
    for key, value in raw.items():
        setting = f"schema.messages.{key}"
        if key not in known:
            raise SettingsError(setting, f"unknown message; known: {', '.join(sorted(known))}")
        if not isinstance(value, str):
            raise SettingsError(setting, "must be a string")
        _check_template(setting, value, () if key == "orphan_task" else ("minutes",))
        values[key] = value
    return replace(Messages(), **values)


def _policy(setting: str, raw: Any) -> str:
    if raw not in DEPENDENT_POLICIES:
        raise SettingsError(setting, f"{raw!r} is not one of {', '.join(DEPENDENT_POLICIES)}")
    return str(raw)


def _dataclass_from(
    kind: type[Any], setting: str, raw: Any, optional: frozenset[str] | set[str] = frozenset()
) -> Any:
    if not isinstance(raw, dict):
        raise SettingsError(setting, "must be a TOML table")
    known = {f.name for f in fields(kind)}
    values: dict[str, str] = {}
    for key, value in raw.items():
        if key not in known:
            raise SettingsError(f"{setting}.{key}", "unknown column role")
        if key in optional and value == "":
            values[key] = ""
        else:
            values[key] = _name(f"{setting}.{key}", value)
    return replace(kind(), **values)


def _statuses(raw: Any) -> Statuses:
    if not isinstance(raw, dict):
        raise SettingsError("schema.statuses", "must be a TOML table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = f"schema.statuses.{key}"
        if key in ("extra_active", "extra_terminal"):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise SettingsError(setting, "must be a list of status names")
            values[key] = tuple(value)
        elif key in ("pending", "running", "completed", "failed", "cancelled"):
            values[key] = _name(setting, value)
        else:
            raise SettingsError(setting, "unknown status role")
    statuses = replace(Statuses(), **values)
    overlap = set(statuses.active) & set(statuses.terminal)
    if overlap or len(set(statuses.active)) != len(statuses.active) or len(
        set(statuses.terminal)
    ) != len(statuses.terminal):
        raise SettingsError("schema.statuses", "a status value is used for two roles")
    return statuses


def _dependents(raw: Any, name: str) -> tuple[Dependent, ...]:
    if not isinstance(raw, list):
        raise SettingsError(name, f"must be an array of tables ([[{name}]])")
    result = []
    for index, item in enumerate(raw):
        setting = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(setting, "must be a table")
        unknown = set(item) - {"table", "column", "references", "policy"}
        if unknown:
            raise SettingsError(f"{setting}.{sorted(unknown)[0]}", "unknown key")
        if "table" not in item or "column" not in item:
            raise SettingsError(setting, "needs table and column")
        result.append(
            Dependent(
                table=_name(f"{setting}.table", item["table"]),
                column=_name(f"{setting}.column", item["column"]),
                references=_name(f"{setting}.references", item.get("references", "id")),
                policy=_policy(f"{setting}.policy", item.get("policy", "restrict")),
            )
        )
    return tuple(result)


def default_host_metadata(config: SchemaConfig) -> MetaData:
    """The embedded default host tables, as ``init-db`` creates them."""
    metadata = MetaData()
    apps, tasks = config.apps, config.tasks
    Table(
        config.apps_table,
        metadata,
        Column(apps.id, Integer, primary_key=True, autoincrement=True),
        Column(apps.model_slug, String(200), nullable=False),
        Column(apps.app_number, Integer, nullable=False),
        Column(apps.created_at, DateTime(), nullable=True),
        UniqueConstraint(apps.model_slug, apps.app_number),
    )
    task_columns: list[SchemaItem] = [
        Column(tasks.id, Integer, primary_key=True, autoincrement=True),
        Column(tasks.task_id, String(100), nullable=False, unique=True),
        Column(tasks.target_model, String(200), nullable=False),
        Column(tasks.target_app_number, Integer, nullable=False),
        Column(tasks.status, String(20), nullable=False),
        Column(tasks.created_at, DateTime(), nullable=True),
        Column(tasks.started_at, DateTime(), nullable=True),
        Column(tasks.completed_at, DateTime(), nullable=True),
    ]
    if tasks.error_message:
        task_columns.append(Column(tasks.error_message, Text, nullable=True))
    Table(
        config.tasks_table,
        metadata,
        *task_columns,
        # The sweep finds a target's tasks and the active/terminal sets through these.
        # Includes the status so that "the active tasks of these apps" is answered from the
        # index alone, without reading every finished task of each app.
        Index(
            f"ix_{config.tasks_table}_target",
            tasks.target_model,
            tasks.target_app_number,
            tasks.status,
        ),
        # With the key: a keyset batch of one status (stuck running, stuck pending) walks this
        # index in key order. (SQLite and InnoDB add the key to every index themselves;
        # PostgreSQL would otherwise walk the whole table by its primary key.)
        Index(f"ix_{config.tasks_table}_status", tasks.status, tasks.id),
    )
    return metadata
