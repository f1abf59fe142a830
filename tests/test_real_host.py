"""A host schema like a real one (tests/realhost.py), swept on every backend and session zone.

The same scenario under UTC, a zone west and a zone east of UTC must give identical outcomes:
the tool's own sessions speak UTC and zone-aware columns are bound as aware instants. The dry
run reports exactly what the real run does; a second sweep finds nothing; the journal restores
every host row as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import realhost
import sqlalchemy as sa
from helpers import running_service, wait_until
from sqlalchemy.engine import Engine

from fswatch_sync import db, journal
from fswatch_sync.errors import SettingsError
from fswatch_sync.schema import journal_table
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

ZONES = ("UTC", "America/New_York", "Asia/Tokyo")
MYSQL_OFFSETS = {"UTC": "+00:00", "America/New_York": "-05:00", "Asia/Tokyo": "+09:00"}
REPORT_ONLY = {"dry_run", "started_at", "duration_seconds"}


def zoned_url(database_url: str, zone: str) -> str:
    """The URL with the session's time zone set by the client, as a host might configure it."""
    url = sa.make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"options": f"-c timezone={zone}"})
    elif url.get_backend_name() == "mysql":
        url = url.update_query_dict({"init_command": f"SET time_zone = '{MYSQL_OFFSETS[zone]}'"})
    return url.render_as_string(hide_password=False)


def settings_for(tmp_path: Path, root: Path, url: str, **extra: str) -> Settings:
    config = tmp_path / "fswatch-sync.toml"
    config.write_text(realhost.SCHEMA_TOML)
    env = {
        "FSWATCH_SYNC_CONFIG": str(config),
        "FSWATCH_SYNC_ROOT": str(root),
        "FSWATCH_SYNC_DATABASE_URL": url,
        **extra,
    }
    return load_settings(environ=env)


def session_zone(engine: sa.Engine) -> str:
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return str(connection.exec_driver_sql("SHOW TimeZone").scalar_one())
        if engine.dialect.name == "mysql":
            return str(connection.exec_driver_sql("SELECT @@session.time_zone").scalar_one())
    return "UTC"


@pytest.mark.parametrize("zone", ZONES)
def test_a_real_host_is_right_in_one_sweep_in_any_session_zone(
    zone: str,
    real_host: tuple[Engine, datetime],
    database_url: str,
    apps_root: Path,
    tmp_path: Path,
) -> None:
    seeding, now = real_host
    before = realhost.snapshot(seeding)

    # A client-side zone that a plain connection would keep: the tool's sessions speak UTC.
    url = zoned_url(database_url, zone)
    if seeding.dialect.name != "sqlite":
        plain = sa.create_engine(url)
        assert session_zone(plain) in (zone, MYSQL_OFFSETS[zone])
        plain.dispose()
    settings = settings_for(tmp_path, apps_root, url)
    store = Store.from_settings(settings)
    store.ensure_tool_tables()
    try:
        dry = Sweeper(store, settings, instance_id="dry").run(now=now, dry_run=True)
        assert realhost.snapshot(seeding) == before, "the dry run changed host rows"
        real = Sweeper(store, settings, instance_id="real").run(now=now)

        assert {k: v for k, v in dry.to_dict().items() if k not in REPORT_ONLY} == {
            k: v for k, v in real.to_dict().items() if k not in REPORT_ONLY
        }
        assert {k: real.to_dict()[k] for k in realhost.EXPECTED_COUNTS} == (
            realhost.EXPECTED_COUNTS
        )
        assert real.to_dict()["old_tasks_kept"] == 0
        assert realhost.outcome(seeding) == realhost.EXPECTED

        # completed_at is the real instant of the change, not shifted by a zone.
        with seeding.connect() as connection:
            stamps = connection.execute(
                sa.select(realhost.tasks.c.completed, realhost.tasks.c.touched).where(
                    realhost.tasks.c.status.in_(("cancelled", "failed"))
                )
            ).all()
        assert len(stamps) == 6
        for completed, touched in stamps:
            for value in (completed, touched):
                moment = db.from_db_time(value)
                assert moment is not None
                assert abs(moment - datetime.now(UTC)) < timedelta(seconds=60)

        again = Sweeper(store, settings, instance_id="again").run(now=now)
        assert (again.orphan_apps, again.orphan_tasks, again.stuck_tasks, again.old_tasks) == (
            0, 0, 0, 0,
        )

        # Everything the sweep did goes back, row for row.
        restored = journal.restore(store, journal.Selection(since=now - timedelta(minutes=1)))
        assert restored.restored > 0
        assert realhost.snapshot(seeding) == before
    finally:
        store.engine.dispose()


