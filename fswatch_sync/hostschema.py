"""The host's tables as they are in the database, resolved from a SchemaConfig.

Reflection (not declaration) is what lets the tool work on a host's schema with columns it does
not know: every column is read for journal before-images and written back by a restore.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, MetaData, Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError

from fswatch_sync.errors import SettingsError
from fswatch_sync.schema import SchemaConfig

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
    # Foreign keys from other tables (not the sub-task column) to task rows: such a task is
    # never purged while it is pointed at (policy "restrict"), so a purge cannot fail on them.
    task_dependents: tuple[ResolvedDependent, ...] = ()

    def app_col(self, role: str) -> Column[Any]:
        column: Column[Any] = self.apps.c[getattr(self.config.apps, role)]
        return column

    def task_col(self, role: str) -> Column[Any]:
        column: Column[Any] = self.tasks.c[getattr(self.config.tasks, role)]
        return column

    @property
    def has_error_message(self) -> bool:
        return bool(self.config.tasks.error_message)

    @property
    def parent_col(self) -> Column[Any] | None:
        name = self.config.tasks.parent_id
        return self.tasks.c[name] if name else None


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
        (d.table, (d.column,)): ((d.references,), d.policy) for d in config.dependents
    }
    task_fks: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
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
            elif fk.get("referred_table") == tasks.name and not (
                table_name == tasks.name and constrained == (config.tasks.parent_id,)
            ):
                task_fks.append((table_name, constrained, referred))
    dependents = []
    for (table_name, column_names), (referred, policy) in found.items():
        table = _table(engine, metadata, table_name, apps, tasks)
        described = (
            f"{table_name}.{'+'.join(column_names)} -> {apps.name}.{'+'.join(referred)}"
        )
        if not all(c in table.c for c in column_names) or not all(r in apps.c for r in referred):
            raise SettingsError(
                "schema.dependents", f"{described} names a column that does not exist"
            )
        pointing = tuple(table.c[c] for c in column_names)
        if policy == "nullify" and not all(c.nullable for c in pointing):
            raise SettingsError(
                "schema.dependents",
                f"{described}: a NOT NULL column cannot be nullified (use delete or restrict)",
            )
        dependents.append(
            ResolvedDependent(
                table=table,
                columns=pointing,
                references=tuple(apps.c[r] for r in referred),
                policy=policy,
            )
        )
        log.debug("dependent %s: policy %s", described, policy)
    task_dependents = tuple(
        ResolvedDependent(
            table=(table := _table(engine, metadata, table_name, apps, tasks)),
            columns=tuple(table.c[c] for c in constrained),
            references=tuple(tasks.c[r] for r in referred),
            policy="restrict",
        )
        for table_name, constrained, referred in task_fks
    )
    return HostTables(
        apps=apps,
        tasks=tasks,
        dependents=tuple(dependents),
        config=config,
        task_dependents=task_dependents,
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
