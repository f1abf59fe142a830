"""The journal: listing what the tool changed, and restoring it all-or-nothing."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import APPS, add_app_row, add_task, init_database, sqlite_url, task_row
from hostlike import (
    ABORTED,
    NULLIFIED_AND_DELETED,
    QUEUED,
    SLUG,
    app_artifacts,
    app_bundles,
    app_notes,
    app_tags,
    apps,
    build_scenario,
    create_host_schema,
    job_states,
    jobs,
    rows,
    write_config,
)
from sqlalchemy.engine import Engine

from fswatch_sync import cli, db, journal
from fswatch_sync.errors import RestoreConflict
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.settings import load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

A1, A2, A3 = AppKey("m", 1), AppKey("m", 2), AppKey("m", 3)


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The CLI configures the package logger; put it back for the next test."""
    logger = logging.getLogger("fswatch_sync")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def store(engine: Engine, now: datetime) -> Store:
    """Default schema; apps m/app1..3, each with a pending, a running and a completed task."""
    created = Store(engine, batch_size=1)
    created.init_db()
    host = created.host
    with engine.begin() as connection:
        connection.execute(sa.insert(host.apps), [
            {"model_slug": k.model_slug, "app_number": k.app_number,
             "created_at": db.to_db_time(now - timedelta(days=k.app_number))}
            for k in (A1, A2, A3)
        ])
        connection.execute(sa.insert(host.tasks), [
            {"task_id": f"{k.app_number}-{status}", "target_model": k.model_slug,
             "target_app_number": k.app_number, "status": status,
             "created_at": db.to_db_time(now - timedelta(hours=2)),
             "started_at": db.to_db_time(now - timedelta(hours=1)) if status != "pending" else None,
             "completed_at": (
                 db.to_db_time(now - timedelta(minutes=30)) if status == "completed" else None
             ),
             "error_message": "real outcome" if status == "completed" else None}
            for k in (A1, A2, A3)
            for status in ("pending", "running", "completed")
        ])
    return created


def snapshot(store: Store) -> dict[str, Any]:
    """Every host row and every journal row: restore's "nothing changed" yardstick."""
    host = store.host
    with store.engine.connect() as connection:
        return {
            name: sorted(
                (tuple(sorted(dict(r._mapping).items())) for r in connection.execute(
                    sa.select(table))),
                key=repr,
            )
            for name, table in (("apps", host.apps), ("tasks", host.tasks),
                                ("journal", journal_table))
        }


def host_rows(store: Store) -> dict[str, Any]:
    host = store.host
    with store.engine.connect() as connection:
        return {
            "apps": {r.app_number: dict(r._mapping) for r in connection.execute(
                sa.select(host.apps))},
            "tasks": {r.task_id: dict(r._mapping) for r in connection.execute(
                sa.select(host.tasks))},
        }


def entries(store: Store, **where: Any) -> list[Any]:
    with store.engine.connect() as connection:
        return list(connection.execute(
            sa.select(journal_table)
            .where(*(journal_table.c[k] == v for k, v in where.items()))
            .order_by(journal_table.c.id)
        ).all())


def test_journal_lists_entries(store: Store, now: datetime, keep_logging: None,
                               capsys: pytest.CaptureFixture[str]) -> None:
    store.remove_apps([A1, A2], source="reactor", now=now)
    listed = journal.list_entries(store.engine, journal.Selection())
    assert [e["action"] for e in listed].count("app_removed") == 2
    assert [e["action"] for e in listed].count("task_cancelled") == 4
    assert [e["id"] for e in listed] == sorted((e["id"] for e in listed), reverse=True)
    assert {e["at"] for e in listed} == {now.isoformat()}
    only_a2 = journal.list_entries(store.engine, journal.Selection(app=("m", 2)))
    assert {(e["model_slug"], e["app_number"]) for e in only_a2} == {("m", 2)}
    assert len(only_a2) == 3
    removed = journal.list_entries(store.engine, journal.Selection(action="app_removed"))
    assert sorted(json.loads(e["before_image"])["app_number"] for e in removed) == [1, 2]

    out = io.StringIO()
    url = store.engine.url.render_as_string(hide_password=False)
    assert cli.main(["journal", "--json", "--database-url", url], out=out) == 0
    assert [e["id"] for e in json.loads(out.getvalue())] == [e["id"] for e in listed]


