"""The reconcile rules, each defined once, as data the store applies set-based.

A rule is a value: a SQL predicate over the host's rows built from ``now`` and the settings, an
effect (delete the rows, or set a status with ``completed_at`` and a message), the journal action
it records and the signal it sends. The sweep is a loop over :func:`task_rules`; a dry run
applies the very same rules in a transaction it rolls back; the sweep and the reactor apply the
app rule (:func:`app_rule`, through removal.py) to the keys they found or were told about.
Nothing here runs a statement.

An app key ``(model_slug, app_number)`` may own several rows (versions of one app share its
directory): every app predicate is about keys, and the new-app grace protects a whole key while
its youngest row is younger than the grace.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from blinker import NamedSignal
from sqlalchemy import ColumnElement

from fswatch_sync import db, signals
from fswatch_sync.hostschema import HostTables, ResolvedDependent
from fswatch_sync.layout import AppKey
from fswatch_sync.settings import Settings

# Longest error message the tool writes into a task row: a template must not be able to write
# megabytes per task.
MAX_MESSAGE_LENGTH = 1000


@dataclass(frozen=True)
class SetStatus:
    """Set the status (compare-and-set: the predicate names the status read), ``completed_at``
    and the error message."""

    status: str
    message: ColumnElement[Any]


@dataclass(frozen=True)
class Delete:
    """Delete the rows (rows of other tables that point at them follow their own policy)."""


Effect = SetStatus | Delete


@dataclass(frozen=True)
class TaskRule:
    """One pass of the sweep over the tasks table."""

    name: str  # the report's key: orphan_tasks, stuck_running, stuck_pending, old_tasks
    where: ColumnElement[bool]
    effect: Effect
    action: str  # the journal action: task_cancelled, task_failed, task_purged
    reason: str  # the signal's reason
    signal: NamedSignal
    # Old tasks with sub-tasks: a parent goes once its children are gone, so the rule is applied
    # again while the previous round deleted something.
    repeat: bool = False
    # Rows the rule matches but leaves because a table pointing at them says restrict.
    kept: ColumnElement[bool] | None = None


# -- predicates: the building blocks, each written once -------------------------------------


def keys_clause(
    slug_col: ColumnElement[Any], number_col: ColumnElement[Any], keys: Iterable[AppKey]
) -> ColumnElement[bool]:
    """``(slug, number) IN keys`` in the form every backend answers from an index on
    ``(slug, number)``: one ``slug = ? AND number IN (...)`` term per model. (SQLite scans the
    whole table for a row-value IN list.)"""
    by_slug: dict[str, list[int]] = {}
    for key in keys:
        by_slug.setdefault(key.model_slug, []).append(key.app_number)
    if not by_slug:
        return sa.false()
    return sa.or_(
        *(
            sa.and_(slug_col == slug, db.one_of(number_col, numbers))
            for slug, numbers in by_slug.items()
        )
    )


def app_keys(host: HostTables, keys: Iterable[AppKey]) -> ColumnElement[bool]:
    return keys_clause(host.app_col("model_slug"), host.app_col("app_number"), keys)


def task_keys(host: HostTables, keys: Iterable[AppKey]) -> ColumnElement[bool]:
    return keys_clause(host.task_col("target_model"), host.task_col("target_app_number"), keys)


def young_key(host: HostTables, young_after: datetime) -> ColumnElement[bool]:
    """The app row's key has a row created after ``young_after`` (the grace protects the key)."""
    sibling = host.apps.alias("sibling")
    created = sibling.c[host.config.apps.created_at]
    siblings: sa.Select[Any] = sa.select(sa.literal_column("1")).where(
        sibling.c[host.config.apps.model_slug] == host.app_col("model_slug"),
        sibling.c[host.config.apps.app_number] == host.app_col("app_number"),
        created > db.bind_time(created, young_after),
    )
    # A probe per row through the key's index; without such an index each probe would read the
    # table, and the database's own plan (one pass for the whole statement) is the better one.
    return db.probed_exists(siblings) if host.app_key_indexed else sa.exists(siblings)


def young_row(host: HostTables, young_after: datetime) -> ColumnElement[bool]:
    """This app row was created after ``young_after`` (aggregated per key by the sweep)."""
    created = host.app_col("created_at")
    return created > db.bind_time(created, young_after)


