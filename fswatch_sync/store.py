"""The tool's access to the host's rows: transactions, reads, and applying the rules.

There is one way to remove an app (:meth:`Store.remove_apps`, the app rule applied to keys) and
one way to change tasks (:meth:`Store.apply_task_rule`); the reactor and every sweep pass go
through them. A batch is one transaction of a few statements (see :mod:`fswatch_sync.changes`):
its rows journalled with their before-images built by the database and changed as a
compare-and-set on what was read. Batches grow or shrink so that one write transaction stays
within ``max_transaction_ms``. Every batch is retried as a whole on transient errors.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import ColumnElement, Select
from sqlalchemy.engine import Connection, Engine

from fswatch_sync import db, gcpause, wal
from fswatch_sync.batching import BatchSizer, chunks
from fswatch_sync.hostschema import HostTables, reflect_host_tables
from fswatch_sync.layout import AppKey
from fswatch_sync.marks import Marks
from fswatch_sync.outcomes import AppRow, RemovalOutcome, RuleOutcome, TaskChange
from fswatch_sync.rules import TaskRule, keys_clause, young_row
from fswatch_sync.schema import SchemaConfig, default_host_metadata, journal_table, tool_metadata
from fswatch_sync.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
# Rows per fetch of the sweep's read of every app row (memory stays bounded at any size).
_READ_CHUNK = 10_000
CommitCheck = Callable[[Connection], None]

__all__ = [
    "AppRow", "RemovalOutcome", "RuleOutcome", "Store", "TaskChange", "chunks", "keys_clause"
]


class Store:
    """The tool's access to the host's rows and its own tables."""

    def __init__(
        self,
        engine: Engine,
        config: SchemaConfig | None = None,
        *,
        batch_size: int = 200,
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
        # Set on a sweep's store: its commits since the last checkpoint (see fswatch_sync.wal).
        self._bulk: wal.BulkPass | None = None

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

    def bulk(self) -> Store:
        """The same store for a bulk pass (a sweep): on SQLite its commits leave the
        write-ahead log to grow, and it is checkpointed every few commits and when the pass is
        over (:meth:`end_bulk`), outside any write transaction."""
        clone = copy.copy(self)
        clone._bulk = wal.BulkPass()
        return clone

    def end_bulk(self) -> None:
        """The bulk pass is over: checkpoint what its commits left in the log."""
        if self._bulk is None or self._bulk.commits == 0 or not wal.applies(self.engine):
            return
        self._bulk.commits = 0
        with self.engine.connect() as connection:
            wal.checkpoint(connection)

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

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        if self._rehearsal is not None:
            # A savepoint per batch: a batch the database refuses is undone alone, as a real
            # run's transaction would be, and the rehearsal goes on.
            with self._rehearsal.begin_nested():
                yield self._rehearsal
            return
        bulk = self._bulk if self._bulk is not None and wal.applies(self.engine) else None
        with self.engine.connect() as connection:
            committed = False
            try:
                # BEGIN first (SQLite's waits for the write lock): the collector is paused from
                # then to the commit, where a pass would hold the lock for its own length.
                transaction = connection.begin()
                with gcpause.held(), transaction:
                    if bulk is not None:
                        wal.defer(connection)
                    yield connection
                    if self.commit_check is not None:
                        self.commit_check(connection)
                committed = True
            finally:
                if bulk is not None:
                    bulk.after(connection, committed=committed)

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
        whether any was created after ``young_after`` (the database judges every timestamp).

        One plain read of the table, counted per key here: a GROUP BY walks the (slug, number)
        index and fetches every row through it, three times the cost of reading the table in
        its own order, and a key has one row but for the rare versioned host."""
        host = self.host
        slug, number = host.app_col("model_slug"), host.app_col("app_number")
        young: ColumnElement[Any] = sa.literal(0)
        if young_after is not None:
            young = sa.case((young_row(host, young_after), 1), else_=0)
        owned: dict[tuple[str, int], int] = {}
        young_keys: set[tuple[str, int]] = set()
        # In chunks, each dropped once counted, with the collector paused, the returned list
        # built inside the pause too: reference counting frees the rows, and a collector left
        # running would walk the heap again and again while they and the list's tuples are made
        # (on 50k apps, 140 collector passes a sweep without the pause, 77 with it).
        with self._reading() as connection, gcpause.held():
            result = connection.execute(sa.select(slug, number, young))
            for chunk in result.partitions(_READ_CHUNK):
                for model, app_number, is_young in chunk:
                    key = (model, app_number)
                    owned[key] = owned.get(key, 0) + 1
                    if is_young:
                        young_keys.add(key)
            return [(key[0], key[1], count, int(key in young_keys)) for key, count in owned.items()]

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
        """The one way tasks change: see :func:`fswatch_sync.changes.apply_task_rule`."""
        # Imported here: changes builds on this module's transactions and outcomes.
        from fswatch_sync.changes import apply_task_rule

        return apply_task_rule(self, rule, source=source, now=now, collect=collect)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        if self._rehearsal is not None:
            yield self._rehearsal
            return
        with self.reader.connect() as connection:
            yield connection

    # -- the one way to remove apps --------------------------------------------------------------

    def remove_apps(
        self,
        keys: Iterable[AppKey],
        *,
        source: str,
        now: datetime,
        present_now: Callable[[list[AppKey]], Collection[AppKey]] | None = None,
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
            present_now=present_now,
            dry_run=dry_run,
            young_after=young_after,
            missing_grace=missing_grace,
            cancel_when_missing=cancel_when_missing,
            collect=collect,
            isolate=isolate,
        )

    def count_marked(self) -> int:
        """How many app keys are marked missing now (waiting out the missing-since grace)."""
        with self._reading() as connection:
            return len(Marks(self.host).all_marked(connection))

    def clear_marks_of(self, present: AbstractSet[tuple[str, int]]) -> int:
        """Forget the missing-since marks of keys whose directory is back."""
        marks = Marks(self.host)
        with self._write() as connection:
            back = [key for key in marks.all_marked(connection) if key in present]
            return marks.clear(connection, back)

    # -- the journal's own retention ------------------------------------------------------------

    def _journal_before(self, cutoff: datetime) -> ColumnElement[bool]:
        return journal_table.c.at < db.to_db_time(cutoff)

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
