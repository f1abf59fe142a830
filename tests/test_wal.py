"""A sweep's checkpoints on SQLite (fswatch_sync.wal): none inside a commit of a bulk pass, one
after it, and SQLite's own policy given back to every connection, even after a failed batch."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import add_app_row, add_task, init_database, sqlite_url
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from fswatch_sync import db, rules, wal
from fswatch_sync.layout import AppKey
from fswatch_sync.store import Store


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    url = sqlite_url(tmp_path)
    init_database(url)
    created = db.create_engine(url)
    yield created
    created.dispose()


def _old_tasks(engine: Engine, now: datetime, count: int) -> None:
    add_app_row(engine, AppKey("model", 1))
    for n in range(count):
        add_task(
            engine, f"t{n}", AppKey("model", 1), "completed", created_at=now - timedelta(days=90)
        )


def _trace(engine: Engine) -> list[str]:
    """Every statement the driver runs on a connection opened from now on, in order."""
    seen: list[str] = []

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(seen.append)

    engine.dispose()  # the pool's connections are opened again, traced
    return seen


def _autocheckpoint(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())


def test_a_bulk_pass_checkpoints_after_its_commits_not_inside_them(
    engine: Engine, now: datetime
) -> None:
    _old_tasks(engine, now, 30)
    # A budget no batch can meet keeps every batch at its first size: three commits.
    store = Store(engine, batch_size=10, max_transaction_ms=0.001).bulk()
    traced = _trace(engine)

    outcome = store.apply_task_rule(
        rules.old_tasks_rule(store.host, now - timedelta(days=30)), source="test", now=now
    )
    store.end_bulk()
    statements = list(traced)

    assert outcome.count == 30
    with engine.connect() as connection:
        left = connection.exec_driver_sql("SELECT count(*) FROM analysis_tasks").scalar_one()
    assert left == 0
    commits = [i for i, s in enumerate(statements) if s.strip().upper() == "COMMIT"]
    checkpoints = [i for i, s in enumerate(statements) if "wal_checkpoint" in s]
    assert len(commits) == 3
    # One checkpoint, when the pass is over; none in between.
    assert len(checkpoints) == 1 and checkpoints[0] > commits[-1]
    # Each transaction of the pass deferred SQLite's own checkpoint.
    begins = [i for i, s in enumerate(statements) if s.startswith("BEGIN IMMEDIATE")]
    for begin, commit in zip(begins, commits, strict=True):
        assert any("wal_autocheckpoint = 0" in s for s in statements[begin:commit])
    assert _autocheckpoint(engine) == wal.DEFAULT_AUTOCHECKPOINT_PAGES


def test_a_failed_bulk_batch_gives_the_connection_its_policy_back(
    engine: Engine, now: datetime
) -> None:
    _old_tasks(engine, now, 5)

    def refuse(_connection: Connection) -> None:
        raise RuntimeError("the lease was lost")

    store = Store(engine).with_commit_check(refuse).bulk()
    with pytest.raises(RuntimeError):
        store.apply_task_rule(
            rules.old_tasks_rule(store.host, now - timedelta(days=30)), source="test", now=now
        )

    with engine.connect() as connection:
        left = connection.execute(sa.text("SELECT count(*) FROM analysis_tasks")).scalar_one()
    assert left == 5  # the batch was rolled back whole
    assert _autocheckpoint(engine) == wal.DEFAULT_AUTOCHECKPOINT_PAGES


def test_outside_a_bulk_pass_sqlite_keeps_its_own_policy(engine: Engine, now: datetime) -> None:
    _old_tasks(engine, now, 5)
    store = Store(engine)
    statements = _trace(engine)

    store.apply_task_rule(
        rules.old_tasks_rule(store.host, now - timedelta(days=30)), source="test", now=now
    )

    assert not any("wal_" in s for s in statements)
