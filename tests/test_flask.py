"""The Flask extension, in a real Flask app on a real SQLite file and a real directory tree."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from helpers import wait_until

from fswatch_sync import db, signals
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.errors import SettingsError
from fswatch_sync.flask import FswatchSync
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.service import Service
from fswatch_sync.store import Store, TaskChange

HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]
SLUG = "openai_gpt-4"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's config must be the only source of settings here."""
    for name in list(os.environ):
        if name.startswith(("FSWATCH_SYNC_", "MAINTENANCE_")):
            monkeypatch.delenv(name)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "host.db"


@pytest.fixture
def seeded(db_path: Path, apps_root: Path) -> Iterator[sa.Engine]:
    """Two present apps (app1 with tasks of every kind), one orphan row without a directory."""
    engine = db.create_engine(f"sqlite:///{db_path}")
    Store(engine).init_db()
    now = db.utcnow()
    for number in (1, 2):
        (apps_root / SLUG / f"app{number}" / "src").mkdir(parents=True)
    with engine.begin() as connection:
        connection.execute(sa.insert(APPS), [
            {"model_slug": SLUG, "app_number": 1, "created_at": db.to_db_time(now)},
            {"model_slug": SLUG, "app_number": 2, "created_at": db.to_db_time(now)},
        ])
        connection.execute(sa.insert(TASKS), [
            {"task_id": "t-pending", "target_model": SLUG, "target_app_number": 1,
             "status": "pending", "created_at": db.to_db_time(now)},
            {"task_id": "t-running", "target_model": SLUG, "target_app_number": 1,
             "status": "running", "created_at": db.to_db_time(now),
             "started_at": db.to_db_time(now)},
            {"task_id": "t-done", "target_model": SLUG, "target_app_number": 1,
             "status": "completed", "created_at": db.to_db_time(now),
             "completed_at": db.to_db_time(now)},
            {"task_id": "t-other", "target_model": SLUG, "target_app_number": 2,
             "status": "pending", "created_at": db.to_db_time(now)},
        ])
    yield engine
    engine.dispose()


def make_app(db_path: Path, root: Path, **config: Any) -> Flask:
    app = Flask("host_app")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{db_path}",
        FSWATCH_SYNC_ROOT=str(root),
        FSWATCH_SYNC_INTERVAL_SECONDS=3600,
        FSWATCH_SYNC_SETTLE_MS=0,
        **config,
    )

    @app.get("/")
    def index() -> str:
        return "hello"

    return app


@pytest.fixture
def stoppers() -> Iterator[list[Callable[[], None]]]:
    """Things to stop at teardown, whatever the test's outcome."""
    pending: list[Callable[[], None]] = []
    yield pending
    for stop in reversed(pending):
        stop()


def tasks_by_id(path: Path) -> dict[str, tuple[str, str | None, str | None]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT task_id, status, completed_at, error_message FROM analysis_tasks"
        ).fetchall()
    connection.close()
    return {task_id: (status, completed, message) for task_id, status, completed, message in rows}


def app_keys(path: Path) -> set[AppKey]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT model_slug, app_number FROM generated_applications"
        ).fetchall()
    connection.close()
    return {AppKey(slug, number) for slug, number in rows}


