"""The store: bounded batches, one transaction per app and its tasks, compare-and-set, retries."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from fswatch_sync import db, rules
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store

ACTIVE = ("pending", "running")


@pytest.fixture
def store(engine: Engine) -> Store:
    created = Store(engine)
    created.init_db()
    return created


def seed(store: Store, keys: Sequence[AppKey], now: datetime, *, finished: bool = True) -> None:
    """Each app: a row, a pending and a running task, and (optionally) a completed one."""
    host = store.host
    apps = [
        {"model_slug": k.model_slug, "app_number": k.app_number,
         "created_at": db.to_db_time(now - timedelta(days=1))}
        for k in keys
    ]
    tasks = []
    for k in keys:
        statuses = ["pending", "running"] + (["completed"] if finished else [])
        for status in statuses:
            tasks.append({
                "task_id": f"{k.model_slug}-{k.app_number}-{status}",
                "target_model": k.model_slug,
                "target_app_number": k.app_number,
                "status": status,
                "created_at": db.to_db_time(now - timedelta(hours=1)),
                "started_at": db.to_db_time(now - timedelta(minutes=5)),
                "completed_at": (
                    db.to_db_time(now - timedelta(minutes=1)) if status == "completed" else None
                ),
                "error_message": None,
            })
    with store.engine.begin() as connection:
        connection.execute(sa.insert(host.apps), apps)
        connection.execute(sa.insert(host.tasks), tasks)


def app_keys(store: Store) -> set[AppKey]:
    return {AppKey(row[0], row[1]) for row in store.app_rows()}


def task_statuses(store: Store) -> dict[str, str]:
    host = store.host
    with store.engine.connect() as connection:
        return dict(
            connection.execute(sa.select(host.task_col("task_id"), host.task_col("status"))).all()
        )


def journal_batches(engine: Engine, action: str) -> dict[str, int]:
    j = journal_table.c
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(j.batch_id, sa.func.count()).where(j.action == action).group_by(j.batch_id)
        ).all()
    return {batch: int(count) for batch, count in found}


# -- batching ------------------------------------------------------------------------------------


def test_batches_are_bounded_and_complete(store: Store, now: datetime) -> None:
    keys = [AppKey("model", n) for n in range(50)]
    seed(store, keys, now)
    # A budget no batch can meet keeps every batch at its first size.
    small = Store(store.engine, batch_size=7, max_transaction_ms=0.001)

    outcome = small.remove_apps(keys, source="test", now=now)

    assert sorted(outcome.removed) == sorted(keys)
    assert len(outcome.cancelled) == 100
    assert app_keys(store) == set()
    statuses = task_statuses(store)
    assert sorted(set(statuses.values())) == ["cancelled", "completed"]
    assert sum(s == "cancelled" for s in statuses.values()) == 100
    removed_batches = journal_batches(store.engine, "app_removed")
    assert len(removed_batches) == 8  # ceil(50 / 7) transactions
    assert max(removed_batches.values()) <= 7
    # An app's tasks are journalled in the same transaction as its row.
    cancelled_batches = journal_batches(store.engine, "task_cancelled")
    assert set(cancelled_batches) == set(removed_batches)
    assert all(cancelled_batches[b] == 2 * removed_batches[b] for b in removed_batches)

    # The purge is batched the same way; a rehearsal (dry run) counts what it will do.
    old = rules.old_tasks_rule(small.host, now + timedelta(days=1))
    with small.rehearsal() as rehearsal:
        assert rehearsal.apply_task_rule(old, source="test", now=now).count == 150
    assert small.apply_task_rule(old, source="test", now=now).count == 150
    purge_batches = journal_batches(store.engine, "task_purged")
    assert len(purge_batches) == 22 and max(purge_batches.values()) <= 7  # ceil(150 / 7)
    assert task_statuses(store) == {}


def test_a_rule_walks_every_window_of_keys(
    store: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fswatch_sync import changes

    keys = [AppKey("model", n) for n in range(7)]
    seed(store, keys, now)  # 21 tasks: 7 of them completed
    # Windows of 4 keys, batches of 3: a window ends inside a batch, and the walk goes on.
    monkeypatch.setattr(changes, "WINDOW", 4)
    small = Store(store.engine, batch_size=3, max_transaction_ms=0.001)
    old = rules.old_tasks_rule(small.host, now + timedelta(days=1))

    assert small.apply_task_rule(old, source="test", now=now).count == 7

    assert sorted(set(task_statuses(store).values())) == ["pending", "running"]
    # Window one: 4 keys, batches of 3 and 1; window two: the last 3, one batch.
    assert sorted(journal_batches(store.engine, "task_purged").values()) == [1, 3, 3]


def test_change_tasks_is_a_compare_and_set(store: Store, now: datetime) -> None:
    """A task the runner finished after the sweep read it keeps its real outcome."""
    keys = [AppKey("model", n) for n in range(10)]
    seed(store, keys, now, finished=False)
    host = store.host
    # The runner completes one of them just before the rule is applied.
    with store.engine.begin() as connection:
        connection.execute(
            sa.update(host.tasks)
            .where(host.task_col("task_id") == "model-3-running")
            .values(status="completed", completed_at=db.to_db_time(now))
        )
    small = Store(store.engine, batch_size=3, max_transaction_ms=0.001)
    rule = rules.stuck_running_rule(small.host, now + timedelta(days=1), 60)
    outcome = small.apply_task_rule(rule, source="test", now=now, collect=True)
    assert outcome.count == 9
    assert {c.old_status for c in outcome.changes} == {"running"}
    statuses = task_statuses(store)
    assert statuses["model-3-running"] == "completed"
    assert sum(s == "failed" for s in statuses.values()) == 9
    assert len(journal_batches(store.engine, "task_failed")) == 3  # ceil(9 / 3)


def test_dry_run_reports_and_changes_nothing(store: Store, now: datetime) -> None:
    keys = [AppKey("model", n) for n in range(5)]
    seed(store, keys, now)
    before = task_statuses(store)
    dry = store.remove_apps(keys, source="test", now=now, dry_run=True)
    assert app_keys(store) == set(keys) and task_statuses(store) == before
    assert journal_batches(store.engine, "app_removed") == {}
    real = store.remove_apps(keys, source="test", now=now)
    assert (dry.removed, sorted(c.task_id for c in dry.cancelled)) == (
        real.removed, sorted(c.task_id for c in real.cancelled)
    )


# -- one transaction per app and its tasks ---------------------------------------------------------


def test_app_row_and_tasks_change_in_one_transaction(
    store: Store, database_url: str, now: datetime
) -> None:
    """A separate connection polling during a large removal never sees half of an app's change."""
    keys = [AppKey("big", n) for n in range(120)]
    seed(store, keys, now)
    host = store.host
    apps, tasks = host.apps.alias("a"), host.tasks.alias("t")
    app_exists = (
        sa.select(sa.literal(1))
        .where(apps.c.model_slug == tasks.c.target_model,
               apps.c.app_number == tasks.c.target_app_number)
        .exists()
    )

    def count(where: Any) -> Any:
        return sa.select(sa.func.count()).select_from(tasks).where(where).scalar_subquery()

    # One statement, so one snapshot on every backend.
    probe = sa.select(
        count(sa.and_(tasks.c.status.in_(ACTIVE), ~app_exists)).label("active_without_app"),
        count(sa.and_(tasks.c.status == "cancelled", app_exists)).label("cancelled_with_app"),
        sa.select(sa.func.count()).select_from(host.apps).scalar_subquery().label("apps"),
    )
    watcher = sa.create_engine(database_url)
    seen: list[tuple[int, int, int]] = []
    in_transaction: list[int] = []
    lock = threading.Lock()

    def look() -> tuple[int, int, int]:
        with watcher.connect() as connection, connection.begin():
            torn_a, torn_b, left = connection.execute(probe).one()
        with lock:
            seen.append((int(torn_a), int(torn_b), int(left)))
        return int(torn_a), int(torn_b), int(left)

    def after_statement(*_args: Any) -> None:
        # After every statement of the removal, the outside world sees either the state before
        # the batch or after it: never the tasks changed and the row not (or the reverse).
        in_transaction.append(look()[2])

    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            look()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    event.listen(store.engine, "after_execute", after_statement)
    try:
        outcome = Store(store.engine, batch_size=10, max_transaction_ms=0.001).remove_apps(
            keys, source="test", now=now
        )
        event.remove(store.engine, "after_execute", after_statement)
        assert look() == (0, 0, 0)
    finally:
        done.set()
        poller.join(10)
        watcher.dispose()
    assert not poller.is_alive()
    assert len(outcome.removed) == 120 and len(outcome.cancelled) == 240
    torn = [s for s in seen if s[0] or s[1]]
    assert torn == [], f"saw an app's row and its tasks in different states: {torn[:3]}"
    # Several statements per batch, each seeing the count before the batch commits.
    assert sorted(set(in_transaction), reverse=True) == list(range(120, 0, -10))
    assert in_transaction == sorted(in_transaction, reverse=True)


