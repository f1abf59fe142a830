"""A host-like schema unlike the embedded default, built with plain SQLAlchemy Core.

Other table and column names, extra NOT NULL columns without defaults, renamed status values
plus an extra active (``queued``) and an extra terminal (``skipped``) status, child tables with
foreign keys to the apps table (one per dependents policy, one not declared in the config), and
sub-tasks (``jobs.parent_pk -> jobs.pk``).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Engine

# Host status values for the tool's roles.
WAITING, WORKING, DONE, ERROR, ABORTED = "waiting", "working", "done", "error", "aborted"
QUEUED, SKIPPED = "queued", "skipped"
CANCEL_MESSAGE = "app gone: {model_slug}/app{app_number}"

host_metadata = MetaData()

apps = Table(
    "apps",
    host_metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("slug", String(200), nullable=False),
    Column("num", Integer, nullable=False),
    Column("made_at", DateTime(), nullable=True),
    Column("owner_email", String(200), nullable=False),
    sa.UniqueConstraint("slug", "num", name="uq_apps_slug_num"),
)

jobs = Table(
    "jobs",
    host_metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("job_uid", String(100), nullable=False, unique=True),
    Column("model", String(200), nullable=False),
    Column("app_no", Integer, nullable=False),
    Column("state", String(20), nullable=False),
    Column("queued_at", DateTime(), nullable=True),
    Column("began_at", DateTime(), nullable=True),
    Column("ended_at", DateTime(), nullable=True),
    Column("note", Text, nullable=True),
    Column("parent_pk", Integer, ForeignKey("jobs.pk", name="fk_jobs_parent"), nullable=True),
    Column("priority", Integer, nullable=False),
)

# Declared: restrict.
app_artifacts = Table(
    "app_artifacts",
    host_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", Integer, ForeignKey("apps.pk", name="fk_artifacts_app"), nullable=False),
    Column("path", String(200), nullable=False),
)

# Declared: delete.
app_bundles = Table(
    "app_bundles",
    host_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", Integer, ForeignKey("apps.pk", name="fk_bundles_app"), nullable=False),
    Column("blob_name", String(200), nullable=False),
)

# Declared: nullify.
app_notes = Table(
    "app_notes",
    host_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", Integer, ForeignKey("apps.pk", name="fk_notes_app"), nullable=True),
    Column("body", String(200), nullable=False),
)

# Not declared in the config: found by reflection, gets schema.dependents_policy.
app_tags = Table(
    "app_tags",
    host_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_ref", Integer, ForeignKey("apps.pk", name="fk_tags_app"), nullable=False),
    Column("tag", String(50), nullable=False),
)


def schema_toml(dependents_policy: str | None = "delete") -> str:
    policy_line = f'dependents_policy = "{dependents_policy}"\n' if dependents_policy else ""
    return f"""
[schema]
apps_table = "apps"
tasks_table = "jobs"
cancel_message = "{CANCEL_MESSAGE}"
{policy_line}
[schema.apps_columns]
id = "pk"
model_slug = "slug"
app_number = "num"
created_at = "made_at"

[schema.tasks_columns]
id = "pk"
task_id = "job_uid"
target_model = "model"
target_app_number = "app_no"
status = "state"
created_at = "queued_at"
started_at = "began_at"
completed_at = "ended_at"
error_message = "note"
parent_id = "parent_pk"

[schema.statuses]
pending = "{WAITING}"
running = "{WORKING}"
completed = "{DONE}"
failed = "{ERROR}"
cancelled = "{ABORTED}"
extra_active = ["{QUEUED}"]
extra_terminal = ["{SKIPPED}"]

[[schema.dependents]]
table = "app_artifacts"
column = "app_id"
references = "pk"
policy = "restrict"

[[schema.dependents]]
table = "app_bundles"
column = "app_id"
references = "pk"
policy = "delete"