def test_the_reactor_rule_removes_every_version_of_a_key(
    real_host: tuple[Engine, datetime], database_url: str, apps_root: Path, tmp_path: Path
) -> None:
    seeding, now = real_host
    settings = settings_for(tmp_path, apps_root, database_url)
    store = Store.from_settings(settings)
    store.ensure_tool_tables()
    try:
        # The reactor acts on removals the OS reported, whatever the rows' age: YOUNG goes too.
        outcome = store.remove_apps(
            [realhost.GONE, realhost.YOUNG], source="reactor", now=now
        )
        assert sorted(outcome.removed) == sorted([realhost.GONE, realhost.YOUNG])
        assert outcome.removed_rows == 5
        remaining = {(m, n) for m, n, _v in realhost.outcome(seeding).apps}
        assert remaining == {(realhost.PRESENT.model_slug, realhost.PRESENT.app_number),
                             (realhost.LONE.model_slug, realhost.LONE.app_number)}
        # One restore of the key's entries brings back all of its rows.
        with seeding.connect() as connection:
            batch = connection.execute(
                sa.select(journal_table.c.batch_id).where(
                    journal_table.c.action == "app_removed"
                ).limit(1)
            ).scalar_one()
        journal.restore(store, journal.Selection(batch_id=batch))
        versions = [v for (m, n, v) in realhost.outcome(seeding).apps if (m, n) == (
            realhost.GONE.model_slug, realhost.GONE.app_number)]
        assert sorted(versions) == [1, 2, 3]
    finally:
        store.engine.dispose()


BROKEN_PARENT = realhost.SCHEMA_TOML.replace(
    'parent_id = "parent_task_id"', 'parent_id = "parent_task_id"\nparent_references = "id"'
)


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        (BROKEN_PARENT, "schema.tasks_columns.parent_id"),
        (realhost.SCHEMA_TOML.replace('created_at = "created"\nupdated_at',
                                      'created_at = "state"\nupdated_at'),
         "schema.apps_columns.created_at"),
        (realhost.SCHEMA_TOML.replace('app_number = "number"', 'app_number = "model"'),
         "schema.apps_columns.app_number"),
        (realhost.SCHEMA_TOML.replace('column = "job_ref"', 'column = "title"'),
         "schema.task_dependents"),
    ],
)
def test_a_mapping_that_cannot_work_is_refused_before_any_change(
    toml: str,
    setting: str,
    real_host: tuple[Engine, datetime],
    database_url: str,
    apps_root: Path,
    tmp_path: Path,
) -> None:
    seeding, now = real_host
    before = realhost.snapshot(seeding)
    config = tmp_path / "broken.toml"
    config.write_text(toml)
    settings = load_settings(
        environ={
            "FSWATCH_SYNC_CONFIG": str(config),
            "FSWATCH_SYNC_ROOT": str(apps_root),
            "FSWATCH_SYNC_DATABASE_URL": database_url,
        }
    )
    store = Store.from_settings(settings)
    store.ensure_tool_tables()
    try:
        with pytest.raises(SettingsError) as raised:
            Sweeper(store, settings, instance_id="broken").run(now=now)
        assert raised.value.setting.startswith(setting)
        assert realhost.snapshot(seeding) == before
    finally:
        store.engine.dispose()


def test_run_with_a_mapping_that_cannot_work_exits_2_before_any_change(
    real_host: tuple[Engine, datetime], database_url: str, apps_root: Path, tmp_path: Path
) -> None:
    seeding, _now = real_host
    before = realhost.snapshot(seeding)
    config = tmp_path / "broken.toml"
    config.write_text(BROKEN_PARENT)
    env = {
        **os.environ,
        "FSWATCH_SYNC_CONFIG": str(config),
        "FSWATCH_SYNC_ROOT": str(apps_root),
        "FSWATCH_SYNC_DATABASE_URL": database_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "run"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "schema.tasks_columns.parent_id" in errors[0]
    assert "Traceback" not in done.stderr
    assert realhost.snapshot(seeding) == before


def test_rm_rf_of_a_multi_version_app_removes_every_row_through_the_reactor(
    real_host: tuple[Engine, datetime], database_url: str, apps_root: Path, tmp_path: Path
) -> None:
    seeding, _now = real_host
    gone_dir = apps_root / realhost.GONE.model_slug / f"app{realhost.GONE.app_number}"
    gone_dir.mkdir()
    (gone_dir / "node_modules" / "x").mkdir(parents=True)
    settings = settings_for(tmp_path, apps_root, database_url)

    def versions() -> int:
        return sum(
            1 for (m, n, _v) in realhost.outcome(seeding).apps
            if (m, n) == (realhost.GONE.model_slug, realhost.GONE.app_number)
        )

    assert versions() == 3
    with running_service(settings):
        shutil.rmtree(gone_dir)
        wait_until(lambda: versions() == 0, what="every version of the key removed")
        tasks = realhost.outcome(seeding).tasks
        assert tasks["gone-pending"] == ("cancelled", "gone")
        assert tasks["gone-running"] == ("cancelled", "gone")
        assert tasks["gone-done"] == ("completed", None)
    with seeding.connect() as connection:
        batches = connection.execute(
            sa.select(journal_table.c.batch_id)
            .where(journal_table.c.model_slug == realhost.GONE.model_slug,
                   journal_table.c.app_number == realhost.GONE.app_number)
            .distinct()
        ).scalars().all()
    assert len(batches) == 1, "the key's rows and tasks changed in one transaction"
