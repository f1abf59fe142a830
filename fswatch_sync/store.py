"""Every statement that changes the host's rows: set-based, batched, compare-and-set, journalled.

There is one way to remove an app (:meth:`Store.remove_apps`) and one way to change a task's
status (:func:`_set_task_status`); the reactor and every sweep pass go through them. Each batch is
one transaction, retried as a whole on transient errors, and journalled with the before-image of
every row it changes. A batch holds at most ``batch_size`` apps (with all their active tasks and
dependent rows, which must change with them), or ``batch_size`` tasks for the task passes.
"""

from __future__ import annotations

import copy
import json
import logging
import string
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy import ColumnElement, Select, Table
from sqlalchemy.engine import Connection, Engine, Row

from fswatch_sync import db
from fswatch_sync.hostschema import HostTables, ResolvedDependent, reflect_host_tables
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import (
    SchemaConfig,
    default_host_metadata,
    journal_table,
    tool_metadata,
)
from fswatch_sync.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
CommitCheck = Callable[[Connection], None]


@dataclass(frozen=True)
class TaskChange:
    """One task whose status the tool changed (or, in a dry run, would change)."""

    pk: Any
    task_id: str
    key: AppKey
    old_status: str
    new_status: str


@dataclass
class RemovalOutcome:
    """What a call to :meth:`Store.remove_apps` did."""

    removed: list[AppKey] = field(default_factory=list)
    cancelled: list[TaskChange] = field(default_factory=list)
    blocked: list[AppKey] = field(default_factory=list)
    present: list[AppKey] = field(default_factory=list)
    dependents_deleted: int = 0
    dependents_nullified: int = 0

    def extend(self, other: RemovalOutcome) -> None:
        self.removed += other.removed
        self.cancelled += other.cancelled
        self.blocked += other.blocked
        self.present += other.present
        self.dependents_deleted += other.dependents_deleted
        self.dependents_nullified += other.dependents_nullified


@dataclass(frozen=True)
class ActiveTask:
    pk: Any
    key: AppKey
    status: str
    created_at: datetime | None
    started_at: datetime | None
    has_app: bool


class AppRow(NamedTuple):
    """One app row as the sweep reads it (a tuple: the sweep reads tens of thousands)."""

    key: AppKey
    created_at: datetime | None


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def keys_clause(
    slug_col: sa.Column[Any], number_col: sa.Column[Any], keys: Iterable[AppKey]
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
        *(sa.and_(slug_col == slug, number_col.in_(numbers)) for slug, numbers in by_slug.items())
    )


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


# Built once: json.dumps with any option builds a new encoder per call, which shows when a
# batch journals thousands of rows. Same output as json.dumps with these options.
_IMAGE_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))
_KEY_ENCODER = json.JSONEncoder(default=_json_default)


