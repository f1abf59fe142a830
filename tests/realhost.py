"""A host schema shaped like a real Flask app of this kind, and one scenario on it.

Traits the default schema never shows: several rows (versions) per app key sharing one
directory; a string ``task_id`` that sub-tasks point at (``parent_task_id -> task_id``);
zone-aware timestamps (``timestamptz`` on PostgreSQL, ``TIMESTAMP`` on MariaDB, which the
session's zone converts); a native enum column on apps; a results table with a NOT NULL foreign
key to tasks and a reports table with a nullable one; and a link by (model, number) with no
foreign key at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine

from fswatch_sync.layout import AppKey

Aware = sa.DateTime(timezone=True).with_variant(mysql.TIMESTAMP(fsp=6), "mysql", "mariadb")

metadata = MetaData()

apps = Table(
    "gen_apps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("number", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", sa.Enum("draft", "ready", "broken", name="app_state"), nullable=False),
    Column("created", Aware, nullable=True),
    Column("touched", Aware, nullable=True),
    Column("missing_since", Aware, nullable=True),
    sa.UniqueConstraint("model", "number", "version", name="uq_gen_apps_version"),
)

tasks = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(64), nullable=False, unique=True),
    Column(
        "parent_task_id",
        String(64),
        ForeignKey("jobs.task_id", name="fk_jobs_parent"),
        nullable=True,
    ),
    Column("model", String(200), nullable=False),
    Column("number", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("created", Aware, nullable=True),
    Column("started", Aware, nullable=True),
    Column("completed", Aware, nullable=True),
    Column("error", Text, nullable=True),
    Column("touched", Aware, nullable=True),
    Column("priority", Integer, nullable=False),
)

results = Table(
    "job_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id", name="fk_results_job"), nullable=False),
    Column("payload", Text, nullable=False),
)

reports = Table(
    "job_reports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "job_ref", String(64), ForeignKey("jobs.task_id", name="fk_reports_job"), nullable=True
    ),
    Column("title", String(100), nullable=False),
)

# A link by (model, number), with no foreign key: only the mapping can name it.
ratings = Table(
    "app_ratings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("number", Integer, nullable=False),
    Column("stars", Integer, nullable=False),
)

SCHEMA_TOML = """
[schema]
apps_table = "gen_apps"
tasks_table = "jobs"
task_dependents_policy = "restrict"

[schema.messages]
orphan_task = "orphaned: no app row"

[schema.apps_columns]
model_slug = "model"
app_number = "number"
created_at = "created"
updated_at = "touched"

[schema.tasks_columns]
target_model = "model"
target_app_number = "number"
created_at = "created"
started_at = "started"
completed_at = "completed"
error_message = "error"
updated_at = "touched"
parent_id = "parent_task_id"

[[schema.dependents]]
table = "app_ratings"
column = "model,number"
references = "model,number"
policy = "delete"

[[schema.task_dependents]]
table = "job_results"
column = "job_id"
references = "id"
policy = "delete"

[[schema.task_dependents]]
table = "job_reports"
column = "job_ref"
references = "task_id"
policy = "nullify"
"""

PRESENT = AppKey("m1", 1)
GONE = AppKey("m1", 2)  # three old versions: all go together
YOUNG = AppKey("m1", 3)  # an old v1 and a v2 two minutes old: the grace keeps the key
LONE = AppKey("m2", 7)  # one version, gone
NEVER = AppKey("m3", 9)  # tasks but no row at all


@dataclass(frozen=True)
class Outcome:
    """Each app row's and task's final state, and the other tables' rows, by stable names."""

    apps: dict[tuple[str, int, int], str]
    tasks: dict[str, tuple[str, str | None]]
    results: list[str]
    reports: dict[str, str | None]
    ratings: list[tuple[str, int]]


def create(engine: Engine) -> None:
    metadata.create_all(engine)


def _app(engine: Engine, key: AppKey, version: int, created: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.insert(apps).values(
                model=key.model_slug, number=key.app_number, version=version, state="ready",
                created=created,
            )
        )


def _task(engine: Engine, task_id: str, key: AppKey, status: str, **values: Any) -> int:
    with engine.begin() as connection:
        result = connection.execute(
            sa.insert(tasks).values(
                task_id=task_id, model=key.model_slug, number=key.app_number, status=status,
                priority=5, **values,
            )
        )
        key_ = result.inserted_primary_key
        assert key_ is not None
        return int(key_[0])


