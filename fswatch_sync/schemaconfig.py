"""The ``[schema]`` mapping: which host tables and columns hold apps and tasks, the status
values, the tables whose rows point at apps or tasks and what a removal does to them, and the
messages the rules write. Built from the TOML ``[schema]`` table, every bad key refused with a
one-line SettingsError; with no table it describes the embedded default host tables.

A mapped host's tables are never created or altered (unless the mapping sets
``manage_host_tables``): they are reflected from the database, so every column (NOT NULL extras
included) is known for journal before-images and restores.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fswatch_sync.errors import SettingsError

DEPENDENT_POLICIES = ("restrict", "delete", "nullify")


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
