"""The tool's access to the host's rows: transactions, reads, and applying the rules.

There is one way to remove an app (:meth:`Store.remove_apps`, the app rule applied to keys) and
one way to change tasks (:meth:`Store.apply_task_rule`); the reactor and every sweep pass go
through them. A batch is one transaction of a few statements: lock the batch's rows (keyset by
primary key), journal them with ``INSERT ... SELECT`` (the database builds each before-image),
then the ``UPDATE``/``DELETE`` on the same rows, whose row count must match. Batches grow or
shrink so that one write transaction stays within ``max_transaction_ms``. Every batch is retried
as a whole on transient errors.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy import ColumnElement, Select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from fswatch_sync import db
from fswatch_sync.hostschema import HostTables, ResolvedDependent, reflect_host_tables
from fswatch_sync.images import JournalWriter
from fswatch_sync.layout import AppKey
from fswatch_sync.marks import Marks
from fswatch_sync.rules import Delete, SetStatus, TaskRule, keys_clause, young_row
from fswatch_sync.schema import SchemaConfig, default_host_metadata, journal_table, tool_metadata
from fswatch_sync.settings import Settings
from fswatch_sync.text import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
CommitCheck = Callable[[Connection], None]

# Bounds of the adaptive batch: a bound parameter per row, and SQLite allows 32766 per statement.
MIN_BATCH = 20
MAX_BATCH = 20_000

__all__ = [
    "AppRow", "RemovalOutcome", "RuleOutcome", "Store", "TaskChange", "chunks", "keys_clause"
]


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
    """What a call to :meth:`Store.remove_apps` did (counts are of keys unless named rows)."""

    removed: list[AppKey] = field(default_factory=list)
    removed_rows: int = 0
    # Every cancelled task is counted; each is listed only when asked for (signals).
    cancelled_count: int = 0
    cancelled: list[TaskChange] = field(default_factory=list)
    blocked: list[AppKey] = field(default_factory=list)
    present: list[AppKey] = field(default_factory=list)
    marked: list[AppKey] = field(default_factory=list)
    # Keys the database refused to change (a host constraint, a trigger): left for a later try.
    failed: list[AppKey] = field(default_factory=list)
    dependents_deleted: int = 0
    dependents_nullified: int = 0

    def extend(self, other: RemovalOutcome) -> None:
        self.removed += other.removed
        self.removed_rows += other.removed_rows
        self.cancelled_count += other.cancelled_count
        self.cancelled += other.cancelled
        self.blocked += other.blocked
        self.present += other.present
        self.marked += other.marked
        self.failed += other.failed
        self.dependents_deleted += other.dependents_deleted
        self.dependents_nullified += other.dependents_nullified


@dataclass
class RuleOutcome:
    """What one task rule did: how many rows, and each change when they were asked for."""

    name: str
    count: int = 0
    kept: int = 0
    # Rows the database refused to change (each isolated and skipped; the next sweep retries).
    failed: int = 0
    changes: list[TaskChange] = field(default_factory=list)


class AppRow(NamedTuple):
    """One app key as the sweep reads it: its rows, and whether the youngest is in the grace."""

    model_slug: str
    app_number: int
    rows: int
    young: int


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BatchSizer:
    """A batch size that follows the time budget: rows per transaction grow while batches end
    well inside ``budget`` seconds and shrink when one overruns it."""

    def __init__(self, initial: int, budget: float) -> None:
        self.size = max(1, min(initial, MAX_BATCH))
        self.minimum = min(self.size, MIN_BATCH)
        self.budget = budget

    def record(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        # Aim at 70% of the budget; at most double or quarter per step, so one odd batch (a
        # checkpoint, a cold cache) cannot swing the size far.
        target = int(rows * self.budget * 0.7 / seconds)
        self.size = max(self.minimum, min(MAX_BATCH, self.size * 2, max(self.size // 4, target)))


class Store:
    """The tool's access to the host's rows and its own tables."""

    def __init__(
        self,
        engine: Engine,
        config: SchemaConfig | None = None,
        *,
        batch_size: int = 500,
        retry_seconds: float = 60.0,
        max_transaction_ms: float = 100.0,
    ) -> None:
        self.engine = engine
        self.reader = db.read_only(engine)
        self.config = config or SchemaConfig()
        self.batch_size = batch_size
        self.retry_seconds = retry_seconds
        self.max_transaction_ms = max_transaction_ms
        self._host: HostTables | None = None
        self.commit_check: CommitCheck | None = None
        # Set while rehearsing (a dry run): every batch runs on this connection, rolled back.
        self._rehearsal: Connection | None = None

    # -- set-up -------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """A store on a new engine for the settings' database, schema and batch size."""
        return cls(
            db.create_engine(settings.database_url),
            settings.schema,
            batch_size=settings.batch_size,
            max_transaction_ms=settings.max_transaction_ms,
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
        """The host's tables, reflected and validated (SettingsError when the mapping cannot
        work: raised before any change)."""
        if self._host is None:
            self._host = reflect_host_tables(self.reader, self.config)
        return self._host

    def validate(self) -> None:
        """Reflect and check the mapping now (SettingsError, naming the mapping key)."""
        self.host  # noqa: B018

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def rehearsal(self) -> Iterator[Store]:
        """A store on which every change is made in one transaction that is then rolled back:
        a dry run applies the very same rules and statements as a real run, so it reports what a
        real run would do (holding the write lock, on SQLite, while it runs)."""
        self.host  # noqa: B018
        with self.engine.connect() as connection:
            transaction = connection.begin()
            clone = copy.copy(self)
            clone.commit_check = None
            clone._rehearsal = connection
            try:
                yield clone
            finally:
                transaction.rollback()

    @property
    def rehearsing(self) -> bool:
        return self._rehearsal is not None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        if self._rehearsal is not None:
            # A savepoint per batch: a batch the database refuses is undone alone, as a real
            # run's transaction would be, and the rehearsal goes on.
            with self._rehearsal.begin_nested():
                yield self._rehearsal
            return
        with self.engine.begin() as connection:
            yield connection
            if self.commit_check is not None:
                self.commit_check(connection)

    def _retry(self, function: Callable[..., T]) -> Callable[..., T]:
        if self._rehearsal is not None:
            return function  # one transaction: a batch cannot be retried alone
        return db.retrying(self.retry_seconds)(function)

    def locked(self, statement: Select[Any], connection: Connection) -> Select[Any]:
        """Rows read to be changed stay as read until the commit: ``FOR UPDATE`` on servers;
        SQLite's ``BEGIN IMMEDIATE`` already holds the write lock."""
        if db.locks_rows(connection) and not db.is_read_only(connection):
            return statement.with_for_update()
        return statement

    # -- reading --------------------------------------------------------------------------------

    def app_rows(self, young_after: datetime | None = None) -> list[AppRow]:
        """Every app key as ``(model_slug, app_number, rows, young)``: how many rows it owns and
        whether any was created after ``young_after``. One grouped read; the database judges
        every timestamp, and the rows stay plain tuples (the sweep reads tens of thousands)."""
        host = self.host
        slug, number = host.app_col("model_slug"), host.app_col("app_number")
        young: ColumnElement[Any] = sa.literal(0)
        if young_after is not None:
            young = sa.func.max(sa.case((young_row(host, young_after), 1), else_=0))
        statement = sa.select(slug, number, sa.func.count(), young).group_by(slug, number)
        with self._reading() as connection:
            return connection.execute(statement).all()  # type: ignore[return-value]

    def app_rows_exist(self) -> bool:
        host = self.host
        with self.reader.connect() as connection:
            found = connection.execute(sa.select(host.app_col("id")).limit(1)).first()
        return found is not None

    def app_keys_for_slug(self, slug: str) -> list[AppKey]:
        """Every app key of one model (a whole model directory has gone)."""
        host = self.host
        slug_col, number_col = host.app_col("model_slug"), host.app_col("app_number")
        with self.reader.connect() as connection:
            rows = connection.execute(
                sa.select(number_col).where(slug_col == slug).distinct()
            ).all()
        return [AppKey(slug, int(number)) for (number,) in rows]

    # -- the one way to change tasks --------------------------------------------------------------

    def apply_task_rule(
        self, rule: TaskRule, *, source: str, now: datetime, collect: bool = False
    ) -> RuleOutcome:
        """Apply ``rule`` to every task it matches, in keyset batches of one transaction each.

        ``collect``: also return each change (for per-task signals); otherwise no changed row
        passes through Python.
        """
        outcome = RuleOutcome(rule.name)
        batch = self._retry(self._task_batch)
        while True:
            sizer = BatchSizer(self.batch_size, self.max_transaction_ms / 1000)
            after: Any = None
            changed_this_round = 0
            while True:
                started = time.monotonic()
                try:
                    upper, changed, changes = batch(rule, after, sizer.size, source, now, collect)
                except DBAPIError as exc:
                    if db.is_transient(exc):
                        raise
                    # A row the database refuses (a host constraint, a trigger): narrow the
                    # batch down to it, skip it, and go on with the others.
                    if sizer.size > 1:
                        sizer.size = max(1, sizer.size // 2)
                        sizer.minimum = min(sizer.minimum, sizer.size)
                        continue
                    after = self._first_match(rule, after)
                    outcome.failed += 1
                    log.warning(
                        "task %r left for the next sweep: the database refused %s: %s",
                        after,
                        rule.name.replace("_", " "),
                        first_line(exc),
                    )
                    continue
                if upper is None:
                    break
                sizer.record(changed, time.monotonic() - started)
                after = upper
                changed_this_round += changed
                outcome.changes += changes
            outcome.count += changed_this_round
            if not rule.repeat or changed_this_round == 0:
                break
        if rule.kept is not None:
            with self._reading() as connection:
                query = sa.select(sa.func.count()).select_from(self.host.tasks).where(rule.kept)
                outcome.kept = int(connection.execute(query).scalar_one())
            if outcome.kept:
                log.warning(
                    "%d old task(s) kept: rows of another table point at them (policy restrict)",
                    outcome.kept,
                )
        return outcome

    def _first_match(self, rule: TaskRule, after: Any) -> Any:
        pk = self.host.task_col("id")
        window = rule.where if after is None else sa.and_(rule.where, pk > after)
        with self._reading() as connection:
            return connection.execute(sa.select(pk).where(window).order_by(pk).limit(1)).scalar()

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        if self._rehearsal is not None:
            yield self._rehearsal
            return
        with self.reader.connect() as connection:
            yield connection

    def _task_batch(
        self, rule: TaskRule, after: Any, size: int, source: str, now: datetime, collect: bool
    ) -> tuple[Any, int, list[TaskChange]]:
        host = self.host
        pk = host.task_col("id")
        with self._write() as connection:
            window = rule.where if after is None else sa.and_(rule.where, pk > after)
            pks = list(
                connection.execute(
                    self.locked(sa.select(pk).where(window).order_by(pk).limit(size), connection)
                ).scalars()
            )
            if not pks:
                return None, 0, []
            chosen = db.one_of(pk, pks)
            new_status = rule.effect.status if isinstance(rule.effect, SetStatus) else None
            changes = self._task_changes(connection, chosen, new_status) if collect else []
            journal = JournalWriter(connection, source=source, now=now)
            journal.record(
                rule.action,
                host.tasks,
                chosen,
                key=(host.task_col("target_model"), host.task_col("target_app_number")),
                status=host.task_col("status"),
                new_status=new_status,
            )
            if isinstance(rule.effect, Delete):
                for dependent in host.task_dependents:
                    if dependent.policy != "restrict":
                        self._follow_policy(
                            connection, dependent, host.tasks, chosen, journal, None
                        )
                result = connection.execute(sa.delete(host.tasks).where(chosen))
            else:
                result = self._set_status(connection, chosen, rule.effect, now)
            if result.rowcount != len(pks):
                raise db.StaleRead(
                    f"{len(pks) - result.rowcount} task(s) changed under the tool's lock"
                )
        return pks[-1], len(pks), changes

    def _task_changes(
        self, connection: Connection, where: ColumnElement[bool], new_status: str | None
    ) -> list[TaskChange]:
        host = self.host
        columns = [
            host.task_col(role)
            for role in ("id", "task_id", "target_model", "target_app_number", "status")
        ]
        return [
            TaskChange(pk, str(task_id), AppKey(model, int(number)), status, new_status or "")
            for pk, task_id, model, number, status in connection.execute(
                sa.select(*columns).where(where).order_by(columns[0])
            )
        ]

    def _set_status(
        self, connection: Connection, where: ColumnElement[bool], effect: SetStatus, now: datetime
    ) -> Any:
        """The one way a task's status changes: only from an active status (the compare-and-set
        on what was read under lock), with ``completed_at`` and the rule's message."""
        host = self.host
        config = host.config.tasks
        completed = host.task_col("completed_at")
        values: dict[str, Any] = {
            config.status: effect.status,
            config.completed_at: db.bind_time(completed, now),
        }
        if host.has_error_message:
            values[config.error_message] = effect.message
        if config.updated_at:
            values[config.updated_at] = db.bind_time(host.task_col("updated_at"), now)
        return connection.execute(
            sa.update(host.tasks)
            .where(where, host.task_col("status").in_(host.config.statuses.active))
            .values(values)
        )

    def _follow_policy(
        self,
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
        pointing = self._pointing(dependent, target, target_where)
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

    @staticmethod
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

    # -- the one way to remove apps --------------------------------------------------------------

    def remove_apps(
        self,
        keys: Iterable[AppKey],
        *,
        source: str,
        now: datetime,
        still_absent: Callable[[AppKey], bool] | None = None,
        dry_run: bool = False,
        young_after: datetime | None = None,
        missing_grace: timedelta | None = None,
        cancel_when_missing: bool = True,
        collect: bool = True,
        isolate: bool = False,
    ) -> RemovalOutcome:
        """The app rule applied to ``keys``: see :func:`fswatch_sync.removal.remove_apps`."""
        # Imported here: removal builds on this module's batches and outcomes.
        from fswatch_sync.removal import remove_apps

        return remove_apps(
            self,
            keys,
            source=source,
            now=now,
            still_absent=still_absent,
            dry_run=dry_run,
            young_after=young_after,
            missing_grace=missing_grace,
            cancel_when_missing=cancel_when_missing,
            collect=collect,
            isolate=isolate,
        )

    def clear_marks_of(self, present: set[AppKey]) -> int:
        """Forget the missing-since marks of keys whose directory is back."""
        marks = Marks(self.host)
        with self._write() as connection:
            back = [key for key in marks.all_marked(connection) if key in present]
            return marks.clear(connection, back)

    # -- the journal's own retention ------------------------------------------------------------

    def _journal_before(self, cutoff: datetime) -> ColumnElement[bool]:
        return journal_table.c.at < db.to_db_time(cutoff)

    def count_journal_before(self, cutoff: datetime) -> int:
        """How many journal entries :meth:`purge_journal` would delete now."""
        query = sa.select(sa.func.count()).where(self._journal_before(cutoff))
        with self._reading() as connection:
            return int(connection.execute(query).scalar_one())

    def purge_journal(self, cutoff: datetime) -> int:
        """Delete journal entries recorded before ``cutoff``, oldest first, a batch per
        transaction. The deletions themselves are not journalled: they undo nothing a user
        could restore into the host's tables, they only forget how to."""
        batch = self._retry(self._purge_journal_batch)
        sizer = BatchSizer(self.batch_size, self.max_transaction_ms / 1000)
        total = 0
        while True:
            started = time.monotonic()
            found, deleted = batch(cutoff, sizer.size)
            sizer.record(deleted, time.monotonic() - started)
            total += deleted
            if found == 0:
                return total

    def _purge_journal_batch(self, cutoff: datetime, size: int) -> tuple[int, int]:
        """(entries found, entries this transaction deleted)."""
        entry_id = journal_table.c.id
        with self._write() as connection:
            ids = list(
                connection.execute(
                    sa.select(entry_id)
                    .where(self._journal_before(cutoff))
                    .order_by(entry_id)
                    .limit(size)
                ).scalars()
            )
            if not ids:
                return 0, 0
            result = connection.execute(sa.delete(journal_table).where(db.one_of(entry_id, ids)))
        return len(ids), int(result.rowcount)
