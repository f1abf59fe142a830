"""Issue 11, point 2: one key the database refuses never holds back the others.

The poison is the host's own: a CHECK constraint on the tasks table that refuses to cancel the
tasks of one app, so every transaction that removes that app fails (not transiently: another try
meets the same refusal). Before, the reactor retried the failed batch as a whole, merged with
every hint that came after it, so an ordinary ``rm -rf`` of another app was never applied. Now
the failed batch is split until the bad key stands alone; the others go at once, and the bad key
is retried on its own backoff, counted and named in the service's status. Run on SQLite,
PostgreSQL and MariaDB, with a real watchdog observer.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    APPS,
    OTHER_SLUG,
    SLUG,
    TASKS,
    ScriptedStore,
    app_keys,
    app_state,
    has_row,
    init_database,
    journal_sources,
    make_settings,
    probe_engine,
    running_service,
    seed_app,
    task_row,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.hints import AppGone
from fswatch_sync.layout import AppKey
from fswatch_sync.reactor import Reactor
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.stats import Stats
from fswatch_sync.store import RemovalOutcome, Store
from fswatch_sync.sweep import Sweeper

POISON = AppKey(SLUG, 666)
# An ordinary removal is applied within this, poison or not (it takes milliseconds).
PROMPT_SECONDS = 5.0


@pytest.fixture
def server_probe(database_url: str) -> Iterator[Engine]:
    with probe_engine(database_url) as engine:
        yield engine


def _create_tables_with_a_poison_check(database_url: str) -> None:
    """The default host tables, plus a CHECK that refuses to cancel the poison app's tasks."""
    host = default_host_metadata(SchemaConfig())
    host.tables["analysis_tasks"].append_constraint(
        sa.CheckConstraint(
            f"status <> 'cancelled' OR target_app_number <> {POISON.app_number}",
            name="ck_fswatch_test_poison",
        )
    )
    engine = sa.create_engine(database_url)
    try:
        host.create_all(engine)
    finally:
        engine.dispose()
    init_database(database_url)


def test_one_bad_key_is_retried_alone_while_the_others_are_applied(
    database_url: str, apps_root: Path, server_probe: Engine
) -> None:
    _create_tables_with_a_poison_check(database_url)
    probe = server_probe
    bad = seed_app(probe, apps_root, POISON)
    first, later = (seed_app(probe, apps_root, AppKey(SLUG, n)) for n in (1, 2))
    kept = seed_app(probe, apps_root, AppKey(OTHER_SLUG, 1))
    with running_service(make_settings(apps_root, database_url)) as service:
        # One burst: the bad key and a good one reach the reactor in the same batch.
        shutil.rmtree(bad.path)
        shutil.rmtree(first.path)
        wait_until(lambda: not has_row(probe, first.key), PROMPT_SECONDS, "the good removal")

        # The bad key keeps being tried, alone, and the status names it.
        wait_until(
            lambda: service.stats.get("poison_failures") >= 3, what="three lone retries"
        )
        assert service.reactor.poison_keys() == [POISON]
        status = service.status_stats()
        assert (status["poison_keys"], status["poison"]) == (1, [str(POISON)])
        assert app_state(probe, bad) == "untouched"  # each try rolled back whole

        # An ordinary rm -rf meanwhile is not queued behind it.
        shutil.rmtree(later.path)
        wait_until(lambda: not has_row(probe, later.key), PROMPT_SECONDS, "a later removal")

        # The host's runner finishes the bad app's tasks: nothing left to cancel, so the
        # check no longer refuses, and the next lone retry goes through.
        with probe.begin() as connection:
            connection.execute(
                sa.update(TASKS)
                .where(TASKS.c.target_app_number == POISON.app_number)
                .where(TASKS.c.status.in_(("pending", "running")))
                .values(status="completed",
                        completed_at=db.to_db_time(db.utcnow() - timedelta(seconds=1)))
            )
        wait_until(lambda: not has_row(probe, POISON), what="the bad key, once fixed")
        wait_until(lambda: service.reactor.poison_keys() == [], what="the suspect cleared")
        assert service.status_stats()["poison_keys"] == 0
    assert [app_state(probe, app) for app in (first, later)] == ["removed", "removed"]
    assert app_state(probe, kept) == "untouched"
    assert journal_sources(probe, POISON) == ["reactor"]
    assert {task_row(probe, t)["status"] for t in (*bad.active, bad.completed)} == {"completed"}


def test_a_transient_failure_still_holds_the_whole_batch(
    url: str, apps_root: Path, probe: Engine
) -> None:
    """The database away is nobody's key: nothing is isolated, the batch waits and goes whole."""
    apps = [seed_app(probe, apps_root, AppKey(SLUG, n)) for n in (1, 2, 3)]
    gone = sorted(app.key for app in apps[:2])
    engine = db.create_engine(url)
    store = ScriptedStore(engine)
    store.failures_left = 2  # "database is locked", once the store's own retries are spent
    reactor = Reactor(
        store, apps_root, sender="test", stats=Stats(),
        request_sweep=lambda _trigger: None, root_unusable=lambda _reason: None,
    )
    for app in apps[:2]:
        shutil.rmtree(app.path)
        reactor.submit(AppGone(app.key))
    stop = threading.Event()
    thread = threading.Thread(target=reactor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: not any(has_row(probe, key) for key in gone), what="the removals")
    finally:
        stop.set()
        reactor.wake()
        thread.join(timeout=5)
        engine.dispose()
    assert store.calls == [gone, gone, gone]
    assert reactor.poison_keys() == []
    assert [app_state(probe, app) for app in apps] == ["removed", "removed", "untouched"]


