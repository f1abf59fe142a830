"""The missing-since grace: an app found missing is marked (its active tasks cancelled at once),
removed only once the mark is older than the grace, and cleared when its directory returns.

Marks live in the tool's table on the default schema, and in the host's own ``missing_since``
column when the mapping names one. The sweep's clock is injected.
"""

from __future__ import annotations

import io
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import realhost
import sqlalchemy as sa
from helpers import (
    add_app_row,
    add_task,
    app_keys,
    init_database,
    make_settings,
    running_service,
    task_row,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import cli, db
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import missing_table
from fswatch_sync.settings import load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

GRACE_MINUTES = 60.0
GONE, BACK, STAYS = AppKey("m", 1), AppKey("m", 2), AppKey("m", 3)


def marks(engine: Engine) -> set[AppKey]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(missing_table.c.model_slug, missing_table.c.app_number)
        ).all()
    return {AppKey(s, int(n)) for s, n in rows}


def test_sweep_marks_then_removes_after_the_grace_and_a_return_clears_the_mark(
    database_url: str, engine: Engine, apps_root: Path, now: datetime
) -> None:
    init_database(database_url)
    for key in (GONE, BACK, STAYS):
        add_app_row(engine, key, now - timedelta(days=1))
        add_task(engine, f"{key.app_number}-p", key, "pending", created_at=now)
    (apps_root / "m" / "app3").mkdir(parents=True)
    settings = make_settings(
        apps_root, database_url, missing_grace_minutes=GRACE_MINUTES, max_delete_fraction=1.0
    )
    store = Store.from_settings(settings)
    sweeper = Sweeper(store, settings, instance_id="grace")
    try:
        first = sweeper.run(now=now)
        assert (first.marked_missing, first.orphan_apps) == (2, 0)
        assert first.orphan_tasks == 2  # a marked app's active tasks are cancelled at once
        assert app_keys(engine) == {GONE, BACK, STAYS}
        assert marks(engine) == {GONE, BACK}
        out = io.StringIO()
        code = cli.main(
            ["status", "--json", "--database-url", database_url, "--root", str(apps_root)], out
        )
        assert code == 0 and json.loads(out.getvalue())["apps_marked_missing"] == 2
        assert task_row(engine, "1-p")["status"] == "cancelled"
        assert task_row(engine, "3-p")["status"] == "pending"

        # BACK's directory returns: its mark goes; GONE stays marked, inside the grace.
        (apps_root / "m" / "app2").mkdir()
        inside = sweeper.run(now=now + timedelta(minutes=30))
        assert (inside.marked_missing, inside.orphan_apps) == (0, 0)
        assert marks(engine) == {GONE}

        # Past the grace: GONE's rows go (and its mark); BACK, present, stays.
        past = sweeper.run(now=now + timedelta(minutes=GRACE_MINUTES + 1))
        assert past.orphan_apps == 1
        assert app_keys(engine) == {BACK, STAYS}
        assert marks(engine) == set()
    finally:
        store.engine.dispose()


def test_marks_in_the_hosts_missing_since_column(
    real_host: tuple[Engine, datetime],
    database_url: str, apps_root: Path, tmp_path: Path
) -> None:
    seeding, now = real_host
    config = tmp_path / "host.toml"
    config.write_text(
        realhost.SCHEMA_TOML.replace(
            'updated_at = "touched"\n\n[schema.tasks_columns]',
            'updated_at = "touched"\nmissing_since = "missing_since"\n\n[schema.tasks_columns]',
        )
    )
    settings = load_settings(
        environ={
            "FSWATCH_SYNC_CONFIG": str(config),
            "FSWATCH_SYNC_ROOT": str(apps_root),
            "FSWATCH_SYNC_DATABASE_URL": database_url,
            "FSWATCH_SYNC_MISSING_GRACE_MINUTES": "10080",  # 7 days
            "FSWATCH_SYNC_MAX_DELETE_FRACTION": "1",
        }
    )
    store = Store.from_settings(settings)
    store.ensure_tool_tables()
    apps = realhost.apps.c

    def marked() -> dict[tuple[str, int], int]:
        with seeding.connect() as connection:
            rows = connection.execute(
                sa.select(apps.model, apps.number, sa.func.count())
                .where(apps.missing_since.is_not(None))
                .group_by(apps.model, apps.number)
            ).all()
        return {(m, int(n)): int(c) for m, n, c in rows}

    try:
        report = Sweeper(store, settings, instance_id="host").run(now=now)
        assert report.marked_missing == 2 and report.orphan_apps == 0
        # Every version of the key carries the mark; the tool's own table stays empty.
        assert marked() == {("m1", 2): 3, ("m2", 7): 1}
        assert marks(seeding) == set()
        assert realhost.outcome(seeding).tasks["gone-running"][0] == "cancelled"

        later = now + timedelta(days=7, minutes=1)
        removed = Sweeper(store, settings, instance_id="host").run(now=later)
        assert (removed.orphan_apps, removed.orphan_app_rows) == (2, 4)
        # The key that was young a week ago is marked now, not removed.
        assert removed.marked_missing == 1
        assert marked() == {("m1", 3): 2}
    finally:
        store.engine.dispose()


def test_the_reactor_marks_instead_of_removing(database_url: str, apps_root: Path) -> None:
    init_database(database_url)
    engine = db.create_engine(database_url)
    key = AppKey("m", 5)
    directory = apps_root / "m" / "app5"
    directory.mkdir(parents=True)
    (apps_root / "m" / "app6").mkdir()  # not the last app: the root stays non-empty
    add_app_row(engine, key, db.utcnow() - timedelta(days=1))
    add_task(engine, "5-r", key, "running", created_at=db.utcnow(), started_at=db.utcnow())
    settings = make_settings(apps_root, database_url, missing_grace_minutes=GRACE_MINUTES)
    try:
        with running_service(settings):
            shutil.rmtree(directory)
            wait_until(lambda: marks(engine) == {key}, timeout=20, what="the mark")
            wait_until(lambda: task_row(engine, "5-r")["status"] == "cancelled", timeout=20)
            assert app_keys(engine) == {key}
    finally:
        engine.dispose()