def test_receivers_hear_of_a_removed_directory_after_commit(
    seeded: sa.Engine, db_path: Path, apps_root: Path, stoppers: list[Callable[[], None]]
) -> None:
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync(app)
    service = app.extensions["fswatch_sync"]
    assert isinstance(service, Service)
    stoppers.append(lambda: fswatch.stop(app))

    # The host's own receivers. Each looks at the database through a connection of its own,
    # as another process would: what it sees there proves the change was committed before the
    # signal went out.
    heard: list[tuple[str, Any, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_app_removed(sender: Any, key: AppKey, source: str, **extra: Any) -> None:
        seen = {"row_present": key in app_keys(db_path), "tasks": tasks_by_id(db_path)}
        with lock:
            heard.append(("app_removed", sender, {"key": key, "source": source, **seen}))

    def on_task_cancelled(sender: Any, change: TaskChange, reason: str, **extra: Any) -> None:
        seen = {"status": tasks_by_id(db_path)[change.task_id][0]}
        with lock:
            heard.append(("task_cancelled", sender,
                          {"task_id": change.task_id, "reason": reason, **seen}))

    signals.app_removed.connect(on_app_removed, sender=service)
    signals.task_cancelled.connect(on_task_cancelled, sender=service)
    stoppers.append(lambda: signals.app_removed.disconnect(on_app_removed, sender=service))
    stoppers.append(lambda: signals.task_cancelled.disconnect(on_task_cancelled, sender=service))

    assert not service.running
    response = app.test_client().get("/")
    assert response.status_code == 200
    assert response.text == "hello"
    assert service.running

    # Started: watching, and its start-up sweep (which must leave both fresh apps alone) done.
    wait_until(lambda: service.stats.get("watch_state") == "watching", what="the watcher")
    wait_until(lambda: service.stats.get("sweeps") >= 1, what="the start-up sweep")
    assert app_keys(db_path) == {AppKey(SLUG, 1), AppKey(SLUG, 2)}
    assert heard == []

    shutil.rmtree(apps_root / SLUG / "app1")
    wait_until(lambda: len(heard) >= 3, what="app_removed and two task_cancelled")

    with lock:
        received = list(heard)
    assert all(sender is service for _, sender, _ in received)
    removed = [info for name, _, info in received if name == "app_removed"]
    cancelled = {info["task_id"]: info for name, _, info in received if name == "task_cancelled"}
    assert len(removed) == 1
    assert removed[0]["key"] == AppKey(SLUG, 1)
    assert removed[0]["source"] == "reactor"
    assert removed[0]["row_present"] is False
    # Inside the app_removed receiver, the app's tasks are already cancelled too: one commit.
    assert removed[0]["tasks"]["t-pending"][0] == "cancelled"
    assert removed[0]["tasks"]["t-running"][0] == "cancelled"
    assert set(cancelled) == {"t-pending", "t-running"}
    for info in cancelled.values():
        assert info["status"] == "cancelled"
        assert info["reason"] == "app_removed"

    final = tasks_by_id(db_path)
    assert final["t-done"][0] == "completed"
    assert final["t-other"] == ("pending", None, None)
    assert final["t-pending"][1] is not None
    assert "gone" in (final["t-pending"][2] or "")
    assert app_keys(db_path) == {AppKey(SLUG, 2)}


def test_init_app_twice_is_refused(db_path: Path, apps_root: Path) -> None:
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync()
    fswatch.init_app(app)
    service = app.extensions["fswatch_sync"]
    with pytest.raises(RuntimeError, match="already registered"):
        fswatch.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        FswatchSync(app)
    assert app.extensions["fswatch_sync"] is service
    # One extension object may serve several apps, each with its own service.
    other = make_app(db_path, apps_root)
    fswatch.init_app(other)
    assert fswatch.service(other) is not service


def test_no_start_without_a_request(
    seeded: sa.Engine, db_path: Path, apps_root: Path, stoppers: list[Callable[[], None]]
) -> None:
    """The debug reloader's parent and ``flask`` commands create the app but serve nothing."""
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync(app)
    service = fswatch.service(app)
    stoppers.append(service.stop)
    with app.app_context():
        assert fswatch.service() is service
    result = app.test_cli_runner().invoke(args=["fswatch-sync", "status", "--json"])
    assert result.exit_code == 0, result.output
    shutil.rmtree(apps_root / SLUG / "app1")

    assert not service.running
    assert service.started_at is None
    assert not service.watcher.is_alive()
    with seeded.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM fswatch_sync_instances")
                                  ).scalar_one() == 0
        assert connection.execute(sa.select(sa.func.count()).select_from(sweeps_table)
                                  ).scalar_one() == 0
    assert AppKey(SLUG, 1) in app_keys(db_path)


def test_autostart_off_starts_only_when_asked(
    db_path: Path, apps_root: Path, stoppers: list[Callable[[], None]]
) -> None:
    app = make_app(db_path, apps_root, FSWATCH_SYNC_AUTOSTART=False)
    fswatch = FswatchSync(app)
    service = fswatch.service(app)
    stoppers.append(service.stop)
    assert app.test_client().get("/").status_code == 200
    assert not service.running
    assert fswatch.start(app) is service
    assert service.running
    fswatch.start(app)  # a second start is a no-op, not an error
    assert service.running


def test_a_stopped_service_is_not_restarted_by_requests(
    db_path: Path, apps_root: Path, stoppers: list[Callable[[], None]]
) -> None:
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync(app)
    service = fswatch.service(app)
    stoppers.append(service.stop)
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert service.running
    fswatch.stop(app)
    assert not service.running
    assert client.get("/").status_code == 200
    assert not service.running


def test_a_failing_start_does_not_fail_requests(
    db_path: Path, apps_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync(app)
    service = fswatch.service(app)
    attempts: list[int] = []

    def broken_start() -> None:
        attempts.append(1)
        raise OSError("inotify watch limit reached")

    monkeypatch.setattr(service, "start", broken_start)
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/").status_code == 200
    assert len(attempts) == 1, "a failed start is retried after a pause, not on every request"
    assert not service.running
    with pytest.raises(OSError, match="inotify"):
        fswatch.start(app)  # an explicit start reports the error


def test_flask_command_sweeps_with_the_apps_config(
    seeded: sa.Engine, db_path: Path, apps_root: Path
) -> None:
    old = db.to_db_time(db.utcnow() - timedelta(days=1))
    with seeded.begin() as connection:
        connection.execute(sa.insert(APPS).values(model_slug="gone", app_number=7,
                                                  created_at=old))
        connection.execute(sa.insert(TASKS).values(
            task_id="t-gone", target_model="gone", target_app_number=7, status="running",
            created_at=old, started_at=old,
        ))
    app = make_app(db_path, apps_root)
    fswatch = FswatchSync(app)
    runner = app.test_cli_runner()

    dry = runner.invoke(args=["fswatch-sync", "sweep", "--json", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] is True
    assert AppKey("gone", 7) in app_keys(db_path)

    result = runner.invoke(args=["fswatch-sync", "sweep", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is False
    assert (report["orphan_apps"], report["orphan_tasks"]) == (1, 1)
    assert app_keys(db_path) == {AppKey(SLUG, 1), AppKey(SLUG, 2)}
    assert tasks_by_id(db_path)["t-gone"][0] == "cancelled"
    assert not fswatch.service(app).running

    # Exit statuses pass through: the guard refuses a missing root (an empty one is a real
    # removal once a sweep has seen that very directory holding apps: see test_treehealth).
    shutil.rmtree(apps_root)
    refused = runner.invoke(args=["fswatch-sync", "sweep", "--json"])
    assert refused.exit_code == 3
    assert json.loads(refused.stdout)["refused"] is True
    assert app_keys(db_path) == {AppKey(SLUG, 1), AppKey(SLUG, 2)}


def test_config_keys_and_precedence(db_path: Path, apps_root: Path, tmp_path: Path) -> None:
    app = make_app(db_path, apps_root, FSWATCH_SYNC_LEASE_SECONDS=7,
                   FSWATCH_SYNC_CLEANUP_OLD_TASKS=False)
    settings = FswatchSync(app).service(app).settings
    assert settings.root == apps_root
    assert settings.database_url == f"sqlite:///{db_path}"
    assert settings.lease_seconds == 7.0
    assert settings.cleanup_old_tasks is False

    # A database URL in the settings file wins over the app's SQLALCHEMY_DATABASE_URI.
    other = tmp_path / "other.db"
    config = tmp_path / "fswatch.toml"
    config.write_text(f'database_url = "sqlite:///{other}"\n')
    app = make_app(db_path, apps_root, FSWATCH_SYNC_CONFIG=str(config))
    assert FswatchSync(app).service(app).settings.database_url == f"sqlite:///{other}"

    # A mistyped key is an error, not silently ignored.
    app = make_app(db_path, apps_root, FSWATCH_SYNC_INTERVAL=60)
    with pytest.raises(SettingsError, match="FSWATCH_SYNC_INTERVAL"):
        FswatchSync(app)