class _RefusingStore(Store):
    """A real store on which every transaction touching one key fails as a CHECK would."""

    def __init__(self, engine: Engine, refused: AppKey) -> None:
        super().__init__(engine)
        self.refused = refused
        self.calls: list[list[AppKey]] = []

    def remove_apps(self, keys: Any, **kwargs: Any) -> RemovalOutcome:
        batch = sorted(keys)
        self.calls.append(batch)
        if self.refused in batch:
            raise sa.exc.IntegrityError(
                "UPDATE analysis_tasks", {}, sqlite3.IntegrityError("CHECK constraint failed")
            )
        return super().remove_apps(batch, **kwargs)


def test_the_bad_key_is_found_by_halving_not_one_by_one(
    url: str, apps_root: Path, probe: Engine
) -> None:
    keys = [AppKey(SLUG, n) for n in range(64)]
    for key in keys:
        (apps_root / SLUG / f"app{key.app_number}").mkdir(parents=True)
    (apps_root / OTHER_SLUG / "app1").mkdir(parents=True)  # stays: the root is not empty
    insert_rows = [{"model_slug": k.model_slug, "app_number": k.app_number} for k in keys]
    with probe.begin() as connection:
        connection.execute(sa.insert(APPS), insert_rows)
    engine = db.create_engine(url)
    store = _RefusingStore(engine, refused=keys[37])
    reactor = Reactor(
        store, apps_root, sender="test", stats=Stats(),
        request_sweep=lambda _trigger: None, root_unusable=lambda _reason: None,
    )
    shutil.rmtree(apps_root / SLUG)
    for key in keys:
        reactor.submit(AppGone(key))
    stop = threading.Event()
    thread = threading.Thread(target=reactor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: app_keys(probe) == {keys[37]}, what="all but the bad key removed")
        wait_until(lambda: reactor.poison_keys() == [keys[37]], what="the bad key isolated")
    finally:
        stop.set()
        reactor.wake()
        thread.join(timeout=5)
        engine.dispose()
    # The whole batch, then both halves at each of six levels (64 = 2**6): 13 transactions,
    # not 64; later calls are the bad key's lone retries.
    first_round = store.calls[:13]
    assert first_round[0] == keys
    assert sorted(len(batch) for batch in first_round[1:]) == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16,
                                                                32, 32]
    # The halves that went through hold every good key exactly once.
    applied = [batch for batch in first_round[1:] if keys[37] not in batch]
    assert sorted(key for batch in applied for key in batch) == keys[:37] + keys[38:]
    assert all(batch == [keys[37]] for batch in store.calls[13:])


def test_the_sweep_isolates_a_key_and_a_task_the_database_refuses(
    database_url: str, apps_root: Path, server_probe: Engine, now: Any
) -> None:
    """One app whose removal the host refuses, and one stuck task it refuses to fail: the sweep
    removes every other orphan, fails every other stuck task, runs every pass, and reports the
    two it could not change; the next sweep retries them."""
    _create_tables_with_a_poison_check(database_url)
    with server_probe.begin() as connection:
        connection.execute(sa.insert(APPS), [
            {"model_slug": SLUG, "app_number": n,
             "created_at": db.to_db_time(now - timedelta(days=1))}
            for n in (1, 2, 3, POISON.app_number)
        ])
        connection.execute(sa.insert(TASKS), [
            {"task_id": f"t{n}", "target_model": SLUG, "target_app_number": n, "status": "pending",
             "created_at": db.to_db_time(now - timedelta(minutes=1))}
            for n in (1, 2, 3, POISON.app_number)
        ] + [
            {"task_id": "stuck-ok", "target_model": SLUG, "target_app_number": 4,
             "status": "pending", "created_at": db.to_db_time(now - timedelta(days=1))},
            {"task_id": "stuck-poison", "target_model": SLUG, "target_app_number": 4,
             "status": "running", "created_at": db.to_db_time(now - timedelta(days=1)),
             "started_at": db.to_db_time(now - timedelta(days=1))},
        ])
        connection.execute(sa.insert(APPS).values(
            model_slug=SLUG, app_number=4, created_at=db.to_db_time(now - timedelta(days=1))))
    # The host also refuses to fail the task "stuck-poison".
    with server_probe.begin() as connection:
        if server_probe.dialect.name == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse_fail BEFORE UPDATE ON analysis_tasks"
                " WHEN NEW.task_id = 'stuck-poison' AND NEW.status = 'failed'"
                " BEGIN SELECT RAISE(ABORT, 'refused by the host'); END"
            )
        else:
            connection.exec_driver_sql(
                "ALTER TABLE analysis_tasks ADD CONSTRAINT ck_refuse_fail"
                " CHECK (status <> 'failed' OR task_id <> 'stuck-poison')"
            )
    (apps_root / SLUG / "app4").mkdir(parents=True)
    settings = make_settings(apps_root, database_url, max_delete_fraction=1.0)
    store = Store.from_settings(settings)
    try:
        report = Sweeper(store, settings, instance_id="poison").run(now=now)
        assert (report.orphan_apps, report.failed_apps) == (3, 1)
        assert (report.stuck_running, report.stuck_pending, report.failed_tasks) == (0, 1, 1)
        assert app_keys(server_probe) == {POISON, AppKey(SLUG, 4)}
        assert task_row(server_probe, "t1")["status"] == "cancelled"
        assert task_row(server_probe, f"t{POISON.app_number}")["status"] == "pending"
        assert task_row(server_probe, "stuck-ok")["status"] == "cancelled"
        assert task_row(server_probe, "stuck-poison")["status"] == "running"
        # The dry run meets the same refusals and reports the same.
        again = Sweeper(store, settings, instance_id="poison").run(now=now, dry_run=True)
        assert (again.orphan_apps, again.failed_apps, again.failed_tasks) == (0, 1, 1)
    finally:
        store.engine.dispose()
