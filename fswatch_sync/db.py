"""Engines, transactions and the retry policy for transient database errors.

SQLite: pysqlite's own implicit ``BEGIN`` is switched off so that every write transaction starts
with ``BEGIN IMMEDIATE``: the write lock is taken before the first read, so what a transaction
read is still true when it writes (the compare-and-set cannot be overtaken between the two).
PostgreSQL and MariaDB lock the rows they read with ``SELECT ... FOR UPDATE`` instead.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from fswatch_sync.text import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

_READ_ONLY = "fswatch_sync_read_only"
SQLITE_BUSY_TIMEOUT_MS = 2000
# PostgreSQL SQLSTATEs worth another try: serialization failure, deadlock, lock not available,
# the backend terminated by an administrator, and the whole connection-exception class.
_PG_TRANSIENT = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}
# MySQL/MariaDB: deadlock, lock wait timeout, server gone, lost connection, can't connect,
# connection killed, query interrupted.
_MYSQL_TRANSIENT = {1205, 1213, 2002, 2003, 2006, 2013, 2055, 1927, 1317, 4031}
# A PostgreSQL driver's OperationalError with no SQLSTATE comes from the client library: the
# connection was refused, timed out, or closed under it (a restart, a failover), all of which
# another try may not meet. The exceptions are what the server refused for good at log-in.
_PG_DRIVERS = ("psycopg", "psycopg2")
_PG_PERMANENT_AT_CONNECT = (
    "authentication",
    "password",
    "does not exist",
    "pg_hba.conf",
    "permission denied",
)


def create_engine(
    url: str, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, **kwargs: Any
) -> Engine:
    """An Engine set up for this tool's transactions on any supported backend.

    ``busy_timeout_ms``: how long one SQLite statement waits for another writer's lock before
    failing with "database is locked" (which the store then retries with backoff).
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    # A server's connection may have been dropped while it sat in the pool; a SQLite file's
    # cannot, so it is not pinged before every transaction.
    options: dict[str, Any] = {"pool_pre_ping": backend != "sqlite"}
    if backend == "mysql" or backend == "mariadb":
        # READ COMMITTED avoids InnoDB's gap locks, the usual source of deadlocks between the
        # sweep and a task runner; rows the tool changes are locked explicitly.
        options["isolation_level"] = "READ COMMITTED"
    if backend == "sqlite":
        options["connect_args"] = {"timeout": busy_timeout_ms / 1000}
        # The connection used last is used next: SQLite keeps a page cache per connection and
        # drops it whenever another connection has written, so handing batches round the pool
        # would start every batch cold.
        options["pool_use_lifo"] = True
    options.update(kwargs)
    engine = sa.create_engine(url, **options)
    if backend == "sqlite":
        _make_sqlite_transactional(engine, busy_timeout_ms)
    else:
        _use_utc_sessions(engine, backend)
    return engine


def _use_utc_sessions(engine: Engine, backend: str) -> None:
    """Every session of the tool's own engine speaks UTC, whatever the server's default or the
    client's PGTZ: a naive UTC value compared with a ``timestamptz`` (PostgreSQL) or written to a
    ``TIMESTAMP`` (MariaDB converts those from the session zone) then means what it says."""
    statement = "SET TIME ZONE 'UTC'" if backend == "postgresql" else "SET time_zone = '+00:00'"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()
        if backend == "postgresql":
            # psycopg opens a transaction for the SET; end it so the pool gets a clean connection.
            dbapi_connection.commit()