def seed(engine: Engine, root: Path, now: datetime) -> None:
    """The scenario; every time is an aware instant, written through the host's own session."""
    old, young = now - timedelta(days=3), now - timedelta(minutes=2)
    (root / PRESENT.model_slug / f"app{PRESENT.app_number}").mkdir(parents=True)
    for version in (1, 2, 3):
        _app(engine, PRESENT, version, old)
        _app(engine, GONE, version, old)
    _app(engine, YOUNG, 1, old)
    _app(engine, YOUNG, 2, young)
    _app(engine, LONE, 1, old)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(ratings),
            [
                {"model": GONE.model_slug, "number": GONE.app_number, "stars": 4},
                {"model": PRESENT.model_slug, "number": PRESENT.app_number, "stars": 5},
            ],
        )
    hour_ago, day_ago = now - timedelta(hours=2), now - timedelta(days=1)
    _task(engine, "gone-pending", GONE, "pending", created=day_ago)
    _task(engine, "gone-running", GONE, "running", created=day_ago, started=day_ago)
    _task(engine, "gone-done", GONE, "completed", created=day_ago, completed=day_ago)
    _task(engine, "young-pending", YOUNG, "pending", created=now - timedelta(minutes=1))
    _task(engine, "lone-pending", LONE, "pending", created=now - timedelta(minutes=5))
    _task(engine, "never-running", NEVER, "running", created=now, started=now)
    _task(engine, "stuck-running", PRESENT, "running", created=hour_ago, started=hour_ago)
    _task(engine, "stuck-pending", PRESENT, "pending", created=hour_ago)
    _task(engine, "fresh-running", PRESENT, "running", created=now,
          started=now - timedelta(minutes=59))
    ancient = now - timedelta(days=40)
    finished = {"created": ancient, "started": ancient, "completed": ancient}
    _task(engine, "old-plain", PRESENT, "completed", **finished)
    with_result = _task(engine, "old-with-result", PRESENT, "failed", **finished)
    _task(engine, "old-with-report", PRESENT, "completed", **finished)
    _task(engine, "old-parent", PRESENT, "completed", **finished)
    _task(engine, "old-child", PRESENT, "completed", parent_task_id="old-parent", **finished)
    _task(engine, "kept-parent", PRESENT, "completed", **finished)
    _task(engine, "kept-child", PRESENT, "completed", parent_task_id="kept-parent",
          created=day_ago, completed=day_ago)
    # 29 days and 23 hours: inside a 30-day retention, whatever the session's zone.
    _task(engine, "nearly-old", PRESENT, "completed",
          completed=now - timedelta(days=29, hours=23))
    with engine.begin() as connection:
        connection.execute(sa.insert(results).values(job_id=with_result, payload="{}"))
        connection.execute(sa.insert(reports).values(job_ref="old-with-report", title="r"))


EXPECTED = Outcome(
    apps={
        **{(PRESENT.model_slug, PRESENT.app_number, v): "ready" for v in (1, 2, 3)},
        (YOUNG.model_slug, YOUNG.app_number, 1): "ready",
        (YOUNG.model_slug, YOUNG.app_number, 2): "ready",
    },
    tasks={
        "gone-pending": ("cancelled", "gone"),
        "gone-running": ("cancelled", "gone"),
        "gone-done": ("completed", None),
        "young-pending": ("pending", None),
        "lone-pending": ("cancelled", "gone"),
        "never-running": ("cancelled", "orphan"),
        "stuck-running": ("failed", "stuck"),
        "stuck-pending": ("cancelled", "stuck"),
        "fresh-running": ("running", None),
        "kept-parent": ("completed", None),
        "kept-child": ("completed", None),
        "nearly-old": ("completed", None),
    },
    results=[],
    reports={"r": None},
    ratings=[(PRESENT.model_slug, PRESENT.app_number)],
)

# What the sweep reports for the scenario (keys and rows counted apart).
EXPECTED_COUNTS = {
    "orphan_apps": 2,
    "orphan_app_rows": 4,
    "orphan_tasks": 4,
    "stuck_tasks": 2,
    "old_tasks": 5,
    "dependents_deleted": 1,
}


def _message_kind(message: str | None) -> str | None:
    if message is None:
        return None
    for kind, word in (("orphan", "orphaned"), ("gone", "gone"), ("stuck", "still")):
        if word in message:
            return kind
    return message


def outcome(engine: Engine) -> Outcome:
    with engine.connect() as connection:
        app_rows = connection.execute(sa.select(apps.c.model, apps.c.number, apps.c.version,
                                                apps.c.state)).all()
        task_rows = connection.execute(
            sa.select(tasks.c.task_id, tasks.c.status, tasks.c.error)
        ).all()
        result_rows = connection.execute(sa.select(results.c.payload)).scalars().all()
        report_rows = connection.execute(sa.select(reports.c.title, reports.c.job_ref)).all()
        rating_rows = connection.execute(sa.select(ratings.c.model, ratings.c.number)).all()
    return Outcome(
        apps={(m, int(n), int(v)): str(s) for m, n, v, s in app_rows},
        tasks={t: (s, _message_kind(e)) for t, s, e in task_rows},
        results=sorted(result_rows),
        reports={title: ref for title, ref in report_rows},
        ratings=sorted((m, int(n)) for m, n in rating_rows),
    )


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every host table, to compare a restore with the state before the sweep."""
    shot: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in (apps, tasks, results, reports, ratings):
            rows = connection.execute(sa.select(table).order_by(table.c.id)).all()
            shot[table.name] = [tuple(row) for row in rows]
    return shot