class Store:
    """The tool's access to the host's rows and its own tables."""

    def __init__(
        self,
        engine: Engine,
        config: SchemaConfig | None = None,
        *,
        batch_size: int = 500,
        retry_seconds: float = 60.0,
    ) -> None:
        self.engine = engine
        self.reader = db.read_only(engine)
        self.config = config or SchemaConfig()
        self.batch_size = batch_size
        self.retry_seconds = retry_seconds
        self._host: HostTables | None = None
        self.commit_check: CommitCheck | None = None

    # -- set-up -------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """A store on a new engine for the settings' database, schema and batch size."""
        return cls(
            db.create_engine(settings.database_url), settings.schema, batch_size=settings.batch_size
        )

    def init_db(self) -> list[str]:
        """Create the tool's tables and, for the embedded default, the host tables. Idempotent."""
        existing = set(sa.inspect(self.engine).get_table_names())
        tool_metadata.create_all(self.engine, checkfirst=True)
        created = [t.name for t in tool_metadata.sorted_tables if t.name not in existing]
        if self.config.manage_host_tables:
            host = default_host_metadata(self.config)
            host.create_all(self.engine, checkfirst=True)
            created += [t.name for t in host.sorted_tables if t.name not in existing]
        if db.is_sqlite(self.engine) and self.config.manage_host_tables:
            # WAL lets the task runner read while the tool writes; only on a database the tool
            # manages, since the journal mode is a persistent property of the file.
            raw = self.engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA journal_mode=WAL")
            finally:
                raw.close()
        self._host = None
        return created

    def ensure_tool_tables(self) -> None:
        tool_metadata.create_all(self.engine, checkfirst=True)

    def with_commit_check(self, check: CommitCheck) -> Store:
        """The same store whose write transactions each run ``check`` just before committing."""
        self.host  # noqa: B018 - reflect once, so the copy shares the reflected tables
        clone = copy.copy(self)
        clone.commit_check = check
        return clone

    @property
    def host(self) -> HostTables:
        if self._host is None:
            self._host = reflect_host_tables(self.reader, self.config)
        return self._host

    @contextmanager
    def _write(self, dry_run: bool = False) -> Iterator[Connection]:
        """A write transaction; a dry run reads the same way and rolls back."""
        if dry_run:
            with self.reader.connect() as connection, connection.begin() as trans:
                yield connection
                trans.rollback()
            return
        with self.engine.begin() as connection:
            yield connection
            if self.commit_check is not None:
                self.commit_check(connection)

    def _retry(self, function: Callable[..., T]) -> Callable[..., T]:
        return db.retrying(self.retry_seconds)(function)

    def locked(self, statement: Select[Any], connection: Connection) -> Select[Any]:
        # A dry run reads through the read-only engine and takes no row locks.
        if db.locks_rows(connection) and not db.is_read_only(connection):
            return statement.with_for_update()
        return statement

    # -- reading --------------------------------------------------------------------------------

    def app_rows(self, young_after: datetime | None = None) -> list[AppRow]:
        """Every app row. With ``young_after``, only rows created after it carry their
        ``created_at`` (the others read as NULL, i.e. old): the database compares, so tens of
        thousands of timestamps are not parsed just to learn they are old."""
        host = self.host
        slug, number, created = (
            host.app_col(r) for r in ("model_slug", "app_number", "created_at")
        )
        stamp: ColumnElement[Any] = created
        if young_after is not None:
            stamp = sa.case((created > db.to_db_time(young_after), created), else_=sa.null())
        with self.reader.connect() as connection:
            result = connection.execute(sa.select(slug, number, stamp))
            return [
                AppRow(AppKey(s, int(n)), None if c is None else db.from_db_time(c))
                for s, n, c in result
            ]

    def app_rows_exist(self) -> bool:
        host = self.host
        with self.reader.connect() as connection:
            found = connection.execute(sa.select(host.app_col("id")).limit(1)).first()
        return found is not None

    def app_keys_for_slug(self, slug: str) -> list[AppKey]:
        """Every app row of one model (a whole model directory has gone)."""
        host = self.host
        slug_col, number_col = host.app_col("model_slug"), host.app_col("app_number")
        with self.reader.connect() as connection:
            rows = connection.execute(sa.select(number_col).where(slug_col == slug)).all()
        return [AppKey(slug, int(number)) for (number,) in rows]

    def active_tasks(self, where: ColumnElement[bool] | None = None) -> list[ActiveTask]:
        """Every active task (for which ``where`` holds), with whether its target app has a row."""
        host = self.host
        has_app = (
            sa.select(sa.literal(1))
            .where(
                host.app_col("model_slug") == host.task_col("target_model"),
                host.app_col("app_number") == host.task_col("target_app_number"),
            )
            .exists()
        )
        statement = sa.select(
            host.task_col("id"),
            host.task_col("target_model"),
            host.task_col("target_app_number"),
            host.task_col("status"),
            host.task_col("created_at"),
            host.task_col("started_at"),
            has_app,
        ).where(host.task_col("status").in_(self.config.statuses.active))
        if where is not None:
            statement = statement.where(where)
        with self.reader.connect() as connection:
            return [
                ActiveTask(
                    pk=pk,
                    key=AppKey(model, int(number)),
                    status=status,
                    created_at=db.from_db_time(created),
                    started_at=db.from_db_time(started),
                    has_app=bool(present),
                )
                for pk, model, number, status, created, started, present in connection.execute(
                    statement
                )
            ]

    # -- the one way to remove apps --------------------------------------------------------------

    def remove_apps(
        self,
        keys: Iterable[AppKey],
        *,
        source: str,
        now: datetime,
        still_absent: Callable[[AppKey], bool] | None = None,
        dry_run: bool = False,
    ) -> RemovalOutcome:
        """Delete the apps' rows and cancel their active tasks, one transaction per batch.

        ``still_absent`` is asked about each app after its row is locked and before anything
        changes: an app whose directory is back keeps its row (reported in ``present``).
        """
        outcome = RemovalOutcome()
        ordered = sorted(set(keys))
        batch = self._retry(self._remove_batch)
        for part in chunks(ordered, self.batch_size):
            outcome.extend(batch(part, source, now, still_absent, dry_run))
        return outcome

    def _remove_batch(
        self,
        keys: Sequence[AppKey],
        source: str,
        now: datetime,
        still_absent: Callable[[AppKey], bool] | None,
        dry_run: bool,
    ) -> RemovalOutcome:
        host, outcome = self.host, RemovalOutcome()
        slug_col, number_col = host.app_col("model_slug"), host.app_col("app_number")
        journal = _Journal(source, now)
        with self._write(dry_run) as connection:
            rows = connection.execute(
                self.locked(
                    sa.select(host.apps).where(keys_clause(slug_col, number_col, keys)),
                    connection,
                )
            ).all()
            by_key: dict[AppKey, Row[Any]] = {}
            for row in rows:
                key = AppKey(row._mapping[slug_col], int(row._mapping[number_col]))
                if still_absent is not None and not still_absent(key):
                    outcome.present.append(key)
                else:
                    by_key[key] = row
            # Restricting policies first: an app they block must not lose any dependent row.
            for dependent in sorted(host.dependents, key=lambda d: d.policy != "restrict"):
                before = len(journal.entries)
                blocked = self._handle_dependents(connection, dependent, by_key, journal, dry_run)
                for key in blocked:
                    del by_key[key]
                    outcome.blocked.append(key)
                if dependent.policy == "delete":
                    outcome.dependents_deleted += len(journal.entries) - before
                elif dependent.policy == "nullify":
                    outcome.dependents_nullified += len(journal.entries) - before
            if not by_key:
                return outcome
            removing = sorted(by_key)
            tasks = connection.execute(
                self.locked(
                    sa.select(host.tasks).where(
                        keys_clause(
                            host.task_col("target_model"),
                            host.task_col("target_app_number"),
                            removing,
                        ),
                        host.task_col("status").in_(self.config.statuses.active),
                    ),
                    connection,
                )
            ).all()
            outcome.cancelled = _set_task_status(
                connection,
                host,
                tasks,
                new_status=self.config.statuses.cancelled,
                message=_cancel_message(self.config.cancel_message, host),
                now=now,
                journal=journal,
                action="task_cancelled",
                dry_run=dry_run,
            )
            id_col = host.app_col("id")
            for key in removing:
                journal.add("app_removed", host.apps, by_key[key], key)
            if not dry_run:
                ids = [by_key[key]._mapping[id_col] for key in removing]
                connection.execute(sa.delete(host.apps).where(id_col.in_(ids)))
                journal.write(connection)
            outcome.removed = removing
        return outcome

    def _handle_dependents(
        self,
        connection: Connection,
        dependent: ResolvedDependent,
        by_key: dict[AppKey, Row[Any]],
        journal: _Journal,
        dry_run: bool,
    ) -> list[AppKey]:
        """Apply the dependent table's policy; return the apps a ``restrict`` policy blocks."""
        if not by_key:
            return []
        columns, references = dependent.columns, dependent.references
        key_by_ref: dict[tuple[Any, ...], AppKey] = {}
        for key, row in by_key.items():
            ref = tuple(row._mapping[c] for c in references)
            if None not in ref:
                key_by_ref[ref] = key
        if not key_by_ref:
            return []
        pointing: ColumnElement[bool] = (
            columns[0].in_([ref[0] for ref in key_by_ref])
            if len(columns) == 1
            else sa.tuple_(*columns).in_(list(key_by_ref))
        )
        statement = sa.select(dependent.table).where(pointing)
        rows = connection.execute(self.locked(statement, connection)).all()
        if not rows:
            return []

        def owner(row: Row[Any]) -> AppKey:
            return key_by_ref[tuple(row._mapping[c] for c in columns)]

        if dependent.policy == "restrict":
            blocked = sorted({owner(row) for row in rows})
            log.warning(
                "%d app(s) kept: rows in %s point at them and its policy is restrict (%s)",
                len(blocked),
                dependent.name,
                ", ".join(str(k) for k in blocked[:5]),
            )
            return blocked
        action = "dependent_deleted" if dependent.policy == "delete" else "dependent_nullified"
        for row in rows:
            journal.add(action, dependent.table, row, owner(row))
        if not dry_run:
            pk_cols = list(dependent.table.primary_key.columns)
            where = (
                pk_cols[0].in_([row._mapping[pk_cols[0]] for row in rows])
                if len(pk_cols) == 1
                else pointing
            )
            if dependent.policy == "delete":
                connection.execute(sa.delete(dependent.table).where(where))
            else:
                connection.execute(
                    sa.update(dependent.table)
                    .where(where)
                    .values({column.name: None for column in columns})
                )
        return []

    # -- the sweep's task passes ---------------------------------------------------------------

    def change_tasks(
        self,
        pks: Sequence[Any],
        *,
        still: ColumnElement[bool],
        new_status: str,
        message: str,
        action: str,
        source: str,
        now: datetime,
    ) -> list[TaskChange]:
        """Set ``new_status`` on the tasks among ``pks`` for which ``still`` holds now.

        ``still`` is re-evaluated under lock inside each batch's transaction, so a task the
        runner finished since the sweep read it keeps its real outcome.
        """
        changes: list[TaskChange] = []
        batch = self._retry(self._change_batch)
        for part in chunks(list(pks), self.batch_size):
            changes += batch(part, still, new_status, message, action, source, now)
        return changes

    def _change_batch(
        self,
        pks: Sequence[Any],
        still: ColumnElement[bool],
        new_status: str,
        message: str,
        action: str,
        source: str,
        now: datetime,
    ) -> list[TaskChange]:
        host = self.host
        journal = _Journal(source, now)
        with self._write() as connection:
            rows = connection.execute(
                self.locked(
                    sa.select(host.tasks).where(host.task_col("id").in_(pks), still), connection
                )
            ).all()
            changes = _set_task_status(
                connection,
                host,
                rows,
                new_status=new_status,
                message=lambda _key: message,
                now=now,
                journal=journal,
                action=action,
                dry_run=False,
            )
            journal.write(connection)
        return changes

    def old_task_condition(self, cutoff: datetime) -> ColumnElement[bool]:
        host = self.host
        finished = sa.func.coalesce(
            host.task_col("completed_at"), host.task_col("started_at"), host.task_col("created_at")
        )
        # Never NULL (a terminal task with no timestamp is simply not old), so that its negation
        # in the sub-task walk of count_old_tasks keeps such a task's ancestors, as the purge does.
        return sa.and_(
            host.task_col("status").in_(self.config.statuses.terminal),
            finished.is_not(None),
            finished < db.to_db_time(cutoff),
        )

    def _purgeable_condition(self, cutoff: datetime) -> ColumnElement[bool]:
        """Old, and no row of another table points at it (a purge must not break that key)."""
        host = self.host
        condition = self.old_task_condition(cutoff)
        for dependent in host.task_dependents:
            referrer = dependent.table.alias(f"referrer_{dependent.table.name}")
            condition = sa.and_(
                condition,
                ~sa.exists().where(
                    *(
                        referrer.c[column.name] == reference
                        for column, reference in zip(
                            dependent.columns, dependent.references, strict=True
                        )
                    )
                ),
            )
        return condition

    def count_old_tasks(self, cutoff: datetime) -> int:
        """How many tasks :meth:`purge_old_tasks` would delete now."""
        host = self.host
        old = self._purgeable_condition(cutoff)
        parent = host.parent_col
        with self.reader.connect() as connection:
            if parent is None:
                query = sa.select(sa.func.count()).select_from(host.tasks).where(old)
                return int(connection.execute(query).scalar_one())
            return int(connection.execute(self._purgeable_with_parents(old, parent)).scalar_one())

    def _purgeable_with_parents(
        self, old: ColumnElement[bool], parent: sa.Column[Any]
    ) -> Select[Any]:
        # A task is kept while any descendant is kept: walk up from every kept task that has a
        # parent, marking its ancestors; the purgeable set is the old ones not marked.
        host = self.host
        task_id = host.task_col("id")
        kept = (
            sa.select(task_id.label("id"), parent.label("parent"))
            .where(sa.not_(old), parent.is_not(None))
            .cte("kept_lineage", recursive=True)
        )
        ancestor = host.tasks.alias("ancestor")
        kept = kept.union(
            sa.select(ancestor.c[task_id.name], ancestor.c[parent.name]).where(
                ancestor.c[task_id.name] == kept.c.parent
            )
        )
        return (
            sa.select(sa.func.count())
            .select_from(host.tasks)
            .where(old, task_id.not_in(sa.select(kept.c.parent).where(kept.c.parent.is_not(None))))
        )

    def purge_old_tasks(self, cutoff: datetime, *, source: str, now: datetime) -> int:
        """Delete terminal tasks finished before ``cutoff``, a batch per transaction.

        One read (no lock) lists the candidates in id order; each batch then re-reads its share
        under lock with the full condition, so a task that changed since is left alone. The
        table is searched once per round, not once per batch. With sub-tasks, a parent goes only
        once it has no child left, so a batch never breaks a foreign key from a child to its
        parent: rounds go on while the previous one deleted something.
        """
        host = self.host
        task_id = host.task_col("id")
        condition = self._purge_batch_condition(cutoff)
        total = 0
        batch = self._retry(self._purge_batch)
        while True:
            with self.reader.connect() as connection:
                pks = list(
                    connection.execute(
                        sa.select(task_id).where(condition).order_by(task_id)
                    ).scalars()
                )
            deleted = 0
            for part in chunks(pks, self.batch_size):
                deleted += batch(part, condition, source, now)
            total += deleted
            if deleted == 0 or host.parent_col is None:
                return total

    def _purge_batch_condition(self, cutoff: datetime) -> ColumnElement[bool]:
        host = self.host
        condition = self._purgeable_condition(cutoff)
        parent = host.parent_col
        if parent is not None:
            child = host.tasks.alias("child")
            condition = sa.and_(
                condition,
                ~sa.exists().where(child.c[parent.name] == host.task_col("id")),
            )
        return condition

    def _purge_batch(
        self, pks: Sequence[Any], condition: ColumnElement[bool], source: str, now: datetime
    ) -> int:
        host = self.host
        task_id = host.task_col("id")
        journal = _Journal(source, now)
        with self._write() as connection:
            rows = connection.execute(
                self.locked(
                    sa.select(host.tasks).where(task_id.in_(pks), condition).order_by(task_id),
                    connection,
                )
            ).all()
            if not rows:
                return 0
            for row in rows:
                journal.add("task_purged", host.tasks, row, _task_key(host, row))
            pks = [row._mapping[task_id] for row in rows]
            connection.execute(sa.delete(host.tasks).where(task_id.in_(pks)))
            journal.write(connection)
        return len(rows)

    # -- the journal's own retention ------------------------------------------------------------

    def _journal_before(self, cutoff: datetime) -> ColumnElement[bool]:
        return journal_table.c.at < db.to_db_time(cutoff)

    def count_journal_before(self, cutoff: datetime) -> int:
        """How many journal entries :meth:`purge_journal` would delete now."""
        query = sa.select(sa.func.count()).where(self._journal_before(cutoff))
        with self.reader.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def purge_journal(self, cutoff: datetime) -> int:
        """Delete journal entries recorded before ``cutoff``, oldest first, a batch per
        transaction. The deletions themselves are not journalled: they undo nothing a user
        could restore into the host's tables, they only forget how to."""
        batch = self._retry(self._purge_journal_batch)
        total = 0
        while True:
            found, deleted = batch(cutoff)
            total += deleted
            if found < self.batch_size:
                return total

    def _purge_journal_batch(self, cutoff: datetime) -> tuple[int, int]:
        """(entries found, entries this transaction deleted)."""
        entry_id = journal_table.c.id
        deleted = 0
        with self._write() as connection:
            ids = list(
                connection.execute(
                    sa.select(entry_id)
                    .where(self._journal_before(cutoff))
                    .order_by(entry_id)
                    .limit(self.batch_size)
                ).scalars()
            )
            if ids:
                result = connection.execute(sa.delete(journal_table).where(entry_id.in_(ids)))
                deleted = result.rowcount
        return len(ids), deleted


