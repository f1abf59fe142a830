"""A host whose tasks table points at the apps table with its own foreign key."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.store import Store

CONFIG = {"apps_table": "host_apps", "tasks_table": "host_tasks"}


def _create(engine: Engine, *, nullable: bool) -> tuple[sa.Table, sa.Table]:
    metadata = sa.MetaData()
    apps = sa.Table(
        "host_apps", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_slug", sa.String(200), nullable=False),
        sa.Column("app_number", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime),
    )
    tasks = sa.Table(
        "host_tasks", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(100), nullable=False, unique=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("host_apps.id"), nullable=nullable),
        sa.Column("target_model", sa.String(200), nullable=False),
        sa.Column("target_app_number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("completed_at", sa.DateTime),
        sa.Column("error_message", sa.Text),
    )
    metadata.create_all(engine)
    return apps, tasks


def _seed(engine: Engine, apps: sa.Table, tasks: sa.Table, now: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(sa.insert(apps).values(
            id=1, model_slug="m", app_number=1, created_at=db.to_db_time(now - timedelta(days=1))
        ))
        for status in ("pending", "completed"):
            connection.execute(sa.insert(tasks).values(
                task_id=f"t-{status}", app_id=1, target_model="m", target_app_number=1,
                status=status, created_at=db.to_db_time(now - timedelta(hours=1)),
            ))


def test_a_nullable_task_pointer_is_nullified_and_the_app_removed(
    engine: Engine, now: datetime
) -> None:
    apps, tasks = _create(engine, nullable=True)
    _seed(engine, apps, tasks, now)
    store = Store(engine, SchemaConfig.from_mapping(CONFIG))
    store.ensure_tool_tables()

    outcome = store.remove_apps([AppKey("m", 1)], source="sweep", now=now)

    assert outcome.removed == [AppKey("m", 1)]
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(apps)).scalar_one() == 0
        rows = {r.task_id: r for r in connection.execute(sa.select(tasks))}
        actions = sorted(
            a for (a,) in connection.execute(sa.select(journal_table.c.action))
        )
    assert rows["t-pending"].status == "cancelled" and rows["t-pending"].app_id is None
    assert rows["t-completed"].status == "completed" and rows["t-completed"].app_id is None
    assert actions.count("dependent_nullified") == 2
    assert "app_removed" in actions


def test_a_not_null_task_pointer_keeps_the_app_untouched(engine: Engine, now: datetime) -> None:
    apps, tasks = _create(engine, nullable=False)
    _seed(engine, apps, tasks, now)
    store = Store(engine, SchemaConfig.from_mapping(CONFIG))
    store.ensure_tool_tables()

    outcome = store.remove_apps([AppKey("m", 1)], source="sweep", now=now)

    assert outcome.removed == [] and outcome.blocked == [AppKey("m", 1)]
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(apps)).scalar_one() == 1
        statuses = sorted(s for (s,) in connection.execute(sa.select(tasks.c.status)))
    assert statuses == ["completed", "pending"]
