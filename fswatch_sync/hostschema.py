"""The host's tables as they are in the database, resolved from a SchemaConfig.

Reflection (not declaration) is what lets the tool work on a host's schema with columns it does
not know: every column is read for journal before-images and written back by a restore.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, MetaData, Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError

from fswatch_sync.errors import SettingsError
from fswatch_sync.schemaconfig import SchemaConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedDependent:
    """A table pointing at app rows (or at tasks), with the columns resolved and its policy.

    ``columns`` point at ``references`` (one column each, in order): a composite foreign key such
    as ``(model_slug, app_number) -> apps(model_slug, app_number)`` has two.
    """

    table: Table
    columns: tuple[Column[Any], ...]
    references: tuple[Column[Any], ...]
    policy: str

    @property
    def name(self) -> str:
        return f"{self.table.name}.{'+'.join(c.name for c in self.columns)}"


@dataclass(frozen=True)
class HostTables:
    apps: Table
    tasks: Table
    dependents: tuple[ResolvedDependent, ...]
    config: SchemaConfig
    # Tables whose rows point at task rows (not the sub-task column), each with its policy for
    # purging an old task: restrict (the task is kept, and counted), delete, nullify.
    task_dependents: tuple[ResolvedDependent, ...] = ()
    # The parent's column a sub-task's parent column holds (the primary key or, say, task_id).
    parent_target: str = ""

    def app_col(self, role: str) -> Column[Any]:
        column: Column[Any] = self.apps.c[getattr(self.config.apps, role)]
        return column

    def task_col(self, role: str) -> Column[Any]:
        column: Column[Any] = self.tasks.c[getattr(self.config.tasks, role)]
        return column

    @cached_property
    def app_key_indexed(self) -> bool:
        """Whether an index (or a unique or primary key) of the app table begins with the key's
        two columns, in either order: rows of one key are then found by an index probe."""
        key = {self.config.apps.model_slug, self.config.apps.app_number}
        leading = [list(index.columns.keys())[:2] for index in self.apps.indexes] + [
            list(constraint.columns.keys())[:2]
            for constraint in self.apps.constraints
            if isinstance(constraint, sa.UniqueConstraint | sa.PrimaryKeyConstraint)
        ]
        return any(set(columns) == key for columns in leading)

    @property
    def has_error_message(self) -> bool:
        return bool(self.config.tasks.error_message)

    @property
    def parent_col(self) -> Column[Any] | None:
        name = self.config.tasks.parent_id
        return self.tasks.c[name] if name else None

    @property
    def parent_target_col(self) -> Column[Any]:
        column: Column[Any] = self.tasks.c[self.parent_target or self.config.tasks.id]
        return column


def _reflect(engine: Engine, metadata: MetaData, name: str) -> Table:
    if name in metadata.tables:  # already reflected (directly or through a foreign key)
        return metadata.tables[name]
    try:
        return Table(name, metadata, autoload_with=engine)
    except NoSuchTableError:
        raise SettingsError(
            "schema", f"table {name!r} does not exist (run 'fswatch-sync init-db' for the default)"
        ) from None


def _check_columns(table: Table, roles: object, setting: str) -> None:
    for role, column_name in vars(roles).items():
        if column_name and column_name not in table.c:
            raise SettingsError(
                f"schema.{setting}.{role}", f"column {column_name!r} is not in table {table.name!r}"
            )


def reflect_host_tables(engine: Engine, config: SchemaConfig) -> HostTables:
    """Reflect the apps and tasks tables and every table that points at app rows."""
    metadata = MetaData()
    apps = _reflect(engine, metadata, config.apps_table)
    tasks = _reflect(engine, metadata, config.tasks_table)
    _check_columns(apps, config.apps, "apps_columns")
    _check_columns(tasks, config.tasks, "tasks_columns")
    inspector = sa.inspect(engine)
    # (table, columns) -> (referred columns, policy); configured entries first, then every
    # foreign key found in the database that points at the apps table.
    found: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], str]] = {
        (d.table, d.columns): (d.referenced, d.policy) for d in config.dependents
    }
    task_found: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], str]] = {
        (d.table, d.columns): (d.referenced, d.policy) for d in config.task_dependents
    }
    parent_target = config.tasks.parent_references
    for table_name in inspector.get_table_names():
        for fk in inspector.get_foreign_keys(table_name):
            constrained = tuple(fk["constrained_columns"])
            referred = tuple(fk["referred_columns"])
            if fk.get("referred_table") == apps.name:
                if (table_name, constrained) not in found:
                    found[(table_name, constrained)] = (
                        referred,
                        _discovered_policy(config, tasks, table_name, constrained),
                    )
            elif fk.get("referred_table") == tasks.name:
                if table_name == tasks.name and constrained == (config.tasks.parent_id,):
                    if not parent_target and len(referred) == 1:
                        parent_target = referred[0]
                elif (table_name, constrained) not in task_found:
                    task_found[(table_name, constrained)] = (
                        referred,
                        config.task_dependents_policy,
                    )
    def resolve(
        setting: str,
        target: Table,
        pointers: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], str]],
    ) -> tuple[ResolvedDependent, ...]:
        """Each table pointing at ``target`` with its columns, the ones they point at, and its
        policy; a policy that cannot work is refused here, before any change."""
        resolved = []
        for (table_name, column_names), (referred, policy) in pointers.items():
            table = _table(engine, metadata, table_name, apps, tasks)
            described = (
                f"{table_name}.{'+'.join(column_names)} -> {target.name}.{'+'.join(referred)}"
            )
            if not all(c in table.c for c in column_names) or not all(
                r in target.c for r in referred
            ):
                raise SettingsError(setting, f"{described} names a column that does not exist")
            pointing = tuple(table.c[c] for c in column_names)
            if policy == "nullify" and not all(c.nullable for c in pointing):
                raise SettingsError(
                    setting,
                    f"{described}: a NOT NULL column cannot be nullified (use delete or restrict)",
                )
            resolved.append(
                ResolvedDependent(
                    table=table,
                    columns=pointing,
                    references=tuple(target.c[r] for r in referred),
                    policy=policy,
                )
            )
            log.debug("dependent %s: policy %s", described, policy)
        return tuple(resolved)

    dependents = resolve("schema.dependents", apps, found)
    task_dependents = resolve("schema.task_dependents", tasks, task_found)
    host = HostTables(
        apps=apps,
        tasks=tasks,
        dependents=dependents,
        config=config,
        task_dependents=task_dependents,
        parent_target=parent_target,
    )
    validate(host)
    return host


_TEXT_TYPES = (sa.String, sa.Enum)


def _kind(column: Column[Any]) -> str:
    """What a column holds, as far as comparing it goes: "integer", "text", "time" or other."""
    column_type = column.type
    if isinstance(column_type, sa.Integer):
        return "integer"
    if isinstance(column_type, _TEXT_TYPES):
        return "text"
    if isinstance(column_type, sa.DateTime):
        return "time"
    try:
        python_type = column_type.python_type
    except NotImplementedError:
        return "other"
    if python_type is int:
        return "integer"
    if python_type is str:
        return "text"
    return "other"


def _require(column: Column[Any], kind: str, setting: str, why: str) -> None:
    found = _kind(column)
    if found != kind:
        raise SettingsError(
            setting,
            f"{column.table.name}.{column.name} is {column.type} ({found}); it must hold"
            f" {kind} values: {why}",
        )


def validate(host: HostTables) -> None:
    """Refuse, before any change, a mapping the rules cannot apply: every column must hold what
    the tool compares it with and writes into it."""
    config = host.config
    apps, tasks = "schema.apps_columns", "schema.tasks_columns"
    _require(host.app_col("model_slug"), "text", f"{apps}.model_slug", "it is a directory name")
    _require(host.app_col("app_number"), "integer", f"{apps}.app_number", "N of app{N}")
    _require(host.task_col("target_model"), "text", f"{tasks}.target_model", "a model slug")
    _require(host.task_col("target_app_number"), "integer", f"{tasks}.target_app_number",
             "N of app{N}")
    _require(host.task_col("status"), "text", f"{tasks}.status", "status names are compared")
    for role in ("created_at",):
        _require(host.app_col(role), "time", f"{apps}.{role}", "the grace compares it")
    for role in ("created_at", "started_at", "completed_at"):
        _require(host.task_col(role), "time", f"{tasks}.{role}", "the timeouts compare it")
    for role, table, setting in (
        ("updated_at", host.apps, apps), ("missing_since", host.apps, apps),
    ):
        name = getattr(config.apps, role)
        if name:
            if name not in table.c:
                raise SettingsError(
                    f"{setting}.{role}", f"column {name!r} is not in {table.name!r}"
                )
            _require(table.c[name], "time", f"{setting}.{role}", "the tool writes a time")
    if config.tasks.updated_at:
        _require(host.task_col("updated_at"), "time", f"{tasks}.updated_at", "a time is written")
    if config.tasks.error_message:
        _require(host.task_col("error_message"), "text", f"{tasks}.error_message",
                 "the tool writes a message")
    status = host.task_col("status")
    if isinstance(status.type, sa.Enum) and status.type.enums:
        allowed = set(status.type.enums)
        for value in (*config.statuses.active, *config.statuses.terminal):
            if value not in allowed:
                raise SettingsError(
                    "schema.statuses",
                    f"{value!r} is not a value of the enum of {host.tasks.name}.{status.name}"
                    f" ({', '.join(sorted(allowed))})",
                )
    parent = host.parent_col
    if parent is not None:
        if host.parent_target and host.parent_target not in host.tasks.c:
            raise SettingsError(
                f"{tasks}.parent_references",
                f"column {host.parent_target!r} is not in table {host.tasks.name!r}",
            )
        target = host.parent_target_col
        if _kind(parent) != _kind(target):
            raise SettingsError(
                f"{tasks}.parent_id",
                f"{host.tasks.name}.{parent.name} ({parent.type}) cannot hold"
                f" {host.tasks.name}.{target.name} ({target.type}); set"
                f" schema.tasks_columns.parent_references to the column it points at",
            )
    for name, table in (("apps", host.apps), ("tasks", host.tasks)):
        if len(table.primary_key.columns) != 1:
            raise SettingsError(
                f"schema.{name}_table",
                f"{table.name} needs a one-column primary key (the batches walk it)",
            )


def _discovered_policy(
    config: SchemaConfig, tasks: Table, table_name: str, columns: tuple[str, ...]
) -> str:
    """The policy for a foreign key to the apps table that the configuration does not name.

    The tasks table is special: the tool cancels an app's active tasks and keeps every task's
    history, so a nullable pointer from a task to its app is nullified (journalled, restorable)
    rather than blocking every app that ever had a task.
    """
    if table_name == tasks.name and all(
        c in tasks.c and tasks.c[c].nullable for c in columns
    ):
        return "nullify"
    return config.dependents_policy


def _table(engine: Engine, metadata: MetaData, name: str, apps: Table, tasks: Table) -> Table:
    if name == apps.name:
        return apps
    if name == tasks.name:
        return tasks
    return _reflect(engine, metadata, name)
