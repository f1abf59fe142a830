"""No lost update: a task the runner completes while a sweep judges it stuck stays completed.

A separate process with its own connection plays the task runner: it moves ``running`` tasks to
``completed`` with a compare-and-set, as a runner does, and records the ones it completed. The
sweep reads every task as stuck and fails them in batches of 50. The runner is released the
moment the sweep has read its plan, and the sweep goes on only once the runner has completed a
few of the planned tasks, so the race "read as running, completed by the runner, then failed by
the sweep" is certain to be offered; after that the two run freely side by side.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from datetime import datetime, timedelta
from multiprocessing.connection import Connection as PipeEnd
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from fswatch_sync import db, sweep
from fswatch_sync.layout import AppKey
from fswatch_sync.rules import TaskRule
from fswatch_sync.schema import journal_table
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store

TASKS = 1500
WARM_UP = 25  # planned tasks the runner completes before the sweep may change anything
DEADLINE_SECONDS = 60.0


def complete_running_tasks(
    url: str, ids: list[int], go: Event, warmed: Event, stop: Event, results: PipeEnd
) -> None:
    """The task runner: complete each task that is still running, highest id first."""
    connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    tasks = sa.table(
        "analysis_tasks", sa.column("id"), sa.column("status"), sa.column("completed_at")
    )
    completed: list[int] = []
    missed = 0
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        if not go.wait(DEADLINE_SECONDS):
            return
        for task_id in ids:
            if stop.is_set() or time.monotonic() > deadline:
                break
            finish = (
                sa.update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == "running")
                .values(status="completed", completed_at=db.to_db_time(db.utcnow()))
            )
            for attempt in range(50):
                try:
                    with engine.begin() as connection:
                        done = connection.execute(finish).rowcount == 1
                    break
                except OperationalError:  # SQLite busy (after its own busy timeout), MariaDB
                    if attempt == 49:  # deadlock: a runner tries again
                        raise
            if done:
                completed.append(task_id)
                if len(completed) == WARM_UP:
                    warmed.set()
            else:
                missed += 1
    finally:
        warmed.set()
        results.send(json.dumps({"completed": completed, "missed": missed}))
        results.close()
        engine.dispose()


def _seed(store: Store, root: Path, now: datetime) -> list[int]:
    key = AppKey("model", 1)
    (root / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
    host = store.host
    with store.engine.begin() as connection:
        connection.execute(
            sa.insert(host.apps).values(model_slug=key.model_slug, app_number=key.app_number,
                                        created_at=db.to_db_time(now - timedelta(days=1)))
        )
        connection.execute(
            sa.insert(host.tasks),
            [
                {
                    "task_id": f"t{n}",
                    "target_model": key.model_slug,
                    "target_app_number": key.app_number,
                    "status": "running",
                    "created_at": db.to_db_time(now - timedelta(hours=3)),
                    "started_at": db.to_db_time(now - timedelta(hours=2)),
                }
                for n in range(TASKS)
            ],
        )
        ids = connection.execute(sa.select(host.task_col("id"))).scalars().all()
    return sorted(int(i) for i in ids)


def test_sweep_never_fails_a_task_the_runner_completed(
    engine: Engine,
    database_url: str,
    apps_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = db.utcnow().replace(microsecond=0)
    store = Store(engine, batch_size=50)
    store.init_db()
    ids = _seed(store, apps_root, now)

    context = multiprocessing.get_context("spawn")
    go, warmed, stop = context.Event(), context.Event(), context.Event()
    receiver, sender = context.Pipe(duplex=False)
    runner = context.Process(
        target=complete_running_tasks,
        args=(database_url, ids[::-1], go, warmed, stop, sender),
        daemon=True,
    )
    runner.start()
    sender.close()

    apply_task_rule = Store.apply_task_rule

    def release_the_runner_then_apply(self: Store, rule: TaskRule, **kwargs: Any) -> Any:
        # The runner completes tasks while the stuck-running rule works through its batches.
        if rule.name == "stuck_running":
            go.set()
            assert warmed.wait(DEADLINE_SECONDS), "the runner never got going"
        return apply_task_rule(self, rule, **kwargs)

    monkeypatch.setattr(Store, "apply_task_rule", release_the_runner_then_apply)
    settings = Settings(root=apps_root, database_url=database_url, batch_size=50)
    try:
        report = sweep.Sweeper(store, settings, instance_id="sweeper").run(now=now)
    finally:
        go.set()
        stop.set()
        assert receiver.poll(DEADLINE_SECONDS), "the runner did not report"
        outcome = json.loads(receiver.recv())
        receiver.close()
        runner.join(DEADLINE_SECONDS)
    assert runner.exitcode == 0

    completed_by_runner = set(outcome["completed"])
    # The race was real: the runner completed tasks while the rule was being applied.
    assert len(completed_by_runner & set(ids)) >= WARM_UP

    host = store.host
    with engine.connect() as connection:
        final = dict(
            connection.execute(sa.select(host.task_col("id"), host.task_col("status"))).all()
        )
        entries = connection.execute(sa.select(journal_table)).mappings().all()

    # No task the runner completed was turned into a failure: each keeps its real outcome...
    assert {pk for pk in completed_by_runner if final[pk] != "completed"} == set()
    # ...and every other task was failed by the sweep, which counted exactly those.
    failed = {pk for pk, status in final.items() if status == "failed"}
    assert failed == set(ids) - completed_by_runner
    assert {pk for pk, status in final.items() if status == "completed"} == completed_by_runner
    assert report.stuck_running == len(failed)

    # The journal never records a change over a completed task.
    changed = [json.loads(e["before_image"]) for e in entries if e["action"] == "task_failed"]
    assert len(changed) == len(failed)
    assert {image["id"] for image in changed} == failed
    assert all(image["status"] == "running" for image in changed)
    assert all(e["old_status"] == "running" for e in entries if e["action"] != "app_removed")
    assert {e["action"] for e in entries} <= {"task_failed"}