def test_still_absent_false_keeps_the_row(store: Store, now: datetime) -> None:
    """Deleted and regenerated: the re-check under lock keeps the row and its tasks."""
    keys = [AppKey("model", n) for n in range(4)]
    seed(store, keys, now)
    back = AppKey("model", 2)
    asked: list[AppKey] = []

    def present_now(batch: list[AppKey]) -> set[AppKey]:
        asked.extend(batch)
        return {key for key in batch if key == back}

    outcome = store.remove_apps(keys, source="reactor", now=now, present_now=present_now)
    assert sorted(asked) == keys
    assert outcome.present == [back]
    assert sorted(outcome.removed) == [k for k in keys if k != back]
    assert app_keys(store) == {back}
    statuses = task_statuses(store)
    assert (statuses["model-2-pending"], statuses["model-2-running"]) == ("pending", "running")
    j = journal_table.c
    with store.engine.connect() as connection:
        assert connection.execute(
            sa.select(sa.func.count()).where(j.app_number == 2)
        ).scalar_one() == 0


# -- transient errors --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_lock_held_by_another_connection_is_retried(
    database_url: str, now: datetime
) -> None:
    engine = db.create_engine(database_url, busy_timeout_ms=50)
    try:
        store = Store(engine, retry_seconds=20)
        store.init_db()
        keys = [AppKey("model", n) for n in range(3)]
        seed(store, keys, now)
        path = sa.make_url(database_url).database
        assert path is not None

        failures: list[str] = []
        failed = threading.Condition()

        @event.listens_for(engine, "handle_error")
        def _count(context: Any) -> None:
            with failed:
                failures.append(str(context.original_exception))
                failed.notify_all()

        locked, released = threading.Event(), threading.Event()

        def hold_lock() -> None:
            holder = sqlite3.connect(path, isolation_level=None, timeout=5)
            try:
                holder.execute("BEGIN IMMEDIATE")
                locked.set()
                # Keep the write lock until the store has met it twice (so it has retried).
                with failed:
                    failed.wait_for(lambda: len(failures) >= 2, timeout=10)
                holder.execute("COMMIT")
            finally:
                holder.close()
                released.set()

        thread = threading.Thread(target=hold_lock, daemon=True)
        thread.start()
        assert locked.wait(5)
        outcome = store.remove_apps(keys, source="test", now=now)
        thread.join(10)
        assert released.is_set()
        assert len(failures) >= 2 and all("locked" in f for f in failures)
        assert sorted(outcome.removed) == keys
        assert app_keys(store) == set()
        assert sorted(set(task_statuses(store).values())) == ["cancelled", "completed"]
    finally:
        engine.dispose()