def _task_key(host: HostTables, row: Row[Any]) -> AppKey:
    mapping = row._mapping
    return AppKey(
        mapping[host.task_col("target_model")], int(mapping[host.task_col("target_app_number")])
    )


def _set_task_status(
    connection: Connection,
    host: HostTables,
    rows: Sequence[Row[Any]],
    *,
    new_status: str,
    message: Callable[[AppKey], str] | ColumnElement[str],
    now: datetime,
    journal: _Journal,
    action: str,
    dry_run: bool,
) -> list[TaskChange]:
    """The one way a task's status changes: compare-and-set on the status read, journalled.

    The rows were read under lock in this transaction, so every compare-and-set must match; if
    one does not, the transaction is rolled back and the batch tried again from a fresh read.
    ``message`` is the error message: a function of the task's app, or a SQL expression over
    the task's row (one UPDATE per old status then, however many apps the batch holds).
    """
    id_col, status_col = host.task_col("id"), host.task_col("status")
    # The columns are resolved once, not once per row: a batch holds hundreds of rows.
    task_id_col, model_col, number_col = (
        host.task_col(role) for role in ("task_id", "target_model", "target_app_number")
    )
    changes: list[TaskChange] = []
    by_group: dict[tuple[str, str | ColumnElement[str]], list[Any]] = {}
    for row in rows:
        mapping = row._mapping
        pk, old_status = mapping[id_col], mapping[status_col]
        key = AppKey(mapping[model_col], int(mapping[number_col]))
        changes.append(TaskChange(pk, str(mapping[task_id_col]), key, old_status, new_status))
        journal.add(action, host.tasks, row, key, old_status=old_status, new_status=new_status)
        text = message if isinstance(message, ColumnElement) else message(key)
        by_group.setdefault((old_status, text), []).append(pk)
    if dry_run:
        return changes
    stamp = db.to_db_time(now)
    for (old_status, text), pks in by_group.items():
        values: dict[str, Any] = {
            status_col.name: new_status,
            host.config.tasks.completed_at: stamp,
        }
        if host.has_error_message:
            values[host.config.tasks.error_message] = text
        for part in chunks(pks, 1000):
            result = connection.execute(
                sa.update(host.tasks)
                .where(id_col.in_(part), status_col == old_status)
                .values(values)
            )
            if result.rowcount != len(part):
                raise db.StaleRead(
                    f"{len(part) - result.rowcount} task(s) changed status under the tool's lock"
                )
    return changes