def active(host: HostTables, *, by_status_index: bool = True) -> ColumnElement[bool]:
    """The task's status is an active one. ``by_status_index=False`` where another condition
    finds the rows (an app's key): tested on each row found, SQLite would otherwise walk every
    active task through a status index as soon as the keys span two models."""
    status = host.task_col("status")
    return (status if by_status_index else db.unindexed(status)).in_(
        host.config.statuses.active
    )


def has_app_row(host: HostTables) -> ColumnElement[bool]:
    return sa.exists().where(
        host.app_col("model_slug") == host.task_col("target_model"),
        host.app_col("app_number") == host.task_col("target_app_number"),
    )


def orphan_task(host: HostTables) -> ColumnElement[bool]:
    """Active, and its target app has no row."""
    return sa.and_(active(host), ~has_app_row(host))


def stuck_running(host: HostTables, cutoff: datetime) -> ColumnElement[bool]:
    """Running since before ``cutoff`` (by ``started_at``, else ``created_at``)."""
    started = sa.func.coalesce(host.task_col("started_at"), host.task_col("created_at"))
    return sa.and_(
        host.task_col("status") == host.config.statuses.running,
        started < db.bind_time(host.task_col("started_at"), cutoff),
    )


def stuck_pending(host: HostTables, cutoff: datetime) -> ColumnElement[bool]:
    created = host.task_col("created_at")
    return sa.and_(
        host.task_col("status") == host.config.statuses.pending,
        created < db.bind_time(created, cutoff),
    )


def old_task(host: HostTables, cutoff: datetime) -> ColumnElement[bool]:
    """Terminal and finished before ``cutoff``, aged by ``completed_at``, then ``started_at``,
    then ``created_at``; a task with no timestamp is never old (the predicate is never NULL)."""
    finished = sa.func.coalesce(
        host.task_col("completed_at"), host.task_col("started_at"), host.task_col("created_at")
    )
    return sa.and_(
        # Terminal tasks are most of a task table: found by walking it in key order.
        db.unindexed(host.task_col("status")).in_(host.config.statuses.terminal),
        finished.is_not(None),
        finished < db.bind_time(host.task_col("completed_at"), cutoff),
    )


def pointed_at(dependent: ResolvedDependent) -> ColumnElement[bool]:
    """Some row of ``dependent``'s table points at the current row of the table it references."""
    referrer = dependent.table.alias(f"referrer_{dependent.table.name}")
    return sa.exists().where(
        *(
            referrer.c[column.name] == reference
            for column, reference in zip(dependent.columns, dependent.references, strict=True)
        )
    )


def has_child(host: HostTables) -> ColumnElement[bool]:
    """A sub-task points at this task (the column it points at may be ``task_id``, not the
    primary key: it is read from the foreign key, or the mapping's ``parent_references``)."""
    parent = host.parent_col
    if parent is None:
        return sa.false()
    child = host.tasks.alias("child")
    return sa.exists().where(child.c[parent.name] == host.parent_target_col)


