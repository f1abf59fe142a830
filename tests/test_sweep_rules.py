"""Every sweep rule in one scenario, on SQLite, PostgreSQL and MariaDB.

The scenario is a table of app rows and tasks, each with the outcome the sweep must give it;
the test asserts the report's exact counts, the exact final rows, the journal, that a dry run
changes nothing and predicts the same counts, and that a second sweep finds nothing to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.errors import SweepRefused
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_report import SweepReport

MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# The tool's own bookkeeping, which a real sweep writes (its history and the lease).
BOOKKEEPING = {"fswatch_sync_sweeps", "fswatch_sync_leases"}


@dataclass(frozen=True)
class App:
    key: AppKey
    age: timedelta | None  # None: created_at is NULL
    on_disk: str  # "dir", "missing", "file" or "symlink"
    kept: bool


@dataclass(frozen=True)
class Task:
    task_id: str
    key: AppKey
    status: str
    created: timedelta | None
    started: timedelta | None = None
    completed: timedelta | None = None
    error: str | None = None
    # What the sweep must do: "kept", "failed", "cancelled" or "deleted"; and for changed tasks
    # a fragment of the error message.
    outcome: str = "kept"
    message: str = ""


A1, A2, A3 = AppKey("m1", 1), AppKey("m1", 2), AppKey("m2", 3)
A4, A5 = AppKey("m2", 4), AppKey("m2", 5)
FILE_APP, LINK_APP = AppKey("m1", 10), AppKey("m1", 12)
ESCAPING = AppKey("../outside", 1)  # root/../outside/app1 exists, but outside the root
GHOST, NO_SUCH_APP, DIR_NO_ROW = AppKey("ghost", 9), AppKey("m1", 99), AppKey("m3", 9)

GONE = "target app is gone"
STUCK_RUNNING = "still running after 60 minutes"
STUCK_PENDING = "still pending after 60 minutes"

APPS = [
    App(A1, DAY, "dir", kept=True),
    App(A2, DAY, "missing", kept=False),
    App(A3, None, "missing", kept=False),  # NULL created_at counts as old
    App(A4, 5 * MIN, "missing", kept=True),  # inside the new-app grace
    App(A5, 10 * MIN, "missing", kept=False),  # exactly the grace: no longer younger
    App(FILE_APP, DAY, "file", kept=False),  # a file named app10 is not an app directory
    App(LINK_APP, DAY, "symlink", kept=False),  # a symlink to app1 is not app12's directory
    App(ESCAPING, DAY, "outside", kept=False),  # a slug that escapes the root is simply absent
    App(AppKey("m3", 6), DAY, "dir", kept=True),
    App(AppKey("m3", 7), DAY, "dir", kept=True),
    App(AppKey("m3", 8), None, "dir", kept=True),  # NULL created_at, present
    App(AppKey("m4", 1), DAY, "dir", kept=True),
    App(AppKey("m4", 2), DAY, "dir", kept=True),
    App(AppKey("m4", 3), DAY, "dir", kept=True),
]

TASKS = [
    # -- an app that is present: stuck and old rules ------------------------------------------
    Task("run-fresh", A1, "running", 3 * HOUR, 30 * MIN),
    Task("run-stuck", A1, "running", 3 * HOUR, 2 * HOUR, outcome="failed", message=STUCK_RUNNING),
    Task("run-nostart-old", A1, "running", 3 * HOUR, None, outcome="failed", message=STUCK_RUNNING),
    Task("run-nostart-young", A1, "running", 5 * MIN, None),
    Task("run-no-times", A1, "running", None, None),  # nothing to age it by: never stuck
    Task("run-started-young-created-old", A1, "running", 5 * HOUR, 10 * MIN),
    Task("run-exactly-timeout", A1, "running", 2 * HOUR, 60 * MIN),  # not *older* than
    Task("pend-stuck", A1, "pending", 2 * HOUR, outcome="cancelled", message=STUCK_PENDING),
    Task("pend-fresh", A1, "pending", 30 * MIN),
    Task("pend-no-created", A1, "pending", None),
    Task("pend-young-started-old", A1, "pending", 30 * MIN, 3 * HOUR),  # aged by created_at
    Task("done-old", A1, "completed", 41 * DAY, 40 * DAY, 40 * DAY, outcome="deleted"),
    Task("done-recent", A1, "completed", 11 * DAY, 10 * DAY, 10 * DAY),
    Task("failed-old", A1, "failed", 32 * DAY, 31 * DAY, 31 * DAY, "boom", outcome="deleted"),
    Task("cancelled-exactly-retention", A1, "cancelled", 31 * DAY, None, 30 * DAY, "x"),
    # A terminal task without completed_at is aged by started_at, then created_at.
    Task("done-nocompleted-old", A1, "completed", 60 * DAY, None, None, outcome="deleted"),
    Task("done-nocompleted-recent", A1, "failed", 60 * DAY, 2 * DAY, None, "oops"),
    Task("done-no-times", A1, "completed", None, None, None),  # never old
    # -- apps removed by the sweep: active tasks cancelled as orphans, terminal ones left -------
    Task("a2-pending", A2, "pending", 5 * MIN, outcome="cancelled", message=GONE),
    # Stuck as well, but the orphan pass runs first: cancelled, not failed.
    Task("a2-running-stuck", A2, "running", 3 * HOUR, 2 * HOUR, outcome="cancelled", message=GONE),
    Task("a2-done-old", A2, "completed", 41 * DAY, 40 * DAY, 40 * DAY, outcome="deleted"),
    Task("a2-failed-recent", A2, "failed", 2 * DAY, 2 * DAY, 1 * DAY, "boom"),
    Task("a3-running", A3, "running", 2 * MIN, 1 * MIN, outcome="cancelled", message=GONE),
    Task("a4-pending", A4, "pending", 5 * MIN),  # its app is young: kept
    Task("a5-pending", A5, "pending", 9 * MIN, outcome="cancelled", message=GONE),
    Task("link-pending", LINK_APP, "pending", 1 * MIN, outcome="cancelled", message=GONE),
    Task("escaping-running", ESCAPING, "running", 2 * MIN, 1 * MIN, outcome="cancelled",
         message=GONE),
    # -- tasks whose target has no row at all -------------------------------------------------
    Task("ghost-pending", GHOST, "pending", 1 * MIN, outcome="cancelled", message=GONE),
    Task(
        "ghost-running-stuck", GHOST, "running", 3 * HOUR, 2 * HOUR,
        outcome="cancelled", message=GONE,
    ),
    Task("nosuch-running", NO_SUCH_APP, "running", 2 * MIN, 1 * MIN, outcome="cancelled",
         message=GONE),
    # A directory without a row does not make a row: the task is still an orphan.
    Task("dir-no-row-pending", DIR_NO_ROW, "pending", 1 * MIN, outcome="cancelled", message=GONE),
    Task("ghost-done-recent", GHOST, "completed", 2 * DAY, 2 * DAY, 1 * DAY),
    Task("ghost-cancelled-old", GHOST, "cancelled", 101 * DAY, None, 100 * DAY, "x",
         outcome="deleted"),
]

EXPECTED = {
    "orphan_apps": 6,  # A2, A3, A5, FILE_APP, LINK_APP, ESCAPING
    "orphan_tasks": 10,  # 6 cancelled with their apps + 4 without any row
    "stuck_tasks": 3,  # 2 running failed + 1 pending cancelled
    "old_tasks": 5,
}


def _ago(now: datetime, delta: timedelta | None) -> datetime | None:
    return None if delta is None else db.to_db_time(now - delta)


def build_tree(root: Path) -> None:
    for app in APPS:
        path = root / app.key.model_slug / f"app{app.key.app_number}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if app.on_disk == "dir":
            (path / "src").mkdir(parents=True)
        elif app.on_disk == "file":
            path.write_text("not a directory")
        elif app.on_disk == "symlink":
            os.symlink(root / "m1" / "app1", path)
        elif app.on_disk == "outside":
            path.mkdir(parents=True)
    (root / DIR_NO_ROW.model_slug / f"app{DIR_NO_ROW.app_number}").mkdir(parents=True)
    # A model directory left with no app while its rows exist proves nothing (a mount over it
    # looks so: see test_treehealth); here the missing apps' model directory is gone with them.
    for model in root.iterdir():
        if model.is_dir() and not model.is_symlink() and not any(model.iterdir()):
            model.rmdir()


def insert_rows(store: Store, now: datetime) -> None:
    host = store.host
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(host.apps),
            [
                {
                    "model_slug": app.key.model_slug,
                    "app_number": app.key.app_number,
                    "created_at": _ago(now, app.age),
                }
                for app in APPS
            ],
        )
        connection.execute(
            sa.insert(host.tasks),
            [
                {
                    "task_id": task.task_id,
                    "target_model": task.key.model_slug,
                    "target_app_number": task.key.app_number,
                    "status": task.status,
                    "created_at": _ago(now, task.created),
                    "started_at": _ago(now, task.started),
                    "completed_at": _ago(now, task.completed),
                    "error_message": task.error,
                }
                for task in TASKS
            ],
        )


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    metadata = sa.MetaData()
    metadata.reflect(engine)
    tables: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            order = list(table.primary_key.columns) or list(table.columns)
            rows = connection.execute(sa.select(table).order_by(*order)).all()
            tables[table.name] = [tuple(row) for row in rows]
    return tables


def task_rows(store: Store) -> dict[str, dict[str, Any]]:
    host = store.host
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(host.tasks)).mappings().all()
    return {row["task_id"]: dict(row) for row in rows}


def app_keys(store: Store) -> set[AppKey]:
    return {AppKey(row[0], row[1]) for row in store.app_rows()}


def journal_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(journal_table).order_by(journal_table.c.id))
        return [dict(row) for row in rows.mappings()]


def make_sweeper(
    store: Store, root: Path, url: str, progress: Callable[[str, int, int], None] | None = None
) -> Sweeper:
    settings = Settings(root=root, database_url=url, batch_size=store.batch_size)
    return Sweeper(store, settings, instance_id="test-sweeper", progress=progress)


def report_counts(report: SweepReport) -> dict[str, int]:
    return {key: getattr(report, key) for key in EXPECTED}


def test_every_sweep_rule(
    engine: Engine, database_url: str, apps_root: Path, now: datetime
) -> None:
    # batch_size=2: every pass spans several transactions.
    store = Store(engine, batch_size=2)
    store.init_db()
    build_tree(apps_root)
    insert_rows(store, now)
    before_rows = task_rows(store)
    before = dump(engine)

    # -- a dry run changes nothing and predicts the counts --------------------------------------
    dry = make_sweeper(store, apps_root, database_url).run(now=now, dry_run=True)
    after_dry = dump(engine)
    # Every table, the tool's own included: a dry run writes no history and takes no lease.
    assert after_dry == before
    assert dry.dry_run
    assert report_counts(dry) == EXPECTED
    assert (dry.stuck_running, dry.stuck_pending) == (2, 1)

    # -- the real run ---------------------------------------------------------------------------
    steps: list[tuple[str, int, int]] = []
    real = make_sweeper(
        store, apps_root, database_url, progress=lambda *step: steps.append(step)
    ).run(now=now)
    assert not real.dry_run
    assert report_counts(real) == EXPECTED
    assert (real.stuck_running, real.stuck_pending) == (2, 1)
    assert real.refused is None
    assert sorted(real.removed) == sorted(app.key for app in APPS if not app.kept)
    assert steps, "a sweep with a progress callback reports progress"

    # Apps: exactly the kept ones remain.
    assert app_keys(store) == {app.key for app in APPS if app.kept}

    # Tasks: exact final rows.
    stamp = db.to_db_time(now)
    final = task_rows(store)
    expected_ids = {task.task_id for task in TASKS if task.outcome != "deleted"}
    assert set(final) == expected_ids
    for task in TASKS:
        if task.outcome == "deleted":
            continue
        row, original = final[task.task_id], before_rows[task.task_id]
        if task.outcome == "kept":
            assert row == original, task.task_id
            continue
        assert row["status"] == task.outcome, task.task_id
        assert row["completed_at"] == stamp, task.task_id
        assert task.message in (row["error_message"] or ""), (task.task_id, row["error_message"])
        # Only status, completed_at and error_message change.
        untouched = {k: v for k, v in row.items() if k not in ("status", "completed_at",
                                                               "error_message")}
        assert untouched == {k: v for k, v in original.items() if k in untouched}, task.task_id
    # The app-removal message names the app that is gone.
    assert "m1/app2" in final["a2-pending"]["error_message"]

    # -- the journal: one entry per change, each with its before-image ---------------------------
    entries = journal_rows(engine)
    by_action: dict[str, int] = {}
    for entry in entries:
        by_action[entry["action"]] = by_action.get(entry["action"], 0) + 1
    changed = [t for t in TASKS if t.outcome in ("failed", "cancelled")]
    assert by_action == {
        "app_removed": EXPECTED["orphan_apps"],
        "task_cancelled": sum(t.outcome == "cancelled" for t in changed),
        "task_failed": sum(t.outcome == "failed" for t in changed),
        "task_purged": EXPECTED["old_tasks"],
    }
    task_entries: dict[str, dict[str, Any]] = {}
    for entry in entries:
        image = json.loads(entry["before_image"])
        assert entry["source"] == "sweep"
        if entry["action"] == "app_removed":
            key = AppKey(image["model_slug"], image["app_number"])
            assert (entry["model_slug"], entry["app_number"]) == key
            assert key in real.removed
            continue
        assert image["task_id"] not in task_entries, "one entry per changed task"
        task_entries[image["task_id"]] = entry
        original = before_rows[image["task_id"]]
        assert image["status"] == original["status"]
        assert image["error_message"] == original["error_message"]
        if entry["action"] != "task_purged":
            assert entry["old_status"] == original["status"]
            assert entry["new_status"] == final[image["task_id"]]["status"]
    assert set(task_entries) == {t.task_id for t in TASKS if t.outcome != "kept"}

    # -- a second sweep finds nothing to do ------------------------------------------------------
    settled = dump(engine)
    again_dry = make_sweeper(store, apps_root, database_url).run(now=now, dry_run=True)
    assert dump(engine) == settled
    again = make_sweeper(store, apps_root, database_url).run(now=now)
    zeros = dict.fromkeys(EXPECTED, 0)
    assert report_counts(again_dry) == zeros
    assert report_counts(again) == zeros
    final_dump = dump(engine)
    assert {t: r for t, r in final_dump.items() if t not in BOOKKEEPING} == {
        t: r for t, r in settled.items() if t not in BOOKKEEPING
    }

    # The sweep history records all four sweeps with their counts.
    with engine.connect() as connection:
        history = connection.execute(
            sa.text("SELECT dry_run, outcome, orphan_apps, orphan_tasks, stuck_tasks, old_tasks"
                    " FROM fswatch_sync_sweeps ORDER BY id")
        ).all()
    assert [(bool(h[0]), h[1], *h[2:]) for h in history] == [
        (False, "ok", 6, 10, 3, 5),
        (False, "ok", 0, 0, 0, 0),
    ]


def test_each_pass_can_be_switched_off(
    engine: Engine, database_url: str, apps_root: Path, now: datetime
) -> None:
    store = Store(engine, batch_size=50)
    store.init_db()
    build_tree(apps_root)
    insert_rows(store, now)
    base = Settings(root=apps_root, database_url=database_url)

    def sweep(**switches: bool) -> SweepReport:
        settings = Settings(**{**base.__dict__, **switches})
        return Sweeper(store, settings, instance_id="t").run(now=now, dry_run=True)

    assert report_counts(sweep(cleanup_orphan_apps=False)) == {
        **EXPECTED,
        "orphan_apps": 0,
        # Without the app pass, the removed apps' tasks still have a row: only the 4 rowless
        # orphans are cancelled, and A2's stuck running task is judged stuck instead.
        "orphan_tasks": 4,
        "stuck_tasks": 4,
    }
    assert AppKey("../outside", 1) in {AppKey(row[0], row[1]) for row in store.app_rows()}
    # Without the orphan-tasks pass, only the removed apps' tasks are cancelled (with their
    # apps); a rowless task that is also stuck is still failed by the stuck pass.
    off = sweep(cleanup_orphan_tasks=False)
    assert report_counts(off) == {**EXPECTED, "orphan_tasks": 6, "stuck_tasks": 4}
    assert (off.stuck_running, off.stuck_pending) == (3, 1)
    assert report_counts(sweep(cleanup_stuck_tasks=False)) == {**EXPECTED, "stuck_tasks": 0}
    assert report_counts(sweep(cleanup_old_tasks=False)) == {**EXPECTED, "old_tasks": 0}


def _deny_listing(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """``os.scandir`` of ``denied`` fails with EACCES, as for a directory of another user."""
    real = os.scandir

    def fake(path: Any) -> Any:
        # A model directory is listed through a descriptor opened without following a symlink.
        text = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fspath(path)
        if text == os.fspath(denied):
            raise PermissionError(13, "Permission denied", text)
        return real(path)

    monkeypatch.setattr(os, "scandir", fake)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_what_cannot_be_listed_is_not_absent(
    engine: Engine,
    database_url: str,
    apps_root: Path,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(engine)
    store.init_db()
    for name in ("open/app1", "locked/app3", "locked/app4"):
        (apps_root / name).mkdir(parents=True)
    keys = [AppKey("open", 1), AppKey("open", 2), AppKey("locked", 3), AppKey("locked", 4),
            AppKey("locked", 5)] + [AppKey("other", n) for n in range(10)]
    for key in keys[5:]:
        (apps_root / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
    apps = store.host.apps  # reflect before the write transaction takes SQLite's lock
    with engine.begin() as connection:
        connection.execute(
            sa.insert(apps),
            [{"model_slug": k.model_slug, "app_number": k.app_number,
              "created_at": db.to_db_time(now - DAY)} for k in keys],
        )
    _deny_listing(monkeypatch, apps_root / "locked")
    report = make_sweeper(store, apps_root, database_url).run(now=now)
    assert report.removed == [AppKey("open", 2)]
    assert report.unreadable_dirs == 1
    assert app_keys(store) == set(keys) - {AppKey("open", 2)}

    # A root that cannot be listed is as good as missing: refused, even forced.
    _deny_listing(monkeypatch, apps_root)
    before = dump(engine)
    with pytest.raises(SweepRefused, match="missing"):
        make_sweeper(store, apps_root, database_url).run(now=now, force=True)
    assert {t: r for t, r in dump(engine).items() if t not in BOOKKEEPING} == {
        t: r for t, r in before.items() if t not in BOOKKEEPING
    }


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_naive_now_is_read_as_utc(
    engine: Engine, database_url: str, apps_root: Path, now: datetime
) -> None:
    store = Store(engine)
    store.init_db()
    build_tree(apps_root)
    insert_rows(store, now)
    naive = db.to_db_time(now)
    assert naive.tzinfo is None
    dry = make_sweeper(store, apps_root, database_url).run(now=naive, dry_run=True)
    assert report_counts(dry) == EXPECTED
    real = make_sweeper(store, apps_root, database_url).run(now=naive)
    assert report_counts(real) == EXPECTED
    assert task_rows(store)["run-stuck"]["completed_at"] == naive
