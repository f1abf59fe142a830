"""The one way rows change: a task rule applied in keyset batches, a status set by
compare-and-set, and the policy of the rows that point at what changes.

A batch is one transaction of a few statements: lock the batch's rows by key (``FOR UPDATE``
on MariaDB; SQLite's write lock is already held), journal them with ``INSERT ... SELECT`` (the
database builds each before-image), then update or delete exactly those rows, whose count must
match. On PostgreSQL a batch of tasks is one statement that reads the rows with their version,
changes those still at it and journals what it changed. The removal of apps (removal.py) uses
the same task change and dependents policy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import ColumnElement
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from fswatch_sync import db
from fswatch_sync.batching import BatchSizer
from fswatch_sync.hostschema import HostTables, ResolvedDependent
from fswatch_sync.images import JOURNAL_COLUMNS, JournalWriter
from fswatch_sync.layout import AppKey
from fswatch_sync.outcomes import RuleOutcome, TaskChange
from fswatch_sync.rules import Delete, SetStatus, TaskRule, active
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store
from fswatch_sync.text import first_line

log = logging.getLogger(__name__)


# How many keys one unlocked read finds ahead of the write batches: a rule whose predicate is
# costly to evaluate (an anti-join, a walk of a large table) is evaluated once per window
# instead of once per batch, and memory holds one integer per key of the window at most (50,000
# integers: about 2 MiB).
WINDOW = 50_000


def apply_task_rule(
    store: Store, rule: TaskRule, *, source: str, now: datetime, collect: bool = False
) -> RuleOutcome:
    """Apply ``rule`` to every task it matches, in keyset batches of one transaction each.

    The keys are found by a read that takes no lock (a window of up to :data:`WINDOW` keys in
    key order: walking the table is the slow part, and no write transaction holds its locks
    through it); each batch's write transaction then re-checks the rule on its keys (under lock,
    or by row version on PostgreSQL) and changes exactly the rows that still match.
    ``collect``: also return each change (for per-task signals); otherwise no changed row passes
    through Python.
    """
    outcome = RuleOutcome(rule.name)
    batch = store._retry(partial(_task_batch, store))
    while True:
        sizer = BatchSizer(store.batch_size, store.max_transaction_ms / 1000)
        after: Any = None
        changed_this_round = 0
        while True:
            window = _find(store, rule, after)
            start = 0
            while start < len(window):
                part = window[start : start + sizer.size]
                started = time.monotonic()
                try:
                    changed, changes = batch(rule, part, source, now, collect)
                except DBAPIError as exc:
                    if db.is_transient(exc):
                        raise
                    # A row the database refuses (a host constraint, a trigger): narrow the
                    # batch down to it, skip it, and go on with the others.
                    if len(part) > 1:
                        sizer.size = max(1, len(part) // 2)
                        sizer.minimum = min(sizer.minimum, sizer.size)
                        continue
                    outcome.failed += 1
                    log.warning(
                        "task %r left for the next sweep: the database refused %s: %s",
                        part[0],
                        rule.name.replace("_", " "),
                        first_line(exc),
                    )
                    start += 1
                    continue
                sizer.record(changed, time.monotonic() - started)
                start += len(part)
                changed_this_round += changed
                outcome.changes += changes
            if len(window) < WINDOW:
                break
            after = window[-1]
        outcome.count += changed_this_round
        if not rule.repeat or changed_this_round == 0:
            break
    if rule.kept is not None:
        with store._reading() as connection:
            query = sa.select(sa.func.count()).select_from(store.host.tasks).where(rule.kept)
            outcome.kept = int(connection.execute(query).scalar_one())
        if outcome.kept:
            log.warning(
                "%d old task(s) kept: rows of another table point at them (policy restrict)",
                outcome.kept,
            )
    return outcome


def _find(store: Store, rule: TaskRule, after: Any) -> list[Any]:
    """The keys of the next window of tasks ``rule`` matches after ``after``, in key order."""
    pk = store.host.task_col("id")
    where = rule.where if after is None else sa.and_(rule.where, pk > after)
    with store._reading() as connection:
        matching = sa.select(pk).where(where)
        if connection.dialect.name == "postgresql":
            # Planned apart from the ORDER BY ... LIMIT (OFFSET 0 is PostgreSQL's fence): given
            # a limit, the planner walks the primary key in order and filters every row of the
            # table, betting that matches come early, where the rule's own plan (a status index,
            # an anti-join) reads only the candidates; sorting them costs next to nothing.
            fenced = matching.offset(0).subquery("fswatch_matching")
            matching = sa.select(fenced.c[pk.name])
            pk_of_window: Any = fenced.c[pk.name]
        else:
            pk_of_window = pk
        found = connection.execute(matching.order_by(pk_of_window).limit(WINDOW))
        return list(found.scalars())


def _task_batch(
    store: Store, rule: TaskRule, keys: list[Any], source: str, now: datetime, collect: bool
) -> tuple[int, list[TaskChange]]:
    """The tasks of ``keys`` that ``rule`` still matches, journalled and changed in one
    transaction. Returns (rows changed, the changes when ``collect``)."""
    pk = store.host.task_col("id")
    with store._write() as connection:
        journal = JournalWriter(connection, source=source, now=now)
        edit = TaskEdit(sa.and_(db.one_of(pk, keys), rule.where), rule.effect, rule.action, now)
        return change_tasks(store, connection, edit, journal, collect=collect)


@dataclass(frozen=True)
class TaskEdit:
    """Which tasks change (``where``), how (``effect``), as what the journal calls it
    (``action``), and when."""

    where: ColumnElement[bool]
    effect: SetStatus | Delete
    action: str
    now: datetime


def change_tasks(
    store: Store,
    connection: Connection,
    edit: TaskEdit,
    journal: JournalWriter,
    *,
    collect: bool,
) -> tuple[int, list[TaskChange]]:
    """The one way tasks change: the tasks for which ``edit.where`` holds are journalled and
    changed, in the caller's transaction, as a compare-and-set on what was read. Returns (how
    many, each change when ``collect``)."""
    host = store.host
    where, effect, action, now = edit.where, edit.effect, edit.action, edit.now
    if not collect and _by_row_version_applies(connection, host, effect):
        return _change_by_row_version(host, connection, edit, journal), []
    pk = host.task_col("id")
    new_status = effect.status if isinstance(effect, SetStatus) else None
    changes: list[TaskChange] = []
    if collect:
        columns = [
            host.task_col(role)
            for role in ("id", "task_id", "target_model", "target_app_number", "status")
        ]
        read = store.locked(sa.select(*columns).where(where).order_by(pk), connection)
        changes = [
            TaskChange(task_pk, str(task_id), AppKey(model, int(number)), status, new_status or "")
            for task_pk, task_id, model, number, status in connection.execute(read)
        ]
        pks = [change.pk for change in changes]
    else:
        locked = store.locked(sa.select(pk).where(where), connection)
        pks = list(connection.execute(locked).scalars())
    if not pks:
        return 0, changes
    chosen = db.one_of(pk, pks)
    journalled = journal.record(action, host.tasks, chosen, **_task_entry(host, new_status))
    if isinstance(effect, Delete):
        for dependent in host.task_dependents:
            if dependent.policy != "restrict":
                follow_policy(connection, dependent, host.tasks, chosen, journal, None)
        result = connection.execute(sa.delete(host.tasks).where(chosen))
    else:
        result = set_status(host, connection, chosen, effect, now)
    if result.rowcount != len(pks) or journalled != len(pks):
        raise db.StaleRead(f"{len(pks) - result.rowcount} task(s) changed under the tool's lock")
    return len(pks), changes


def _task_entry(host: HostTables, new_status: str | None) -> dict[str, Any]:
    """What a task's journal entry names besides its row: its app, its status and the new one."""
    return {
        "key": (host.task_col("target_model"), host.task_col("target_app_number")),
        "status": host.task_col("status"),
        "new_status": new_status,
    }


