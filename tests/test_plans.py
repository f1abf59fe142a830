"""How SQLite finds the rows a removal changes: through the keys, never a walk of every active
task. (With a status index and keys of two models, SQLite preferred the status index: a
removal batch then read every active task of the table.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import database_url_for
from sqlalchemy import event
from sqlalchemy.engine import Engine

from fswatch_sync import db, rules
from fswatch_sync.layout import AppKey
from fswatch_sync.store import Store

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MODELS = tuple(f"model-{i}" for i in range(12))
APPS_PER_MODEL = 100
TASKS_PER_APP = 4


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    created = db.create_engine(f"sqlite:///{tmp_path / 'plans.db'}")
    yield created
    created.dispose()


def _seed(store: Store) -> None:
    host = store.host
    created = db.to_db_time(NOW - timedelta(days=1))
    apps = [
        {"model_slug": model, "app_number": number, "created_at": created}
        for model in MODELS
        for number in range(1, APPS_PER_MODEL + 1)
    ]
    tasks = [
        {
            "task_id": f"{app['model_slug']}-{app['app_number']}-{i}",
            "target_model": app["model_slug"],
            "target_app_number": app["app_number"],
            # Most tasks active, as in a busy queue: a walk of the status index reads them all.
            "status": ("pending", "running", "pending", "completed")[i],
            "created_at": created,
        }
        for app in apps
        for i in range(TASKS_PER_APP)
    ]
    with store.engine.begin() as connection:
        connection.execute(sa.insert(host.apps), apps)
        connection.execute(sa.insert(host.tasks), tasks)


def _task_statements(engine: Engine, table: str) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("SELECT", "UPDATE", "INSERT") and f"FROM {table}" in statement:
            seen.append((statement, parameters))

    return seen


def test_a_removal_finds_the_tasks_of_its_keys_through_the_keys(engine: Engine) -> None:
    store = Store(engine)
    store.init_db()
    _seed(store)
    host = store.host
    # Keys of several models in one batch: the predicate is an OR of one term per model.
    keys = [AppKey(model, n) for model in MODELS[:10] for n in range(1, 21)]
    statements = _task_statements(engine, host.tasks.name)
    outcome = store.remove_apps(keys, source="sweep", now=NOW, collect=False)

    assert outcome.removed == sorted(keys)
    with engine.connect() as connection:
        status = host.task_col("status")
        left = connection.execute(
            sa.select(sa.func.count()).where(
                host.task_col("target_model").in_(MODELS[:10]),
                host.task_col("target_app_number") <= 20,
                status.in_(("pending", "running")),
            )
        ).scalar_one()
    assert left == 0, "the removed apps' active tasks are all cancelled"

    reads = [(sql, params) for sql, params in statements if "target_app_number IN" in sql]
    assert reads, "the removal read its keys' tasks"
    raw = engine.raw_connection()
    try:
        for sql, params in reads:
            plan = " | ".join(
                str(row[3]) for row in raw.cursor().execute(f"EXPLAIN QUERY PLAN {sql}", params)
            )
            assert f"ix_{host.tasks.name}_status" not in plan, plan
            assert "target" in plan, plan
    finally:
        raw.close()


@pytest.mark.parametrize("key_indexed", [True, False], ids=["key-index", "no-key-index"])
def test_postgresql_checks_the_grace_of_a_batch_row_by_row(
    tmp_path: Path, server_databases: Any, key_indexed: bool
) -> None:
    """The removal's locked read tests each key's young siblings through the key index: as an
    anti-join, PostgreSQL read the whole app table once per batch (no index serves
    ``created_at > cutoff``). A host table without an index on the key keeps the database's
    own plan: a probe per row would then read the table once per row."""
    engine = db.create_engine(database_url_for("postgres", tmp_path, server_databases))
    try:
        Store(engine).init_db()
        if not key_indexed:
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "ALTER TABLE generated_applications"
                    " DROP CONSTRAINT generated_applications_model_slug_app_number_key"
                )
        store = Store(engine)
        _seed(store)
        host = store.host
        assert host.app_key_indexed is key_indexed
        young = AppKey(MODELS[0], 1)
        with engine.begin() as connection:
            # One key created a minute ago: the grace keeps it.
            connection.execute(
                sa.update(host.apps)
                .where(
                    host.app_col("model_slug") == young.model_slug,
                    host.app_col("app_number") == young.app_number,
                )
                .values({host.app_col("created_at"): db.to_db_time(NOW - timedelta(minutes=1))})
            )
        keys = [AppKey(model, n) for model in MODELS[:3] for n in range(1, 11)]
        seen: list[tuple[str, Any]] = []

        @event.listens_for(engine, "before_cursor_execute")
        def _record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if "sibling" in statement and "FOR UPDATE" in statement:
                seen.append((statement, parameters))

        outcome = store.remove_apps(
            keys, source="sweep", now=NOW, young_after=NOW - timedelta(minutes=10), collect=False
        )

        assert outcome.removed == sorted(set(keys) - {young})
        with engine.connect() as connection:
            rows_of_young = connection.execute(
                sa.select(sa.func.count()).where(
                    host.app_col("model_slug") == young.model_slug,
                    host.app_col("app_number") == young.app_number,
                )
            ).scalar_one()
        assert rows_of_young == 1, "the young key keeps its row"
        assert seen, "the removal read its rows under lock, with the grace"
        raw = engine.raw_connection()
        try:
            for sql, params in seen:
                cursor = raw.cursor()
                cursor.execute(f"EXPLAIN {sql}", params)
                plan = " | ".join(str(row[0]) for row in cursor.fetchall())
                if key_indexed:
                    assert "SubPlan" in plan, plan
                    assert "Anti Join" not in plan, plan
                else:
                    assert "SubPlan" not in plan, plan
        finally:
            raw.close()
    finally:
        engine.dispose()


def test_the_grace_follows_each_cutoff_through_the_statement_cache(database_url: str) -> None:
    """The same statement, cached once per engine, with another cutoff each time: the grace's
    subquery is carried in two forms (plain and fenced), and each run must bind its own
    cutoff, whichever form the backend renders."""
    engine = db.create_engine(database_url)
    try:
        store = Store(engine)
        store.init_db()
        host = store.host
        slug = "~model one"
        with engine.begin() as connection:
            # The app numbered n was created n minutes ago.
            connection.execute(
                sa.insert(host.apps),
                [
                    {"model_slug": slug, "app_number": n,
                     "created_at": db.to_db_time(NOW - timedelta(minutes=n))}
                    for n in range(1, 31)
                ],
            )
        keys = [AppKey(slug, n) for n in range(1, 31)]
        counted = []
        for minutes in (5, 20, 5, 25):
            with engine.connect() as connection:
                counted.append(
                    connection.execute(
                        sa.select(sa.func.count()).where(
                            rules.app_rule(host, keys, NOW - timedelta(minutes=minutes))
                        )
                    ).scalar_one()
                )
        # Keys younger than the cutoff are kept out: n < minutes.
        assert counted == [26, 11, 26, 6]
    finally:
        engine.dispose()
