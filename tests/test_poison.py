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
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    OTHER_SLUG,
    SLUG,
    TASKS,
    ScriptedStore,
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
from fswatch_sync.layout import AppKey
from fswatch_sync.reactor import Reactor
from fswatch_sync.schema import SchemaConfig, default_host_metadata
from fswatch_sync.stats import Stats
from fswatch_sync.watcher import AppGone

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