def test_restore_by_id_then_by_batch(store: Store, now: datetime) -> None:
    before = host_rows(store)
    store.remove_apps([A1, A2], source="reactor", now=now)
    assert set(host_rows(store)["apps"]) == {3}

    # By id: just the app row of m/app1 (its tasks stay cancelled).
    app1_entry = entries(store, action="app_removed", app_number=1)[0]
    result = journal.restore(store, journal.Selection(ids=(app1_entry.id,)))
    assert (result.restored, result.by_action) == (1, {"app_removed": 1})
    after = host_rows(store)
    assert after["apps"][1] == before["apps"][1]
    assert after["tasks"]["1-pending"]["status"] == "cancelled"

    # By id: its two task changes, reverted exactly (status, completed_at, message).
    ids = tuple(e.id for e in entries(store, action="task_cancelled", app_number=1))
    assert journal.restore(store, journal.Selection(ids=ids)).restored == 2
    assert host_rows(store)["tasks"]["1-pending"] == before["tasks"]["1-pending"]
    assert host_rows(store)["tasks"]["1-running"] == before["tasks"]["1-running"]

    # By batch: m/app2's row and tasks together.
    batch = entries(store, action="app_removed", app_number=2)[0].batch_id
    result = journal.restore(store, journal.Selection(batch_id=batch))
    assert result.by_action == {"app_removed": 1, "task_cancelled": 2}
    assert host_rows(store) == before
    # Restored entries are marked and not restored twice.
    assert all(e.restored_at is not None for e in entries(store))
    with pytest.raises(RestoreConflict):
        journal.restore(store, journal.Selection(batch_id=batch))


def test_restore_by_time_range(store: Store, now: datetime) -> None:
    before = host_rows(store)
    store.remove_apps([A1], source="reactor", now=now)
    store.remove_apps([A2], source="sweep", now=now + timedelta(hours=1))
    result = journal.restore(
        store, journal.Selection(since=now - timedelta(minutes=1), until=now + timedelta(minutes=1))
    )
    assert result.by_action == {"app_removed": 1, "task_cancelled": 2}
    after = host_rows(store)
    assert set(after["apps"]) == {1, 3}
    assert after["tasks"]["1-running"] == before["tasks"]["1-running"]
    assert after["tasks"]["2-running"]["status"] == "cancelled"
    result = journal.restore(store, journal.Selection(since=now + timedelta(minutes=30)))
    assert result.restored == 3
    assert host_rows(store) == before


def test_restore_dry_run_changes_nothing(store: Store, now: datetime) -> None:
    store.remove_apps([A1, A2], source="reactor", now=now)
    before = snapshot(store)
    result = journal.restore(store, journal.Selection(since=now), dry_run=True)
    assert result.by_action == {"app_removed": 2, "task_cancelled": 4}
    assert snapshot(store) == before


def test_restore_refuses_a_regenerated_app_and_changes_nothing(
    store: Store, now: datetime
) -> None:
    store.remove_apps([A1, A2], source="reactor", now=now)
    with store.engine.begin() as connection:  # m/app1 generated again: a new row
        connection.execute(sa.insert(store.host.apps).values(
            model_slug="m", app_number=1, created_at=db.to_db_time(now)))
    before = snapshot(store)
    with pytest.raises(RestoreConflict, match="m/app1 has a new row"):
        journal.restore(store, journal.Selection(since=now))
    assert snapshot(store) == before
    with pytest.raises(RestoreConflict):
        journal.restore(store, journal.Selection(since=now), dry_run=True)


