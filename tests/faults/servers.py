"""Throw-away databases for fault scenarios: a SQLite file, or a database of its own on the local
PostgreSQL or MariaDB server (so that terminating "every other backend of this database" can
only ever hit the scenario's own connections).

Server URLs come from the same variables as tests/conftest.py and must point at loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from faults.harness import Unavailable

T = TypeVar("T")

ADMIN_URLS = {
    "postgres": os.environ.get(
        "FSWATCH_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mysql": os.environ.get(
        "FSWATCH_SYNC_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
    ),
}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _admin_url(backend: str) -> sa.URL:
    url = sa.make_url(ADMIN_URLS[backend])
    if url.host not in LOOPBACK:
        raise Unavailable(f"{backend}: refusing a server that is not on loopback ({url.host})")
    return url


@contextmanager
def scratch_database(backend: str, workdir: Path) -> Iterator[str]:
    """A fresh empty database of ``backend``; dropped afterwards. Yields its URL."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'fault.db'}"
        return
    if backend not in ADMIN_URLS:
        raise ValueError(f"unknown backend {backend!r}")
    admin_url = _admin_url(backend)
    name = f"fswatch_fault_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        first = str(exc.orig or exc).strip().splitlines()
        raise Unavailable(f"{backend} unreachable: {first[0] if first else exc}") from None
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            if backend == "postgres":
                connection.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                )
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


def probe_engine(url: str) -> Engine:
    """An engine for seeding and observing, independent of the package's own engine set-up.

    No pool, so a connection killed by a scenario is never reused. On SQLite every transaction
    starts with a real ``BEGIN`` (pysqlite would not open one for a SELECT), so that a snapshot
    read in one transaction is consistent, and waits up to 10 s for another writer's lock.
    """
    engine = sa.create_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA busy_timeout = 10000")

        @sa.event.listens_for(engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine


def robust(function: Callable[[], T], *, seconds: float = 20.0) -> T:
    """Call ``function`` again while the database drops the connection (outage scenarios kill
    every connection of the database, the observer's included)."""
    return retry(
        retry=retry_if_exception_type(
            (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.InternalError)
        ),
        wait=wait_fixed(0.05),
        stop=stop_after_delay(seconds),
        reraise=True,
    )(function)()


def versions() -> list[str]:
    """One line naming each reachable server's version, for the report."""
    notes = []
    queries = {"postgres": "SHOW server_version", "mysql": "SELECT VERSION()"}
    for backend, query in queries.items():
        try:
            engine = sa.create_engine(_admin_url(backend), poolclass=NullPool)
            with engine.connect() as connection:
                version = connection.exec_driver_sql(query).scalar()
            engine.dispose()
        except Exception:
            continue
        notes.append(f"{backend} server: {version}")
    notes.append(f"SQLite: {sa.__name__} {sa.__version__}, sqlite3 {_sqlite_version()}")
    return notes


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version
