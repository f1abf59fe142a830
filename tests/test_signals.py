"""Signals: every one the SPEC names exists and is documented; they are sent after the commit
(a receiver already sees the change through its own connection); a raising receiver is logged
and stops nothing."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from blinker import Namespace
from helpers import (
    OTHER_SLUG,
    SLUG,
    TASKS,
    SeededApp,
    add_app_row,
    add_task,
    assert_removed,
    finished_sweeps,
    has_row,
    make_settings,
    running_service,
    seed_apps,
    task_row,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import db, signals
from fswatch_sync.layout import AppKey
from fswatch_sync.service import Service
from fswatch_sync.store import TaskChange
from fswatch_sync.sweep_report import SweepReport

SPEC_SIGNALS = (
    "app_removed",
    "task_cancelled",
    "task_failed",
    "tasks_purged",
    "sweep_started",
    "sweep_finished",
    "watch_degraded",
)
A1, A2, B1 = AppKey(SLUG, 1), AppKey(SLUG, 2), AppKey(OTHER_SLUG, 1)


@pytest.fixture
def apps(probe: Engine, apps_root: Path) -> dict[AppKey, SeededApp]:
    return seed_apps(probe, apps_root, (A1, A2, B1))


@pytest.fixture
def service(apps_root: Path, url: str, apps: dict[AppKey, SeededApp]) -> Iterator[Service]:
    with running_service(make_settings(apps_root, url)) as started:
        yield started


@pytest.mark.parametrize("name", SPEC_SIGNALS)
def test_every_spec_signal_is_documented(name: str) -> None:
    signal = getattr(signals, name)
    assert signal.name == name.replace("_", "-")
    assert signal.__doc__ and "sender" in signal.__doc__


def test_removal_signals_are_sent_after_the_commit(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    lock = threading.Lock()
    removed: list[tuple[AppKey, str, bool, set[str]]] = []
    cancelled: list[tuple[TaskChange, str, str, str]] = []
    app = apps[A2]

    def on_app_removed(
        sender: Any, *, key: AppKey, source: str, cancelled: list[TaskChange], **_extra: Any
    ) -> None:
        # What another process sees at this moment, through a connection of its own.
        row_there = has_row(probe, key)
        with lock:
            removed.append((key, source, row_there, {c.task_id for c in cancelled}))

    def on_task_cancelled(
        sender: Any, *, change: TaskChange, reason: str, source: str, **_extra: Any
    ) -> None:
        status = task_row(probe, change.task_id)["status"]
        with lock:
            cancelled.append((change, reason, source, status))

    with signals.app_removed.connected_to(on_app_removed, sender=service), \
            signals.task_cancelled.connected_to(on_task_cancelled, sender=service):
        shutil.rmtree(app.path)
        wait_until(lambda: len(removed) == 1 and len(cancelled) == 2, what="the signals")
    assert removed == [(A2, "reactor", False, {app.pending, app.running})]
    assert sorted(c[0].task_id for c in cancelled) == sorted([app.pending, app.running])
    for change, reason, source, status_seen in cancelled:
        assert (reason, source, status_seen) == ("app_removed", "reactor", "cancelled")
        assert change.key == A2
        assert change.new_status == "cancelled"
        assert change.old_status in ("pending", "running")
    assert_removed(probe, app)


def test_a_raising_receiver_does_not_stop_the_reactor(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    calls: list[AppKey] = []

    def broken(sender: Any, *, key: AppKey, **_extra: Any) -> None:
        calls.append(key)
        raise RuntimeError("a host's receiver has a bug")

    with signals.app_removed.connected_to(broken, sender=service):
        shutil.rmtree(apps[A1].path)
        wait_until(lambda: not has_row(probe, A1), what="the first removal")
        shutil.rmtree(apps[B1].path)
        wait_until(lambda: not has_row(probe, B1), what="a later removal")
        wait_until(lambda: len(calls) == 2, what="both deliveries")
    assert_removed(probe, apps[A1])
    assert_removed(probe, apps[B1])
    assert service.reactor.pending() == 0
    assert service.stats.get("apps_removed") == 2


def test_sweep_signals_and_orphan_cancellation(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    ghost = AppKey("ghost_model", 9)  # an active task whose app has no row at all
    add_task(probe, "ghost-task", ghost, "pending", created_at=db.utcnow())
    orphan = AppKey(SLUG, 30)  # a row whose directory is gone, older than the grace
    add_app_row(probe, orphan, db.utcnow() - timedelta(hours=1))
    seen: list[tuple[str, Any]] = []

    def on_started(sender: Any, *, trigger: str, dry_run: bool, **_extra: Any) -> None:
        seen.append(("started", (trigger, dry_run)))

    def on_finished(sender: Any, *, report: SweepReport, **_extra: Any) -> None:
        # The sweep's own row is already written as finished.
        seen.append(("finished", (report.orphan_apps, report.orphan_tasks,
                                  len(finished_sweeps(probe, "manual")))))

    def on_cancelled(sender: Any, *, change: TaskChange, reason: str, **_extra: Any) -> None:
        seen.append(("cancelled", (change.task_id, reason, task_row(probe, change.task_id)
                                   ["status"])))

    with signals.sweep_started.connected_to(on_started, sender=service), \
            signals.sweep_finished.connected_to(on_finished, sender=service), \
            signals.task_cancelled.connected_to(on_cancelled, sender=service):
        report = service.sweep_now(trigger="manual")
    assert report.orphan_apps == 1
    assert report.orphan_tasks == 1
    assert seen == [
        ("started", ("manual", False)),
        ("cancelled", ("ghost-task", "orphan", "cancelled")),
        ("finished", (1, 1, 1)),
    ]
    assert not has_row(probe, orphan)


def test_stuck_and_purge_signals_are_sent_after_their_commits(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    now = db.utcnow()
    add_task(probe, "stuck-run", A1, "running",
             created_at=now - timedelta(hours=3), started_at=now - timedelta(hours=2))
    add_task(probe, "stuck-wait", A1, "pending", created_at=now - timedelta(hours=2))
    add_task(probe, "old-done", A1, "completed", created_at=now - timedelta(days=41),
             started_at=now - timedelta(days=41), completed_at=now - timedelta(days=40))
    seen: list[tuple[str, Any]] = []

    def on_failed(sender: Any, *, change: TaskChange, reason: str, **_extra: Any) -> None:
        # Read through another connection: the change is committed before the signal.
        seen.append(("failed", (change.task_id, reason, task_row(probe, change.task_id)
                                ["status"])))

    def on_cancelled(sender: Any, *, change: TaskChange, reason: str, **_extra: Any) -> None:
        seen.append(("cancelled", (change.task_id, reason, task_row(probe, change.task_id)
                                   ["status"])))

    def on_purged(sender: Any, *, count: int, cutoff: Any, **_extra: Any) -> None:
        with probe.connect() as connection:
            left = connection.execute(
                sa.select(sa.func.count()).select_from(TASKS).where(TASKS.c.task_id == "old-done")
            ).scalar_one()
        seen.append(("purged", (count, left, cutoff < now - timedelta(days=29))))

    with signals.task_failed.connected_to(on_failed, sender=service), \
            signals.task_cancelled.connected_to(on_cancelled, sender=service), \
            signals.tasks_purged.connected_to(on_purged, sender=service):
        report = service.sweep_now(trigger="manual")
    assert (report.stuck_running, report.stuck_pending, report.old_tasks) == (1, 1, 1)
    assert seen == [
        ("failed", ("stuck-run", "stuck_running", "failed")),
        ("cancelled", ("stuck-wait", "stuck_pending", "cancelled")),
        ("purged", (1, 0, True)),
    ]


def test_send_runs_every_receiver_even_after_one_raises() -> None:
    private = Namespace().signal("private-test")
    got: list[str] = []

    def first(sender: Any, **_extra: Any) -> None:
        raise ValueError("boom")

    def second(sender: Any, **extra: Any) -> None:
        got.append(extra["value"])

    with private.connected_to(first), private.connected_to(second):
        signals.send(private, "sender", value="delivered")
    assert got == ["delivered"]