def _sqlite_locked_error(path: str) -> DBAPIError:
    holder = sqlite3.connect(path, isolation_level=None)
    engine = db.create_engine(f"sqlite:///{path}", busy_timeout_ms=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(DBAPIError) as info, engine.begin() as connection:
            connection.execute(sa.text("SELECT 1"))
        return info.value
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def _error_of(engine: Engine, *statements: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))
    return info.value


@pytest.mark.parametrize("backend", ["sqlite"])
def test_is_transient_on_real_sqlite_errors(database_url: str, engine: Engine) -> None:
    path = sa.make_url(database_url).database
    assert path is not None
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        connection.execute(sa.text("INSERT INTO t VALUES (1)"))
    locked = _sqlite_locked_error(path)
    assert isinstance(locked.orig, sqlite3.OperationalError)
    assert "database is locked" in str(locked.orig)
    assert db.is_transient(locked)
    assert not db.is_transient(_error_of(engine, "SELECT * FROM no_such_table"))
    assert not db.is_transient(_error_of(engine, "INSERT INTO t VALUES (1)"))


def _table_of_two(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"))
        connection.execute(sa.text("INSERT INTO t (id, v) VALUES (1, 0), (2, 0)"))


def _deadlock(engine: Engine) -> DBAPIError:
    """Two transactions locking rows 1 and 2 in opposite orders: exactly one is the victim."""
    ready = {1: threading.Event(), 2: threading.Event()}
    errors: list[DBAPIError] = []

    def work(first: int, second: int) -> None:
        try:
            with engine.begin() as connection:
                connection.execute(sa.text("UPDATE t SET v = v + 1 WHERE id = :i"), {"i": first})
                ready[first].set()
                assert ready[second].wait(10)
                connection.execute(sa.text("UPDATE t SET v = v + 1 WHERE id = :i"), {"i": second})
        except DBAPIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def pg_engine(database_url: str) -> Iterator[Engine]:
    created = db.create_engine(database_url, connect_args={"options": "-c deadlock_timeout=50"})
    yield created
    created.dispose()


@pytest.mark.parametrize("backend", ["postgres"])
def test_is_transient_on_real_postgres_errors(pg_engine: Engine) -> None:
    _table_of_two(pg_engine)
    # Serialization failure: a REPEATABLE READ transaction updates a row changed since it began.
    repeatable = pg_engine.execution_options(isolation_level="REPEATABLE READ")
    with repeatable.connect() as first, first.begin():
        first.execute(sa.text("SELECT v FROM t WHERE id = 1")).one()
        with pg_engine.begin() as second:
            second.execute(sa.text("UPDATE t SET v = 5 WHERE id = 1"))
        with pytest.raises(DBAPIError) as info:
            first.execute(sa.text("UPDATE t SET v = 6 WHERE id = 1"))
    assert getattr(info.value.orig, "sqlstate", None) == "40001"
    assert db.is_transient(info.value)

    deadlock = _deadlock(pg_engine)
    assert getattr(deadlock.orig, "sqlstate", None) == "40P01"
    assert db.is_transient(deadlock)

    # The backend terminated by an administrator.
    with pg_engine.connect() as victim:
        pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as admin:
            assert admin.execute(
                sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}
            ).scalar_one()
            admin.commit()
        with pytest.raises(DBAPIError) as info:
            victim.execute(sa.text("SELECT 1"))
    assert db.is_transient(info.value)

    assert not db.is_transient(_error_of(pg_engine, "INSERT INTO t (id, v) VALUES (1, 0)"))
    assert not db.is_transient(_error_of(pg_engine, "SELECT * FROM no_such_table"))