def test_restore_refuses_a_task_that_moved_on_and_changes_nothing(
    store: Store, now: datetime
) -> None:
    store.remove_apps([A1], source="reactor", now=now)
    with store.engine.begin() as connection:  # the task runner re-ran it since
        connection.execute(
            sa.update(store.host.tasks)
            .where(store.host.task_col("task_id") == "1-running")
            .values(status="completed")
        )
    before = snapshot(store)
    batch = entries(store, action="app_removed")[0].batch_id
    with pytest.raises(RestoreConflict, match="moved on"):
        journal.restore(store, journal.Selection(batch_id=batch))
    assert snapshot(store) == before, "the app row must not come back without its tasks"


def test_restore_refuses_an_active_task_without_its_app(store: Store, now: datetime) -> None:
    store.remove_apps([A1], source="reactor", now=now)
    before = snapshot(store)
    ids = tuple(e.id for e in entries(store, action="task_cancelled"))
    with pytest.raises(RestoreConflict, match="m/app1 has no row"):
        journal.restore(store, journal.Selection(ids=ids))
    assert snapshot(store) == before


def test_cli_restore_conflict_is_one_line_and_exit_1(
    store: Store, now: datetime, apps_root: Path, keep_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store.remove_apps([A1], source="reactor", now=now)
    with store.engine.begin() as connection:
        connection.execute(sa.insert(store.host.apps).values(
            model_slug="m", app_number=1, created_at=db.to_db_time(now)))
    entry = entries(store, action="app_removed")[0]
    url = store.engine.url.render_as_string(hide_password=False)
    base = ["--database-url", url, "--root", str(apps_root)]
    before = snapshot(store)
    capsys.readouterr()
    assert cli.main(["restore", "--id", str(entry.id), *base]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "journal entry" in line]
    assert len(lines) == 1 and f"journal entry {entry.id}" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert snapshot(store) == before

    with store.engine.begin() as connection:  # the new row goes away again: now it restores
        connection.execute(sa.delete(store.host.apps).where(
            store.host.app_col("app_number") == 1))
    out = io.StringIO()
    assert cli.main(["restore", "--batch", entry.batch_id, "--json", *base], out=out) == 0
    assert json.loads(out.getvalue()) == {
        "restored": 3, "by_action": {"app_removed": 1, "task_cancelled": 2}, "dry_run": False,
        "still_missing": ["m/app1"]}
    assert host_rows(store)["tasks"]["1-running"]["status"] == "running"


# -- a host's own schema --------------------------------------------------------------------


def host_state(engine: Engine) -> dict[str, Any]:
    return {
        table.name: rows(engine, table, "pk" if table in (apps, jobs) else "id")
        for table in (apps, jobs, app_artifacts, app_bundles, app_notes, app_tags)
    }


def test_restore_a_whole_sweep_on_a_host_schema(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime
) -> None:
    """Removed rows (with the host's NOT NULL extras), dependents, task changes and purged
    sub-tasks all come back: the host's tables end as they were before the sweep."""
    create_host_schema(engine)
    config = write_config(tmp_path / "host.toml", root=apps_root, database_url=database_url)
    settings = load_settings(environ={}, config_path=config)
    scenario = build_scenario(engine, apps_root, now)
    store = Store(engine, settings.schema, batch_size=2)
    store.ensure_tool_tables()
    before = host_state(engine)
    Sweeper(store, settings, instance_id="test").run(now=now)
    assert job_states(engine)["a3-queued"] == ABORTED
    # The host edits the nullified note meanwhile: a restore must keep that edit.
    with engine.begin() as connection:
        connection.execute(
            sa.update(app_notes).where(app_notes.c.id == scenario.note).values(body="edited")
        )
    expected = before
    expected["app_notes"][scenario.note]["body"] = "edited"

    result = journal.restore(store, journal.Selection(since=now, until=now))
    assert result.by_action == {
        "app_removed": 2, "dependent_deleted": 3, "dependent_nullified": 1,
        "task_cancelled": 4, "task_failed": 1, "task_purged": 6,
    }
    assert host_state(engine) == expected
    assert rows(engine, apps, "pk")[scenario.app_pk[NULLIFIED_AND_DELETED]]["owner_email"] == (
        f"{SLUG}-3@host.test"
    )
    assert job_states(engine)["a3-queued"] == QUEUED


def test_restore_a_dependent_without_its_app_is_refused(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime
) -> None:
    create_host_schema(engine)
    config = write_config(tmp_path / "host.toml", root=apps_root, database_url=database_url)
    settings = load_settings(environ={}, config_path=config)
    build_scenario(engine, apps_root, now)
    store = Store(engine, settings.schema)
    store.ensure_tool_tables()
    store.remove_apps([AppKey(SLUG, NULLIFIED_AND_DELETED)], source="reactor", now=now)
    before = host_state(engine)
    with engine.connect() as connection:
        ids = tuple(connection.execute(
            sa.select(journal_table.c.id).where(
                journal_table.c.action.in_(("dependent_deleted", "dependent_nullified")))
        ).scalars())
    assert len(ids) == 3
    with pytest.raises(RestoreConflict, match="is not there"):
        journal.restore(store, journal.Selection(ids=ids))
    assert host_state(engine) == before


typed_metadata = sa.MetaData()
typed_apps = sa.Table(
    "typed_apps",
    typed_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_slug", sa.String(200), nullable=False),
    sa.Column("app_number", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=True),
    sa.Column("price", sa.Numeric(10, 2), nullable=False),
    sa.Column("opens", sa.Time(), nullable=False),
    sa.Column("born", sa.Date(), nullable=False),
    sa.Column("token", sa.Uuid(), nullable=False),
    sa.Column("blob", sa.LargeBinary(), nullable=False),
    sa.Column("flag", sa.Boolean(), nullable=False),
    sa.Column("ttl", sa.Interval(), nullable=False),
    sa.Column("notes", sa.Text(), nullable=False),
)
typed_tasks = sa.Table(
    "typed_tasks",
    typed_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(100), nullable=False),
    sa.Column("target_model", sa.String(200), nullable=False),
    sa.Column("target_app_number", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("created_at", sa.DateTime()),
    sa.Column("started_at", sa.DateTime()),
    sa.Column("completed_at", sa.DateTime()),
    sa.Column("error_message", sa.Text()),
)


@pytest.mark.filterwarnings("ignore:Dialect sqlite\\+pysqlite does \\*not\\* support Decimal")
def test_restore_puts_back_every_column_type_of_a_host_row(engine: Engine, now: datetime) -> None:
    import uuid
    from datetime import time
    from decimal import Decimal

    from fswatch_sync.schemaconfig import SchemaConfig

    typed_metadata.create_all(engine)
    row = {
        "model_slug": "m", "app_number": 7, "created_at": datetime(2026, 5, 1, 8, 30, 15),
        "price": Decimal("12.34"), "opens": time(9, 15, 30), "born": datetime(2020, 2, 29).date(),
        "token": uuid.UUID("12345678-1234-5678-1234-567812345678"), "blob": b"\x00\xffbin",
        "flag": True, "ttl": timedelta(days=2, seconds=5), "notes": "ünïcode ✓",
    }
    with engine.begin() as connection:
        connection.execute(sa.insert(typed_apps).values(row))
    with engine.connect() as connection:
        before = dict(connection.execute(sa.select(typed_apps)).one()._mapping)
    config = SchemaConfig(apps_table="typed_apps", tasks_table="typed_tasks",
                          manage_host_tables=False)
    store = Store(engine, config)
    store.ensure_tool_tables()
    outcome = store.remove_apps([AppKey("m", 7)], source="reactor", now=now)
    assert outcome.removed == [AppKey("m", 7)]
    batch = entries(store, action="app_removed")[0].batch_id
    assert journal.restore(store, journal.Selection(batch_id=batch)).restored == 1
    with engine.connect() as connection:
        after = dict(connection.execute(sa.select(typed_apps)).one()._mapping)
    assert after == before


# -- the journal's retention -------------------------------------------------------------------


def test_purge_journal_deletes_only_entries_past_the_cutoff(store: Store, now: datetime) -> None:
    cutoff = now - timedelta(days=90)
    store.remove_apps([A1], source="reactor", now=cutoff - timedelta(microseconds=1))
    store.remove_apps([A2], source="reactor", now=cutoff)  # exactly at the cutoff: kept
    store.remove_apps([A3], source="reactor", now=now)
    kept = [e.id for e in entries(store) if e.app_number in (2, 3)]
    assert len(kept) == 6 and len(entries(store, app_number=1)) == 3

    with store.rehearsal() as rehearsal:  # what a dry run reports: the same purge, rolled back
        assert rehearsal.purge_journal(cutoff) == 3
    # batch_size is 1: three transactions, then one that finds nothing.
    assert store.purge_journal(cutoff) == 3
    assert [e.id for e in entries(store)] == kept
    assert store.purge_journal(cutoff) == 0
    assert [e.id for e in entries(store)] == kept


def test_sweep_prunes_the_journal_after_its_passes(
    store: Store, database_url: str, apps_root: Path, make_app_dir: Any, now: datetime
) -> None:
    for key in (A1, A2):
        make_app_dir(key)
    store.remove_apps([A3], source="reactor", now=now - timedelta(days=91))
    old = [e.id for e in entries(store)]
    assert len(old) == 3

    def sweep(dry_run: bool = False, **flags: Any) -> Any:
        settings = load_settings(
            {"root": str(apps_root), "database_url": database_url, **flags}, environ={}
        )
        return Sweeper(store, settings, instance_id="test").run(now=now, dry_run=dry_run)

    before = snapshot(store)
    assert sweep(dry_run=True).journal_pruned == 3
    assert snapshot(store) == before

    assert sweep(journal_retention_days=0).journal_pruned == 0
    assert set(old) <= {e.id for e in entries(store)}

    report = sweep()
    assert report.journal_pruned == 3
    assert report.to_dict()["journal_pruned"] == 3
    left = entries(store)
    assert not set(old) & {e.id for e in left}
    # The sweeps' own changes (the stuck tasks of m/app1 and m/app2) are recent: kept.
    assert left and all(db.from_db_time(e.at) == now for e in left)
    assert sweep().journal_pruned == 0


def test_restore_puts_an_app_back_under_a_new_id_when_sqlite_gave_its_id_away(
    tmp_path: Path, now: datetime
) -> None:
    """SQLite gives the largest deleted id to the next row: an unrelated app may hold the
    removed app's id by the time it is restored. The app goes back under a new id, the other
    keeps its own, and the removed app's tasks come back with it."""
    url = sqlite_url(tmp_path)
    init_database(url)
    engine = db.create_engine(url)
    store = Store(engine)
    try:
        gone, newcomer = AppKey("m", 3), AppKey("other", 9)
        for number in (1, 2, 3):
            add_app_row(engine, AppKey("m", number), now - timedelta(days=1))
        add_task(engine, "m-3-p", gone, "pending", created_at=now)
        removed = store.remove_apps([gone], source="test", now=now)
        assert removed.removed == [gone]
        add_app_row(engine, newcomer, now)
        with engine.connect() as connection:
            ids = dict(connection.execute(
                sa.select(APPS.c.model_slug, APPS.c.id).where(APPS.c.app_number.in_([3, 9]))
            ).all())
        assert ids == {"other": 3}, "SQLite reused the removed app's id"
        with engine.connect() as connection:
            batch = connection.execute(
                sa.select(journal_table.c.batch_id).where(journal_table.c.action == "app_removed")
            ).scalar_one()
        result = journal.restore(store, journal.Selection(batch_id=batch))
        assert result.by_action == {"app_removed": 1, "task_cancelled": 1}
        with engine.connect() as connection:
            rows = dict(connection.execute(
                sa.select(APPS.c.model_slug, APPS.c.id).where(APPS.c.app_number.in_([3, 9]))
            ).all())
        assert rows["other"] == 3 and rows["m"] not in (3, None)
        assert task_row(engine, "m-3-p")["status"] == "pending"
    finally:
        engine.dispose()