def _cancel_message(
    template: str, host: HostTables
) -> Callable[[AppKey], str] | ColumnElement[str]:
    """The removal's cancel message for each task, built by the database when it can be.

    A template that only names ``{model_slug}`` and ``{app_number}`` (no format spec or
    conversion) becomes a concatenation over the task's own target columns, so a batch's tasks
    are cancelled by one UPDATE per old status instead of one per app. Anything else is
    formatted in Python, one app at a time.
    """

    def per_key(key: AppKey) -> str:
        return template.format(model_slug=key.model_slug, app_number=key.app_number)

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return per_key
    pieces: list[ColumnElement[str]] = []
    for literal, field_name, spec, conversion in parsed:
        if literal:
            pieces.append(sa.literal(literal, sa.String()))
        if field_name is None:
            continue
        if spec or conversion:
            return per_key
        if field_name == "model_slug":
            pieces.append(sa.cast(host.task_col("target_model"), sa.String()))
        elif field_name == "app_number":
            number: ColumnElement[Any] = host.task_col("target_app_number")
            if not isinstance(number.type, sa.Integer):
                number = sa.cast(number, sa.Integer())  # as int(...) does for the key
            pieces.append(sa.cast(number, sa.String()))
        else:
            return per_key
    if not pieces:
        return sa.literal("", sa.String())
    expression = pieces[0]
    for piece in pieces[1:]:
        expression = expression + piece
    return expression