def _by_row_version_applies(
    connection: Connection, host: HostTables, effect: SetStatus | Delete
) -> bool:
    """PostgreSQL, and no dependent rows to follow (those are journalled and changed first,
    by their own statements)."""
    if connection.dialect.name != "postgresql":
        return False
    return not (
        isinstance(effect, Delete)
        and any(d.policy != "restrict" for d in host.task_dependents)
    )


def _change_by_row_version(
    host: HostTables, connection: Connection, edit: TaskEdit, journal: JournalWriter
) -> int:
    """PostgreSQL: read, change and journal in one statement, without locking first.

    The rows are read with their version (``xmin``) and before-image; the UPDATE or DELETE
    changes only rows still at that version, and the journal is written from what it changed.
    A row changed meanwhile by another transaction is left as it is, its count differs from
    what was read, and the batch is tried again (StaleRead): the compare-and-set of the
    lock-then-change path, on the whole row, with one round trip and no lock written per row.
    """
    table = host.tasks
    pk = host.task_col("id")
    where, effect, action, now = edit.where, edit.effect, edit.action, edit.now
    new_status = effect.status if isinstance(effect, SetStatus) else None
    quoted = connection.dialect.identifier_preparer.format_table(table)
    version: ColumnElement[Any] = sa.literal_column(f"{quoted}.xmin")
    entry = journal.entry(action, table, **_task_entry(host, new_status))
    read = (
        sa.select(pk.label("fswatch_pk"), version.label("fswatch_version"), *entry)
        .where(where)
        .cte("fswatch_read")
        .prefix_with("MATERIALIZED")
    )
    unchanged = sa.and_(pk == read.c.fswatch_pk, version == read.c.fswatch_version)
    returned = [read.c[name] for name in JOURNAL_COLUMNS]
    change: Any
    if isinstance(effect, Delete):
        change = sa.delete(table).where(unchanged).returning(*returned)
    else:
        change = (
            sa.update(table)
            .where(unchanged, active(host))
            .values(_status_values(host, effect, now))
            .returning(*returned)
        )
    changed = change.cte("fswatch_changed")
    written = (
        sa.insert(journal_table)
        .from_select(JOURNAL_COLUMNS, sa.select(*(changed.c[name] for name in JOURNAL_COLUMNS)))
        .returning(journal_table.c.id)
        .cte("fswatch_journalled")
    )
    counted = connection.execute(
        sa.select(
            sa.select(sa.func.count()).select_from(read).scalar_subquery(),
            sa.select(sa.func.count()).select_from(written).scalar_subquery(),
        )
    ).one()
    found, journalled = int(counted[0]), int(counted[1])
    if journalled != found:
        raise db.StaleRead(f"{found - journalled} task(s) changed while the batch was written")
    journal.count += journalled
    return journalled