@pytest.mark.parametrize("backend", ["mysql"])
def test_is_transient_on_real_mariadb_errors(engine: Engine) -> None:
    _table_of_two(engine)
    deadlock = _deadlock(engine)
    assert deadlock.orig is not None and deadlock.orig.args[0] == 1213
    assert db.is_transient(deadlock)

    # The connection killed by an administrator: lost connection / server gone away.
    with engine.connect() as victim:
        thread_id = victim.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
        victim.commit()
        with engine.connect() as admin:
            admin.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
        error: DBAPIError | None = None
        for _ in range(100):  # the kill lands on the next round trip at the latest
            try:
                victim.execute(sa.text("SELECT 1"))
                victim.commit()
            except DBAPIError as exc:
                error = exc
                break
    assert error is not None
    assert db.is_transient(error)

    assert not db.is_transient(_error_of(engine, "INSERT INTO t (id, v) VALUES (1, 0)"))
    assert not db.is_transient(_error_of(engine, "SELECT * FROM no_such_table"))


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> DBAPIError:
    return sa.exc.OperationalError(
        "SELECT 1", None, orig, connection_invalidated=invalidated
    )


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_wrapped(sqlite3.OperationalError("database is locked")), True),
        (_wrapped(sqlite3.OperationalError("database table is locked")), True),
        (_wrapped(sqlite3.OperationalError("no such table: x")), False),
        (_wrapped(psycopg.errors.SerializationFailure("x")), True),
        (_wrapped(psycopg.errors.DeadlockDetected("x")), True),
        (_wrapped(psycopg.errors.LockNotAvailable("x")), True),
        (_wrapped(psycopg.errors.AdminShutdown("x")), True),
        (_wrapped(psycopg.errors.UniqueViolation("x")), False),
        (_wrapped(psycopg.OperationalError("server closed the connection"), invalidated=True),
         True),
        (_wrapped(pymysql.err.OperationalError(1213, "Deadlock found")), True),
        (_wrapped(pymysql.err.OperationalError(2006, "MySQL server has gone away")), True),
        (_wrapped(pymysql.err.OperationalError(2013, "Lost connection")), True),
        (_wrapped(pymysql.err.IntegrityError(1062, "Duplicate entry")), False),
        (_wrapped(pymysql.err.ProgrammingError(1146, "Table doesn't exist")), False),
        (db.StaleRead("changed under lock"), True),
        (ValueError("not a database error"), False),
    ],
)
def test_is_transient_classification(error: BaseException, transient: bool) -> None:
    assert db.is_transient(error) is transient