class _Journal:
    """Journal entries gathered during one transaction and written in one statement."""

    def __init__(self, source: str, now: datetime) -> None:
        self.batch_id = str(uuid.uuid4())
        self.source = source
        self.at = db.to_db_time(now)
        self.entries: list[dict[str, Any]] = []

    def add(
        self,
        action: str,
        table: Table,
        row: Row[Any],
        key: AppKey | None,
        *,
        old_status: str | None = None,
        new_status: str | None = None,
    ) -> None:
        # Plain names, not Row._mapping lookups: this runs for every row a batch changes.
        image = dict(zip(row._fields, row, strict=True))
        pk_values = [image[column.key] for column in table.primary_key.columns]
        self.entries.append(
            {
                "batch_id": self.batch_id,
                "at": self.at,
                "action": action,
                "source": self.source,
                "table_name": table.name,
                "row_key": _KEY_ENCODER.encode(pk_values),
                "model_slug": key.model_slug if key else None,
                "app_number": key.app_number if key else None,
                "old_status": old_status,
                "new_status": new_status,
                "before_image": _IMAGE_ENCODER.encode(image),
                "restored_at": None,
            }
        )

    def write(self, connection: Connection) -> None:
        if self.entries:
            connection.execute(sa.insert(journal_table), self.entries)
            self.entries = []
