"""Shared by the reactor, service, watcher, signal and daemon tests.

Rows are seeded and read through a *probe*: a plain SQLAlchemy engine of its own, so every
assertion sees what another process (the task runner, an operator) would see, and never shares a
connection or a transaction with the service under test. Nothing here sleeps blindly:
:func:`wait_until` polls a condition until it holds or a deadline passes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from fswatch_sync import db
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import instances_table, journal_table, sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.service import Service
from fswatch_sync.settings import Settings
from fswatch_sync.store import RemovalOutcome, Store

HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]

GONE_MESSAGE = "target app is gone"
WAIT_SECONDS = 15.0

SLUG = "openai_gpt-4"
OTHER_SLUG = "anthropic_claude-3"


_POLL = threading.Event()  # never set: its wait() is the tick between two looks


def wait_until(
    predicate: Callable[[], object],
    timeout: float = WAIT_SECONDS,
    what: str = "condition",
    *,
    interval: float = 0.005,
    on_timeout: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` until it is true; fail (AssertionError naming ``what``, plus what
    ``on_timeout`` says) when ``timeout`` passes first. The one polling wait of the tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            extra = f"; {on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        _POLL.wait(interval)


def stays_false(predicate: Callable[[], object], seconds: float) -> bool:
    """Poll ``predicate`` for ``seconds``: True when it never held (for "not before" checks,
    where the code under test promises a delay longer than ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return False
        _POLL.wait(0.005)
    return not predicate()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


def make_settings(root: Path, database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        root=root,
        database_url=database_url,
        observer="native",
        settle_ms=5.0,
        interval_seconds=3600.0,
        heartbeat_seconds=10.0,
    )
    return dataclasses.replace(base, **overrides)


def init_database(database_url: str) -> None:
    """Create the tool's and the default host tables, as ``fswatch-sync init-db`` does."""
    engine = db.create_engine(database_url)
    try:
        Store(engine).init_db()
    finally:
        engine.dispose()


@contextmanager
def probe_engine(database_url: str) -> Iterator[Engine]:
    """A separate engine (its own pool and connections) to seed and observe the database."""
    engine = sa.create_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def naive(moment: datetime) -> datetime:
    return db.to_db_time(moment)


@dataclass(frozen=True)
class SeededApp:
    key: AppKey
    path: Path
    pending: str
    running: str
    completed: str

    @property
    def active(self) -> tuple[str, str]:
        return (self.pending, self.running)


def add_app_row(engine: Engine, key: AppKey, created_at: datetime | None = None) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.insert(APPS).values(
                model_slug=key.model_slug,
                app_number=key.app_number,
                created_at=naive(created_at) if created_at else None,
            )
        )


def add_task(
    engine: Engine,
    task_id: str,
    key: AppKey,
    status: str,
    *,
    created_at: datetime,
    started_at: datetime | None = None,
    completed_at: datetime | None = None,
    error_message: str | None = None,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.insert(TASKS).values(
                task_id=task_id,
                target_model=key.model_slug,
                target_app_number=key.app_number,
                status=status,
                created_at=naive(created_at),
                started_at=naive(started_at) if started_at else None,
                completed_at=naive(completed_at) if completed_at else None,
                error_message=error_message,
            )
        )


def seed_app(
    engine: Engine,
    root: Path,
    key: AppKey,
    *,
    on_disk: bool = True,
    empty: bool = False,
    age: timedelta | None = None,
) -> SeededApp:
    """An app row (created ``age`` ago, an hour by default), its directory (holding a file and a
    subdirectory unless ``empty``) and three tasks: one pending, one running, one completed."""
    now = db.utcnow()
    path = root / key.model_slug / f"app{key.app_number}"
    if on_disk:
        path.mkdir(parents=True, exist_ok=True)
        if not empty:
            (path / "src").mkdir(exist_ok=True)
            (path / "src" / "main.py").write_text("print('generated')\n")
    add_app_row(engine, key, now - (age if age is not None else timedelta(hours=1)))
    stem = f"{key.model_slug}-{key.app_number}"
    add_task(engine, f"{stem}-p", key, "pending", created_at=now - timedelta(minutes=5))
    add_task(
        engine, f"{stem}-r", key, "running",
        created_at=now - timedelta(minutes=5), started_at=now - timedelta(minutes=1),
    )
    add_task(
        engine, f"{stem}-c", key, "completed",
        created_at=now - timedelta(minutes=30), started_at=now - timedelta(minutes=29),
        completed_at=now - timedelta(minutes=20), error_message=None,
    )
    return SeededApp(key, path, f"{stem}-p", f"{stem}-r", f"{stem}-c")


def seed_apps(engine: Engine, root: Path, keys: Iterable[AppKey]) -> dict[AppKey, SeededApp]:
    return {key: seed_app(engine, root, key) for key in keys}


