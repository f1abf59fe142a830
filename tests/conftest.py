"""Shared fixtures: a real database of each kind, a real directory tree, a clock.

PostgreSQL and MariaDB tests use a database created for this test session (so parallel runs on
one server never meet) and skip with a reason when the server cannot be reached — unless
``FSWATCH_SYNC_REQUIRE_DATABASES=1`` (set by ``.ci/run`` under CI), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import init_database, probe_engine, sqlite_url
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.dburl import redact_url
from fswatch_sync.layout import AppKey

POSTGRES_ADMIN_URL = os.environ.get(
    "FSWATCH_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get(
    "FSWATCH_SYNC_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)
REQUIRE_SERVERS = os.environ.get("FSWATCH_SYNC_REQUIRE_DATABASES", "") in ("1", "true", "yes")
BACKENDS = ("sqlite", "postgres", "mysql")

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


class _ServerDatabase:
    """One throw-away database on a server for the whole test session."""

    def __init__(self, admin_url: str, kind: str) -> None:
        self.admin_url = admin_url
        self.kind = kind
        self.name = f"fswatch_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.url: str | None = None
        self.error: str | None = None

    def create(self) -> None:
        try:
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {self.name}")
            admin.dispose()
        except Exception as exc:  # any failure to reach the server means "not here"
            self.error = f"{self.kind} unreachable at {redact_url(self.admin_url)}: " + (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            return
        self.url = sa.make_url(self.admin_url).set(database=self.name).render_as_string(
            hide_password=False
        )

    def drop(self) -> None:
        if self.url is None:
            return
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            if self.kind == "postgres":
                connection.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
                )
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.name}")
        admin.dispose()


@pytest.fixture(scope="session")
def server_databases() -> Iterator[dict[str, _ServerDatabase]]:
    servers = {
        "postgres": _ServerDatabase(POSTGRES_ADMIN_URL, "postgres"),
        "mysql": _ServerDatabase(MYSQL_ADMIN_URL, "mysql"),
    }
    for server in servers.values():
        server.create()
    yield servers
    for server in servers.values():
        server.drop()


def _drop_everything(engine: Engine) -> None:
    metadata = sa.MetaData()
    metadata.reflect(engine)
    if engine.dialect.name == "mysql":
        with engine.begin() as connection:
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            for table in metadata.sorted_tables:
                connection.exec_driver_sql(f"DROP TABLE IF EXISTS `{table.name}`")
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
        return
    metadata.drop_all(engine)


def database_url_for(
    backend: str, tmp_path: Path, servers: dict[str, _ServerDatabase]
) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    server = servers[backend]
    if server.url is None:
        if REQUIRE_SERVERS:
            pytest.fail(f"required database missing: {server.error}")
        pytest.skip(server.error or f"{backend} unavailable")
    engine = sa.create_engine(server.url)
    _drop_everything(engine)
    engine.dispose()
    return server.url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(
    backend: str, tmp_path: Path, server_databases: dict[str, _ServerDatabase]
) -> str:
    """A fresh, empty database of the parametrised kind."""
    return database_url_for(backend, tmp_path, server_databases)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    created = db.create_engine(database_url)
    yield created
    created.dispose()


@pytest.fixture
def apps_root(tmp_path: Path) -> Path:
    root = tmp_path / "generated" / "apps"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def make_app_dir(apps_root: Path) -> Callable[[AppKey], Path]:
    def make(key: AppKey) -> Path:
        path = apps_root / key.model_slug / f"app{key.app_number}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    return make


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A SQLite file with the tool's and the default host tables, as ``init-db`` makes them."""
    database_url = sqlite_url(tmp_path)
    init_database(database_url)
    return database_url


@pytest.fixture
def probe(url: str) -> Iterator[Engine]:
    """An engine of the test's own on ``url``, to seed and observe (never the tool's)."""
    with probe_engine(url) as engine:
        yield engine


@pytest.fixture
def real_host(database_url: str, apps_root: Path) -> Iterator[tuple[Engine, datetime]]:
    """tests/realhost.py's schema and scenario, seeded now through an engine of the test's own:
    (that engine, the moment the scenario was seeded at)."""
    import realhost

    engine = db.create_engine(database_url)
    realhost.create(engine)
    now = db.utcnow()
    realhost.seed(engine, apps_root, now)
    yield engine, now
    engine.dispose()