def purgeable(
    host: HostTables, cutoff: datetime
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """(old and nothing restricting holds it, old but held by a ``restrict`` table)."""
    condition = old_task(host, cutoff)
    held: list[ColumnElement[bool]] = [
        pointed_at(d) for d in host.task_dependents if d.policy == "restrict"
    ]
    kept = sa.and_(condition, sa.or_(*held)) if held else sa.and_(condition, sa.false())
    if held:
        condition = sa.and_(condition, ~sa.or_(*held))
    if host.parent_col is not None:
        condition = sa.and_(condition, ~has_child(host))
    return condition, kept


# -- messages ---------------------------------------------------------------------------------


def capped(text: str) -> str:
    return text[:MAX_MESSAGE_LENGTH]


def key_message(template: str, host: HostTables) -> ColumnElement[Any]:
    """A message naming the task's app, built by the database from the task's own columns.

    The template may name ``{model_slug}`` and ``{app_number}`` (validated when the settings were
    read). A format spec or conversion cannot be done in SQL: such a template's fields are
    rendered without them, so one UPDATE serves every app of a batch.
    """
    pieces: list[ColumnElement[Any]] = []
    for literal, field_name, _spec, _conversion in string.Formatter().parse(template):
        if literal:
            pieces.append(sa.literal(literal, sa.String()))
        if field_name == "model_slug":
            pieces.append(sa.cast(host.task_col("target_model"), sa.String()))
        elif field_name == "app_number":
            number: ColumnElement[Any] = host.task_col("target_app_number")
            if not isinstance(number.type, sa.Integer):
                number = sa.cast(number, sa.BigInteger())
            pieces.append(sa.cast(number, sa.String()))
    if not pieces:
        return sa.literal("", sa.String())
    expression = pieces[0]
    for piece in pieces[1:]:
        expression = expression + piece
    return sa.func.substr(expression, 1, MAX_MESSAGE_LENGTH)


def _text(message: str) -> ColumnElement[Any]:
    return sa.literal(capped(message), sa.String())


# -- the sweep's task rules, in the seed's order ----------------------------------------------


def orphan_tasks_rule(host: HostTables) -> TaskRule:
    return TaskRule(
        name="orphan_tasks",
        where=orphan_task(host),
        effect=SetStatus(host.config.statuses.cancelled, _text(host.config.messages.orphan_task)),
        action="task_cancelled",
        reason="orphan",
        signal=signals.task_cancelled,
    )


def stuck_running_rule(host: HostTables, now: datetime, minutes: float) -> TaskRule:
    message = host.config.messages.stuck_running.format(minutes=f"{minutes:g}")
    return TaskRule(
        name="stuck_running",
        where=stuck_running(host, now - timedelta(minutes=minutes)),
        effect=SetStatus(host.config.statuses.failed, _text(message)),
        action="task_failed",
        reason="stuck_running",
        signal=signals.task_failed,
    )


def stuck_pending_rule(host: HostTables, now: datetime, minutes: float) -> TaskRule:
    message = host.config.messages.stuck_pending.format(minutes=f"{minutes:g}")
    return TaskRule(
        name="stuck_pending",
        where=stuck_pending(host, now - timedelta(minutes=minutes)),
        effect=SetStatus(host.config.statuses.cancelled, _text(message)),
        action="task_cancelled",
        reason="stuck_pending",
        signal=signals.task_cancelled,
    )


def old_tasks_rule(host: HostTables, cutoff: datetime) -> TaskRule:
    where, kept = purgeable(host, cutoff)
    return TaskRule(
        name="old_tasks",
        where=where,
        effect=Delete(),
        action="task_purged",
        reason="old",
        signal=signals.tasks_purged,
        repeat=host.parent_col is not None,
        kept=kept,
    )


def cancel_tasks_rule(host: HostTables, pks: Iterable[Any], message: str) -> TaskRule:
    """An operator's cancel of chosen tasks (those still active when it is applied)."""
    return TaskRule(
        name="cancelled_by_operator",
        where=sa.and_(db.one_of(host.task_col("id"), pks), active(host)),
        effect=SetStatus(host.config.statuses.cancelled, _text(message)),
        action="task_cancelled",
        reason="operator",
        signal=signals.task_cancelled,
    )


def task_rules(host: HostTables, settings: Settings, now: datetime) -> list[TaskRule]:
    """The enabled task passes after the orphan-apps pass, in the seed's order: orphan tasks,
    stuck running, stuck pending, old tasks. Each later rule sees what the earlier ones did."""
    rules: list[TaskRule] = []
    if settings.cleanup_orphan_tasks:
        rules.append(orphan_tasks_rule(host))
    if settings.cleanup_stuck_tasks:
        rules.append(stuck_running_rule(host, now, settings.running_timeout_minutes))
        rules.append(stuck_pending_rule(host, now, settings.pending_timeout_minutes))
    if settings.cleanup_old_tasks:
        rules.append(old_tasks_rule(host, now - timedelta(days=settings.task_retention_days)))
    return rules


def app_rule(
    host: HostTables, keys: Iterable[AppKey], young_after: datetime | None
) -> ColumnElement[bool]:
    """The app rule's predicate: rows of ``keys``, except keys with a row created after
    ``young_after`` (the sweep's grace; None for the reactor, which acts on removals the
    operating system reported). removal.py applies it, with the key's tasks and dependents."""
    condition = app_keys(host, keys)
    if young_after is not None:
        condition = sa.and_(condition, ~young_key(host, young_after))
    return condition