def _make_sqlite_transactional(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Foreign keys are enforced so that a host's constraints mean the same as on servers.
        cursor.execute("PRAGMA foreign_keys = ON")
        # In WAL mode, NORMAL syncs at checkpoints instead of at every commit: a power loss may
        # roll back the last commits, each one whole (host rows and journal together), and the
        # next sweep redoes them. In rollback-journal mode the host's own durability is kept.
        row = cursor.execute("PRAGMA journal_mode").fetchone()
        if row is not None and str(row[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    """The same pool, for transactions that only read (no write lock on SQLite)."""
    return engine.execution_options(**{_READ_ONLY: True})


def is_read_only(connection: Connection) -> bool:
    return bool(connection.get_execution_options().get(_READ_ONLY))


def is_sqlite(engine_or_conn: Engine | Connection) -> bool:
    return engine_or_conn.dialect.name == "sqlite"


def locks_rows(engine_or_conn: Engine | Connection) -> bool:
    """Whether ``SELECT ... FOR UPDATE`` is how this backend keeps read rows unchanged."""
    return not is_sqlite(engine_or_conn)


def is_transient(exc: BaseException) -> bool:
    """A database error that another try may not meet: locks, deadlocks, lost connections."""
    if isinstance(exc, StaleRead):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in _PG_TRANSIENT or sqlstate.startswith("08")
    if _is_pg_client_error(exc):
        text = str(orig).lower()
        return not any(phrase in text for phrase in _PG_PERMANENT_AT_CONNECT)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_TRANSIENT
    return False


def _is_pg_client_error(exc: DBAPIError) -> bool:
    """A PostgreSQL driver's OperationalError (or subclass) that carries no SQLSTATE."""
    orig = exc.orig
    from_pg_driver = any(
        cls.__name__ == "OperationalError" and cls.__module__.split(".")[0] in _PG_DRIVERS
        for cls in type(orig).__mro__
    )
    return (
        isinstance(exc, OperationalError)
        and from_pg_driver
        and getattr(orig, "sqlstate", getattr(orig, "pgcode", None)) is None
    )


class StaleRead(Exception):
    """A compare-and-set found the row changed since it was read; the batch is tried again."""


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "transient database error, retry %d in %.2fs: %s",
        state.attempt_number,
        state.next_action.sleep if state.next_action else 0.0,
        first_line(exc) if exc else "",
    )


def retrying(max_seconds: float = 60.0) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a whole transaction on transient errors, with exponential backoff and jitter."""
    return retry(
        retry=retry_if_exception(is_transient),
        # 50 ms doubling up to 2 s, plus up to 50 ms of jitter so that contenders spread out.
        # (Not wait_exponential_jitter: its 'initial' is deprecated in tenacity 9 and
        # 'multiplier' is missing in 8.x; these two exist in every version we accept.)
        wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
        stop=stop_after_delay(max_seconds),
        before_sleep=_log_retry,
        reraise=True,
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_db_time(moment: datetime) -> datetime:
    """Naive UTC, the form timestamps are stored in (naive values are read as UTC)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def bind_time(column: Any, moment: datetime) -> datetime:
    """``moment`` in the form ``column`` holds: aware UTC for a zone-aware column (correct
    whatever the session's zone), naive UTC otherwise (naive values are read as UTC)."""
    column_type = getattr(column, "type", None)
    if getattr(column_type, "timezone", False):
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return to_db_time(moment)


def from_db_time(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def one_of(column: sa.ColumnElement[Any], values: Iterable[Any]) -> sa.ColumnElement[bool]:
    """``column IN (values)`` for a batch's keys. Integers are written into the statement
    itself: thousands of placeholders cost more to parse (driver and server) than the work, and
    the statement stays cacheable, its values not being part of it."""
    chosen = list(values)
    if chosen and all(type(value) is int for value in chosen):
        return column.in_(sa.bindparam(None, chosen, expanding=True, literal_execute=True))
    return column.in_(chosen)


class _Unindexed(sa.sql.expression.ColumnElement[Any]):
    """A column SQLite must not look up through an index (``+column``, SQLite's own idiom);
    the column itself on other backends."""

    inherit_cache = True
    # A list, as SQLAlchemy declares it on its own elements.
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: sa.ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _unindexed_default(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_Unindexed, "sqlite")
def _unindexed_sqlite(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


def unindexed(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``column`` for a condition that matches most of a table (terminal tasks): walking the
    table in key order, as a keyset batch does, beats SQLite's choice of the column's index,
    which reads every match and sorts them again for each batch."""
    return _Unindexed(column)


class _ProbedExists(sa.sql.expression.ColumnElement[bool]):
    """``EXISTS (query)``; on PostgreSQL the query is fenced (``OFFSET 0``) so that it runs
    once per outer row instead of being joined."""

    inherit_cache = True
    type = sa.Boolean()
    # A condition in itself: never rendered "= 1" where booleans are integers.
    _is_implicitly_boolean = True
    _traverse_internals = [  # noqa: RUF012 - a list, as SQLAlchemy declares it
        ("plain", InternalTraversal.dp_clauseelement),
        ("fenced", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, plain: sa.ColumnElement[bool], fenced: sa.ColumnElement[bool]) -> None:
        self.plain = plain
        self.fenced = fenced

    def _negate(self) -> sa.ColumnElement[bool]:
        # NOT EXISTS on every backend (not "EXISTS (...) = 0" where booleans are integers).
        return _ProbedExists(sa.not_(self.plain), sa.not_(self.fenced))


@compiles(_ProbedExists)
def _probed_exists_default(element: _ProbedExists, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.plain, **kw))


@compiles(_ProbedExists, "postgresql")
def _probed_exists_postgresql(element: _ProbedExists, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.fenced, **kw))


def probed_exists(query: sa.Select[Any]) -> sa.ColumnElement[bool]:
    """``EXISTS (query)`` for a few outer rows, each answered by an index probe (a batch's app
    rows, their young siblings). PostgreSQL would otherwise turn it into an anti-join and, the
    inner condition having no index of its own, scan the whole table once per statement."""
    return _ProbedExists(sa.exists(query), sa.exists(query.offset(sa.literal_column("0"))))