def _status_values(host: HostTables, effect: SetStatus, now: datetime) -> dict[str, Any]:
    config = host.config.tasks
    values: dict[str, Any] = {
        config.status: effect.status,
        config.completed_at: db.bind_time(host.task_col("completed_at"), now),
    }
    if host.has_error_message:
        values[config.error_message] = effect.message
    if config.updated_at:
        values[config.updated_at] = db.bind_time(host.task_col("updated_at"), now)
    return values


def set_status(
    host: HostTables,
    connection: Connection,
    where: ColumnElement[bool],
    effect: SetStatus,
    now: datetime,
) -> Any:
    """The one way a task's status changes: only from an active status (the compare-and-set
    on what was read under lock), with ``completed_at`` and the rule's message. ``where``
    finds the rows (their keys); the status is tested on each."""
    return connection.execute(
        sa.update(host.tasks)
        .where(where, active(host, by_status_index=False))
        .values(_status_values(host, effect, now))
    )


def follow_policy(
    connection: Connection,
    dependent: ResolvedDependent,
    target: sa.Table,
    target_where: ColumnElement[bool],
    journal: JournalWriter,
    key: tuple[ColumnElement[Any], ColumnElement[Any]] | None,
) -> int:
    """Delete or nullify the rows of ``dependent`` that point at the rows of ``target`` for
    which ``target_where`` holds, journalled first; return how many."""
    table = dependent.table
    pointing = _pointing(dependent, target, target_where)
    if key is not None:
        # The app a row points at, read by the database: a link by (slug, number) may match
        # several rows of one key (versions), so a join would journal a row once per version.
        match = sa.and_(
            *(
                column == reference
                for column, reference in zip(
                    dependent.columns, dependent.references, strict=True
                )
            )
        )
        owner = tuple(
            sa.select(part).where(match).limit(1).scalar_subquery() for part in key
        )
        action = "dependent_deleted" if dependent.policy == "delete" else "dependent_nullified"
        count = journal.record(action, table, pointing, key=(owner[0], owner[1]))
    else:
        action = (
            "task_dependent_deleted"
            if dependent.policy == "delete"
            else "task_dependent_nullified"
        )
        count = journal.record(action, table, pointing)
    if count == 0:
        return 0
    if dependent.policy == "delete":
        connection.execute(sa.delete(table).where(pointing))
    else:
        connection.execute(
            sa.update(table).where(pointing).values({c.name: None for c in dependent.columns})
        )
    return count

def _pointing(
    dependent: ResolvedDependent, target: sa.Table, target_where: ColumnElement[bool]
) -> ColumnElement[bool]:
    """``dependent``'s rows pointing at the chosen rows of ``target``, as a condition on
    ``dependent``'s own columns (a subquery: MariaDB cannot join the table it changes)."""
    references = dependent.references
    chosen = sa.select(*references).where(target_where)
    if len(references) == 1:
        # MariaDB refuses to read the table it changes in a subquery unless materialised.
        inner = chosen.subquery("chosen")
        return dependent.columns[0].in_(sa.select(inner.c[references[0].name]))
    inner = chosen.subquery("chosen")
    return sa.tuple_(*dependent.columns).in_(
        sa.select(*(inner.c[r.name] for r in references))
    )
