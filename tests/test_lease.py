"""records.Lease: one holder at a time, expiry, take-over, and a lost lease stops a commit."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease, LeaseLost
from fswatch_sync.schema import leases_table
from fswatch_sync.store import Store

DURATION = 30.0


@pytest.fixture
def tables(engine: Engine) -> Engine:
    Store(engine).init_db()
    return engine


def lease_row(engine: Engine) -> tuple[str, datetime, datetime]:
    with engine.connect() as connection:
        holder, acquired, expires = connection.execute(
            sa.select(
                leases_table.c.holder, leases_table.c.acquired_at, leases_table.c.expires_at
            ).where(leases_table.c.name == "sweep")
        ).one()
    acquired_at, expires_at = db.from_db_time(acquired), db.from_db_time(expires)
    assert acquired_at is not None and expires_at is not None
    return str(holder), acquired_at, expires_at


def later(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def test_acquire_renew_expire_take_over(tables: Engine, now: datetime) -> None:
    a = Lease(tables, "instance-a", duration_seconds=DURATION)
    b = Lease(tables, "instance-b", duration_seconds=DURATION)

    assert a.try_acquire(now)
    assert lease_row(tables) == ("instance-a", now, later(now, DURATION))
    assert a.current_holder(later(now, 1)) == "instance-a"

    assert not b.try_acquire(later(now, 10)), "a second holder while the lease is unexpired"
    assert lease_row(tables)[0] == "instance-a"

    # Renewal: the expiry moves, acquired_at stays.
    assert a.try_acquire(later(now, 20))
    assert lease_row(tables) == ("instance-a", now, later(now, 20 + DURATION))
    assert not b.try_acquire(later(now, 49))

    # After expiry (injected clock), b takes over.
    assert b.try_acquire(later(now, 50))
    assert lease_row(tables) == ("instance-b", later(now, 50), later(now, 50 + DURATION))
    assert b.current_holder(later(now, 51)) == "instance-b"
    assert not a.try_acquire(later(now, 51))
    assert b.current_holder(later(now, 50 + DURATION)) is None  # expired: nobody holds it


def test_release_frees_the_lease_at_once(tables: Engine, now: datetime) -> None:
    a = Lease(tables, "instance-a", duration_seconds=DURATION)
    b = Lease(tables, "instance-b", duration_seconds=DURATION)
    assert a.try_acquire(now)
    b.release()  # not b's: changes nothing
    assert not b.try_acquire(later(now, 1))
    a.release()
    assert a.current_holder(later(now, 1)) is None
    assert b.try_acquire(later(now, 1)), "a released lease is free for the next one at once"
    a.release()  # no longer a's: b keeps it
    assert lease_row(tables)[0] == "instance-b"
    assert not a.try_acquire(later(now, 2))


def test_check_and_extend(tables: Engine, now: datetime) -> None:
    a = Lease(tables, "instance-a", duration_seconds=DURATION)
    b = Lease(tables, "instance-b", duration_seconds=DURATION)
    assert a.try_acquire(now)
    with tables.begin() as connection:
        a.check_and_extend(connection, later(now, 10))
    assert lease_row(tables)[2] == later(now, 10 + DURATION)

    with pytest.raises(LeaseLost), tables.begin() as connection:
        b.check_and_extend(connection, later(now, 11))  # never b's

    # Ran out unnoticed but nobody took it: nobody else did any work, so it may be extended.
    with tables.begin() as connection:
        a.check_and_extend(connection, later(now, 100))
    assert lease_row(tables) == ("instance-a", now, later(now, 100 + DURATION))
    a.renew(later(now, 110))
    assert lease_row(tables)[2] == later(now, 110 + DURATION)

    assert b.try_acquire(later(now, 110 + DURATION))
    with pytest.raises(LeaseLost), tables.begin() as connection:
        a.check_and_extend(connection, later(now, 110 + DURATION + 1))  # taken over
    with pytest.raises(LeaseLost):
        a.renew(later(now, 110 + DURATION + 1))
    assert lease_row(tables) == ("instance-b", later(now, 110 + DURATION),
                                 later(now, 110 + 2 * DURATION))


def test_lost_lease_rolls_the_store_batch_back(tables: Engine, now: datetime) -> None:
    store = Store(tables)
    host = store.host
    with tables.begin() as connection:
        connection.execute(
            sa.insert(host.apps),
            [{"model_slug": "m", "app_number": 1, "created_at": db.to_db_time(now)}],
        )
    a = Lease(tables, "instance-a", duration_seconds=DURATION)
    b = Lease(tables, "instance-b", duration_seconds=DURATION)
    assert a.try_acquire(now)
    assert b.try_acquire(later(now, DURATION + 1))  # a stalled past its expiry; b took over

    guarded = store.with_commit_check(lambda c: a.check_and_extend(c, later(now, DURATION + 2)))
    with pytest.raises(LeaseLost):
        guarded.remove_apps([AppKey("m", 1)], source="sweep", now=now)
    assert [AppKey(row[0], row[1]) for row in store.app_rows()] == [AppKey("m", 1)]


def test_only_one_of_many_concurrent_takers_wins(tables: Engine, now: datetime) -> None:
    takers = [Lease(tables, f"instance-{i}", duration_seconds=DURATION) for i in range(4)]
    start = threading.Barrier(len(takers))
    results: dict[str, bool] = {}

    def take(lease: Lease) -> None:
        start.wait(10)
        results[lease.holder] = lease.try_acquire(now)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    winners = [holder for holder, won in results.items() if won]
    assert len(results) == len(takers) and len(winners) == 1
    assert lease_row(tables)[0] == winners[0]
