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
from fswatch_sync.schema import Dependent, SchemaConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedDependent:
    """A table pointing at app rows, with the columns resolved and its policy."""

    table: Table
    column: Column[Any]
    references: Column[Any]
    policy: str

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column.name}"


@dataclass(frozen=True)
class HostTables:
    apps: Table
    tasks: Table
    dependents: tuple[ResolvedDependent, ...]
    config: SchemaConfig

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
    configured = {(d.table, d.column): d for d in config.dependents}
    found: dict[tuple[str, str], Dependent] = dict(configured)
    inspector = sa.inspect(engine)
    for table_name in inspector.get_table_names():
        for fk in inspector.get_foreign_keys(table_name):
            if fk.get("referred_table") != apps.name or len(fk["constrained_columns"]) != 1:
                continue
            constrained = fk["constrained_columns"][0]
            if (table_name, constrained) not in found:
                found[(table_name, constrained)] = Dependent(
                    table=table_name,
                    column=constrained,
                    references=fk["referred_columns"][0],
                    policy=config.dependents_policy,
                )
    dependents = []
    for dependent in found.values():
        table = (
            apps if dependent.table == apps.name else _reflect(engine, metadata, dependent.table)
        )
        if dependent.column not in table.c or dependent.references not in apps.c:
            raise SettingsError(
                "schema.dependents",
                f"{dependent.table}.{dependent.column} -> {apps.name}.{dependent.references}"
                " names a column that does not exist",
            )
        pointing = table.c[dependent.column]
        if dependent.policy == "nullify" and not pointing.nullable:
            raise SettingsError(
                "schema.dependents",
                f"{dependent.table}.{dependent.column} is NOT NULL, so it cannot be nullified",
            )
        dependents.append(
            ResolvedDependent(
                table=table,
                column=pointing,
                references=apps.c[dependent.references],
                policy=dependent.policy,
            )
        )
        log.debug("dependent %s.%s: policy %s", dependent.table, dependent.column, dependent.policy)
    return HostTables(apps=apps, tasks=tasks, dependents=tuple(dependents), config=config)