[[schema.dependents]]
table = "app_notes"
column = "app_id"
references = "pk"
policy = "nullify"
"""


def write_config(
    path: Path, *, root: Path, database_url: str, dependents_policy: str | None = "delete"
) -> Path:
    path.write_text(
        f"root = {json.dumps(str(root))}\n"
        f"database_url = {json.dumps(database_url)}\n"
        "max_delete_fraction = 0.5\n" + schema_toml(dependents_policy)
    )
    return path


def create_host_schema(engine: Engine) -> None:
    host_metadata.create_all(engine)


def naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


def add_app(engine: Engine, slug: str, num: int, made_at: datetime) -> int:
    with engine.begin() as connection:
        result = connection.execute(
            sa.insert(apps).values(
                slug=slug, num=num, made_at=naive(made_at), owner_email=f"{slug}-{num}@host.test"
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def add_job(
    engine: Engine,
    uid: str,
    model: str,
    app_no: int,
    state: str,
    *,
    queued_at: datetime | None = None,
    began_at: datetime | None = None,
    ended_at: datetime | None = None,
    parent: int | None = None,
    note: str | None = None,
) -> int:
    with engine.begin() as connection:
        result = connection.execute(
            sa.insert(jobs).values(
                job_uid=uid,
                model=model,
                app_no=app_no,
                state=state,
                queued_at=naive(queued_at) if queued_at else None,
                began_at=naive(began_at) if began_at else None,
                ended_at=naive(ended_at) if ended_at else None,
                parent_pk=parent,
                note=note,
                priority=len(uid),
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def add_child(engine: Engine, table: Table, **values: Any) -> int:
    with engine.begin() as connection:
        key = connection.execute(sa.insert(table).values(**values)).inserted_primary_key
        assert key is not None
        return int(key[0])


def rows(engine: Engine, table: Table, key: str = "id") -> dict[Any, dict[str, Any]]:
    """Every row of a host table by its key column, as plain dicts."""
    with engine.connect() as connection:
        found = connection.execute(sa.select(table)).all()
    return {row._mapping[key]: dict(row._mapping) for row in found}


def job_states(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return {
            uid: state
            for uid, state in connection.execute(sa.select(jobs.c.job_uid, jobs.c.state))
        }


def schema_snapshot(engine: Engine) -> dict[str, Any]:
    """Everything reflection says about every table not owned by the tool."""
    inspector = sa.inspect(engine)
    snapshot: dict[str, Any] = {}
    for name in sorted(inspector.get_table_names()):
        if name.startswith("fswatch_sync_"):
            continue
        snapshot[name] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(name)
            ],
            "pk": inspector.get_pk_constraint(name)["constrained_columns"],
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"],
                 tuple(fk["referred_columns"]))
                for fk in inspector.get_foreign_keys(name)
            ),
            "indexes": sorted(
                (tuple(str(c) for c in ix["column_names"]), bool(ix["unique"]))
                for ix in inspector.get_indexes(name)
            ),
            "uniques": sorted(
                tuple(str(c) for c in uq["column_names"])
                for uq in inspector.get_unique_constraints(name)
            ),
        }
    return snapshot


def table_names(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def at(now: datetime, **delta: float) -> datetime:
    return now - timedelta(**delta)


SLUG = "m1"
PRESENT = (1, 5, 6, 7, 8)
BLOCKED, NULLIFIED_AND_DELETED, TAGGED = 2, 3, 4


class Scenario:
    """Ids of the rows :func:`build_scenario` made, and the final states a sweep must leave."""

    def __init__(self) -> None:
        self.app_pk: dict[int, int] = {}
        self.job_pk: dict[str, int] = {}
        self.artifact = 0
        self.bundles: list[int] = []
        self.note = 0
        self.kept_note = 0
        self.tag = 0


def build_scenario(engine: Engine, root: Path, now: datetime) -> Scenario:
    """Apps m1/app1..app8 (app2, app3, app4 without directory), dependents and jobs.

    After a real sweep at ``now`` (retention 30 days, timeouts 60 minutes, grace 10 minutes):
    app2 is blocked by its artifact (restrict); app3 loses its two bundles (delete) and its note's
    pointer (nullify); app4 loses its tag (undeclared FK, policy delete); see EXPECTED_STATES.
    """
    s = Scenario()
    old, recent = at(now, days=40), at(now, days=1)
    for num in range(1, 9):
        s.app_pk[num] = add_app(engine, SLUG, num, at(now, days=2))
        if num in PRESENT:
            (root / SLUG / f"app{num}").mkdir(parents=True, exist_ok=True)
    s.artifact = add_child(engine, app_artifacts, app_id=s.app_pk[BLOCKED], path="dist/x.zip")
    s.bundles = [
        add_child(engine, app_bundles, app_id=s.app_pk[NULLIFIED_AND_DELETED], blob_name=name)
        for name in ("b-one", "b-two")
    ]
    s.note = add_child(engine, app_notes, app_id=s.app_pk[NULLIFIED_AND_DELETED], body="keep me")
    s.kept_note = add_child(engine, app_notes, app_id=s.app_pk[1], body="present app")
    s.tag = add_child(engine, app_tags, app_ref=s.app_pk[TAGGED], tag="beta")

    def job(uid: str, model: str, num: int, state: str, **kw: Any) -> None:
        parent = kw.pop("parent", None)
        s.job_pk[uid] = add_job(
            engine, uid, model, num, state,
            parent=s.job_pk[parent] if parent else None, **kw,
        )

    job("a2-working", SLUG, 2, WORKING, queued_at=at(now, minutes=10), began_at=at(now, minutes=5))
    job("a2-queued", SLUG, 2, QUEUED, queued_at=old)
    job("a3-queued", SLUG, 3, QUEUED, queued_at=at(now, hours=1))
    job("a3-working", SLUG, 3, WORKING, queued_at=at(now, minutes=3), began_at=at(now, minutes=2))
    job("a3-skipped", SLUG, 3, SKIPPED, queued_at=recent, ended_at=recent, note="host said skip")
    job("a4-done-old", SLUG, 4, DONE, queued_at=old, ended_at=old)
    job("ghost-queued", "ghost", 1, QUEUED, queued_at=at(now, minutes=1))
    job("a1-stuck-working", SLUG, 1, WORKING, queued_at=old, began_at=old)
    job("a1-stuck-waiting", SLUG, 1, WAITING, queued_at=old)
    job("a1-queued-old", SLUG, 1, QUEUED, queued_at=old)
    job("a1-waiting-fresh", SLUG, 1, WAITING, queued_at=at(now, minutes=5))
    job("old-done", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("old-skipped", SLUG, 1, SKIPPED, queued_at=old, ended_at=old)
    job("recent-skipped", SLUG, 1, SKIPPED, queued_at=recent, ended_at=recent)
    job("p1", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("c1a", SLUG, 1, DONE, queued_at=old, ended_at=old, parent="p1")
    job("c1b", SLUG, 1, ERROR, queued_at=old, ended_at=old, parent="p1")
    job("p2", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("c2", SLUG, 1, DONE, queued_at=recent, ended_at=recent, parent="p2")
    job("p3", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("c3", SLUG, 1, QUEUED, queued_at=recent, parent="p3")
    job("p4", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("c4", SLUG, 1, DONE, queued_at=old, ended_at=old, parent="p4")
    job("g4", SLUG, 1, DONE, queued_at=recent, ended_at=recent, parent="c4")
    job("p5", SLUG, 1, DONE, queued_at=old, ended_at=old)
    job("c5", SLUG, 1, ABORTED, parent="p5")  # terminal with no timestamp: never old
    return s


# job_uid -> state after one real sweep; purged jobs are absent.
EXPECTED_STATES = {
    "a2-working": WORKING,
    "a2-queued": QUEUED,
    "a3-queued": ABORTED,
    "a3-working": ABORTED,
    "a3-skipped": SKIPPED,
    "ghost-queued": ABORTED,
    "a1-stuck-working": ERROR,
    "a1-stuck-waiting": ABORTED,
    "a1-queued-old": QUEUED,
    "a1-waiting-fresh": WAITING,
    "recent-skipped": SKIPPED,
    "p2": DONE,
    "c2": DONE,
    "p3": DONE,
    "c3": QUEUED,
    "p4": DONE,
    "c4": DONE,
    "g4": DONE,
    "p5": DONE,
    "c5": ABORTED,
}
PURGED = {"a4-done-old", "old-done", "old-skipped", "p1", "c1a", "c1b"}