class ScriptedStore(Store):
    """A real store whose ``remove_apps`` can fail, block or run a step first, on demand."""

    def __init__(self, engine: Engine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.calls: list[list[AppKey]] = []
        self.failures_left = 0
        self.fail_on_calls: set[int] = set()
        self.before: Callable[[list[AppKey]], None] | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def remove_apps(self, keys: Iterable[AppKey], **options: Any) -> RemovalOutcome:
        batch = sorted(keys)
        self.calls.append(batch)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=10)
        if self.before is not None:
            self.before(batch)
        if self.failures_left > 0 or len(self.calls) in self.fail_on_calls:
            self.failures_left = max(self.failures_left - 1, 0)
            # Transient, as a database outage is once the store's own retries are spent.
            raise OperationalError(
                "DELETE FROM generated_applications", {},
                sqlite3.OperationalError("database is locked"),
            )
        return super().remove_apps(batch, **options)


# -- reading ---------------------------------------------------------------------------------


def app_keys(engine: Engine) -> set[AppKey]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(APPS.c.model_slug, APPS.c.app_number)).all()
    return {AppKey(slug, int(number)) for slug, number in rows}


def has_row(engine: Engine, key: AppKey) -> bool:
    return key in app_keys(engine)


def task_row(engine: Engine, task_id: str) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(sa.select(TASKS).where(TASKS.c.task_id == task_id)).one()
    return dict(row._mapping)


def journal_sources(engine: Engine, key: AppKey, action: str = "app_removed") -> list[str]:
    j = journal_table.c
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(j.source).where(
                j.model_slug == key.model_slug, j.app_number == key.app_number, j.action == action
            )
        ).all()
    return [str(source) for (source,) in rows]


def sweep_rows(engine: Engine) -> list[dict[str, Any]]:
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(sweeps_table).order_by(sweeps_table.c.id)).all()
    except sa.exc.OperationalError:  # the tables do not exist yet (a daemon still starting)
        return []
    return [dict(row._mapping) for row in rows]


def finished_sweeps(engine: Engine, trigger: str | None = None) -> list[dict[str, Any]]:
    return [
        row
        for row in sweep_rows(engine)
        if row["finished_at"] is not None and (trigger is None or row["trigger"] == trigger)
    ]


def instance_rows(engine: Engine) -> list[dict[str, Any]]:
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(instances_table)).all()
    except sa.exc.OperationalError:
        return []
    return [dict(row._mapping) for row in rows]


# -- assertions ------------------------------------------------------------------------------


def app_state(engine: Engine, app: SeededApp, source: str = "reactor") -> str:
    """``"removed"`` when the app was handled as the contract says (row gone, active tasks
    cancelled with a time and a message naming it, the completed task intact, journalled by
    ``source``), ``"untouched"`` when it was left entirely alone, else what is wrong."""
    done = task_row(engine, app.completed)
    if (done["status"], done["error_message"]) != ("completed", None) or not done["completed_at"]:
        return f"the completed task changed: {done}"
    if has_row(engine, app.key):
        pending, running = task_row(engine, app.pending), task_row(engine, app.running)
        if (pending["status"], running["status"]) != ("pending", "running"):
            return f"row kept but tasks changed: {pending['status']}, {running['status']}"
        if pending["completed_at"] is not None:
            return f"row kept but the pending task was stamped: {pending}"
        return "untouched"
    for task_id in app.active:
        task = task_row(engine, task_id)
        message = task["error_message"] or ""
        if task["status"] != "cancelled" or task["completed_at"] is None:
            return f"row gone but a task was not cancelled with a time: {task}"
        named = f"{app.key.model_slug}/app{app.key.app_number}"  # the raw slug, not str()'s
        if GONE_MESSAGE not in message or named not in message:
            return f"row gone but the message does not say the app is gone: {task}"
    sources = journal_sources(engine, app.key)
    if source not in sources:
        return f"row gone but not journalled by {source}: {sources}"
    return "removed"


def assert_removed(engine: Engine, app: SeededApp, source: str = "reactor") -> None:
    assert app_state(engine, app, source) == "removed"


def assert_completed_untouched(engine: Engine, app: SeededApp) -> None:
    done = task_row(engine, app.completed)
    assert (done["status"], done["error_message"]) == ("completed", None), done
    assert done["completed_at"] is not None


def assert_untouched(engine: Engine, app: SeededApp) -> None:
    assert app_state(engine, app) == "untouched"


@contextmanager
def running_service(settings: Settings, *, initial_sweep: bool = False) -> Iterator[Service]:
    """A started Service, stopped (threads joined) when the block ends."""
    service = Service(settings, initial_sweep=initial_sweep)
    service.start()
    try:
        yield service
    finally:
        service.stop()
