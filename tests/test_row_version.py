"""PostgreSQL's one-statement batch (changes._change_by_row_version) is a compare-and-set on the
whole row: a task the runner changes while the batch waits for its row keeps the runner's
change, even when its new status is still one the rule's UPDATE would accept."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import database_url_for
from helpers import add_app_row, add_task, init_database, naive, wait_until
from sqlalchemy.engine import Engine

from fswatch_sync import db, rules
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store


@pytest.fixture
def postgres_url(tmp_path: Path, server_databases: Any) -> str:
    url = database_url_for("postgres", tmp_path, server_databases)
    init_database(url)
    return url


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    created = db.create_engine(postgres_url)
    yield created
    created.dispose()


def _waiting_on_a_lock(probe: Engine) -> bool:
    with probe.connect() as connection:
        waiting = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return int(waiting) > 0


def test_a_task_the_runner_starts_while_its_batch_waits_is_not_cancelled(
    engine: Engine, postgres_url: str, now: datetime
) -> None:
    key = AppKey("model", 1)
    add_app_row(engine, key)
    for task_id in ("raced", "idle"):
        add_task(engine, task_id, key, "pending", created_at=now - timedelta(hours=3))
    store = Store(engine)
    stuck = rules.stuck_pending_rule(store.host, now, 60)
    runner = sa.create_engine(postgres_url)
    outcome: dict[str, Any] = {}
    try:
        with runner.connect() as connection:
            transaction = connection.begin()
            # The runner starts the task: still active, so only the row's version shows it.
            connection.execute(
                sa.text(
                    "UPDATE analysis_tasks SET status = 'running', started_at = :at"
                    " WHERE task_id = 'raced'"
                ),
                {"at": naive(now)},
            )
            sweep = threading.Thread(
                target=lambda: outcome.update(
                    result=store.apply_task_rule(stuck, source="test", now=now)
                )
            )
            sweep.start()
            # The batch read both tasks pending and now waits for the runner's row lock.
            wait_until(lambda: _waiting_on_a_lock(runner), what="the batch waiting on the row")
            transaction.commit()
        sweep.join(60)
        assert not sweep.is_alive()
    finally:
        runner.dispose()

    assert outcome["result"].count == 1
    with engine.connect() as connection:
        statuses: dict[str, str] = dict(
            connection.execute(sa.text("SELECT task_id, status FROM analysis_tasks")).all()
        )
        journalled = connection.execute(
            sa.select(journal_table.c.before_image, journal_table.c.new_status)
        ).all()
    assert statuses == {"raced": "running", "idle": "cancelled"}
    assert len(journalled) == 1
    assert '"idle"' in journalled[0][0] and journalled[0][1] == "cancelled"
